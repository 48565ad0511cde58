"""The client's queue on Redis (zimage_core/client/redis_queue.py), judged by what the servers and the output folder
hold: a real redis-server, two real ComfyUI servers (the newest host) with the pack and the tiny random-weight
models, and workers as separate processes sharing one output folder, as on a shared drive."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
from comfyui import NEWEST, NoHost, Server, host, in_ci, node_of
from queue_harness import REDIS, redis_server, start_worker, stop_worker
from workflow_api import shipped

from zimage_core.client.__main__ import main as client_main

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("redis queue")]  # one pair of servers for the module
API = next(api for ui, api in shipped() if ui.stem == "zimage_turbo_text_to_image")
SAMPLER = node_of(json.loads(API.read_text()), "ZImageSampler")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS is None:
        if in_ci():
            pytest.fail("CI=true: redis-server is required (Debian: apt-get install redis-server)")
        pytest.skip("no redis-server on this machine (Debian: apt-get install redis-server)")
    pytest.importorskip("rq", reason='the queue extra: pip install "comfyui-zimage[queue]"')
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def queue_url(redis_url):
    """The module's Redis, emptied for each test."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    try:
        checkout = host(NEWEST)
    except NoHost as e:
        if in_ci():
            pytest.fail(f"CI=true: ComfyUI {NEWEST} is required: {e}")
        pytest.skip(f"ComfyUI {NEWEST}: {e}")
    started = []
    try:
        for name in ("a", "b"):
            started.append(Server(checkout, tmp_path_factory.mktemp(f"queue-server-{name}"), models).start())
        yield started
    finally:
        for server in started:
            server.stop()


def submit(url: str, tmp_path: Path, capsys, n: int, seed: int, *options: str) -> list[str]:
    """`n` jobs of two steps at 32 x 32 (unless `options` say otherwise) through `submit`; their ids."""
    prompts = tmp_path / f"prompts-{seed}.txt"
    prompts.write_text("".join(f"a lighthouse at night, take {i}\n" for i in range(n)))
    assert client_main(["--queue", url, "submit", str(API), "--prompts", str(prompts), "--seed", str(seed),
                        "--size", "32x32", "--set", f"{SAMPLER}.steps=2", *options]) == 0  # fmt: skip
    return capsys.readouterr().out.split()


def report(url: str) -> dict:
    from zimage_core.client.redis_queue import status

    return status(url, 1000)


def histories(servers) -> set[str]:
    return {prompt_id for server in servers for prompt_id in server.get("/history")}


@contextlib.contextmanager
def watched(servers):
    """The most prompts each server held at once (running and pending), asked every 20 ms while the block runs."""
    most, stop = [0] * len(servers), threading.Event()

    def watch():
        while not stop.is_set():
            for i, server in enumerate(servers):
                queue = server.get("/queue")
                most[i] = max(most[i], len(queue["queue_running"]) + len(queue["queue_pending"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield most
    finally:
        stop.set()
        watcher.join()


def finish(workers, logs, timeout: float):
    """Wait for `--burst` workers to end; any still running after `timeout` is stopped (never left behind)."""
    try:
        for worker in workers:
            worker.wait(timeout)
    finally:
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is None:
                stop_worker(worker, log)


def test_20_jobs_over_2_workers_finish_exactly_once_and_never_exceed_in_flight(queue_url, servers, tmp_path, capsys):
    """Twenty jobs, one worker per server with `--in-flight 2`, one shared output folder: every job finishes once
    (one log record, one image under its id, one prompt on one server), both servers work, and neither ever holds
    more than two of them."""
    before = histories(servers)
    ids = submit(queue_url, tmp_path, capsys, 20, 700)
    assert len(ids) == len(set(ids)) == 20
    out = tmp_path / "out"
    with watched(servers) as most:
        logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        workers = [start_worker(queue_url, s.url, out, log, "--in-flight", "2", "--burst")
                   for s, log in zip(servers, logs, strict=True)]  # fmt: skip
        finish(workers, logs, 300)
    logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
    assert [w.returncode for w in workers] == [0, 0], logs
    state = report(queue_url)
    assert state["counts"] == {"queued": 0, "running": 0, "finished": 20, "failed": 0}, (state["counts"], logs)
    records = [record for row in state["jobs"]["finished"] for record in row["log"]]
    assert sorted(r["job"] for r in records) == sorted(ids) and all(r["error"] is None for r in records)
    assert {r["seed"] for r in records} == set(range(700, 720)) and all(r["size"] == [32, 32] for r in records)
    images = sorted(p.name for p in out.glob("*.png"))
    assert [name.split("_")[0] for name in images] == sorted(ids), images  # one image per job, named by its id
    assert not list(out.glob(".*.part"))
    ran = histories(servers) - before
    assert ran == {r["prompt_id"] for r in records} and len(ran) == 20  # each job one prompt on one server
    assert set(state["servers"]) == {s.url for s in servers}, state["servers"]  # both servers took jobs
    assert all(s["per_minute"] > 0 for s in state["servers"].values())
    assert max(most) == 2 and all(m <= 2 for m in most), most
    jsonl = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in jsonl) == sorted(ids)


def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(queue_url, servers, tmp_path, capsys):
    """Worker A is killed while its server runs its job; worker B, on the other server, finds the job abandoned
    (no heartbeat) and runs it: every job ends with exactly one image, the killed one's log names B, and it used one
    of its retries."""
    ids = submit(queue_url, tmp_path, capsys, 2, 800, "--set", f"{SAMPLER}.steps=40", "--size", "128x128")
    out, (a, b) = tmp_path / "out", servers
    worker_a = start_worker(queue_url, a.url, out, tmp_path / "a.log")
    deadline = time.monotonic() + 60
    while not a.get("/queue")["queue_running"]:
        assert time.monotonic() < deadline and worker_a.poll() is None, (tmp_path / "a.log").read_text()
        time.sleep(0.05)
    (running,) = report(queue_url)["jobs"]["running"]
    worker_a.kill()
    worker_a.wait(20)
    worker_b = start_worker(queue_url, b.url, out, tmp_path / "b.log")
    try:
        deadline = time.monotonic() + 180
        while (state := report(queue_url))["counts"]["finished"] < 2 or any(
            w["state"] != "idle" for w in state["workers"] if w["name"].startswith(b.url.split("://")[1])
        ):
            assert time.monotonic() < deadline, (state, (tmp_path / "b.log").read_text())
            assert worker_b.poll() is None, (tmp_path / "b.log").read_text()
            time.sleep(0.5)
    finally:
        assert stop_worker(worker_b, tmp_path / "b.log") == 0  # a stop while idle ends the worker within seconds
    state = report(queue_url)
    assert state["counts"]["failed"] == 0, state
    finished = {row["id"]: row for row in state["jobs"]["finished"]}
    assert set(finished) == set(ids)
    retried = finished[running["id"]]
    assert [r["server"] for r in retried["log"]] == [b.url] and retried["log"][0]["error"] is None, retried
    assert retried["retries_left"] == 1  # submit's default of 2 retries, one taken by the abandoned run
    images = sorted(p.name.split("_")[0] for p in out.glob("*.png"))
    assert images == sorted(ids), images  # exactly one result per job: the killed run wrote none


def test_a_rejected_workflow_fails_at_once_without_retry(queue_url, servers, tmp_path, capsys):
    """A job the server refuses (a sampler with -1 steps fails validation) fails on its first try with the
    server's node error in its log; it is not queued again and nothing ran."""
    before = histories(servers)
    (job,) = submit(queue_url, tmp_path, capsys, 1, 900, "--set", f"{SAMPLER}.steps=-1")
    worker = start_worker(queue_url, servers[0].url, tmp_path / "out", tmp_path / "worker.log", "--burst")
    finish([worker], [tmp_path / "worker.log"], 120)
    state = report(queue_url)
    assert state["counts"] == {"queued": 0, "running": 0, "finished": 0, "failed": 1}, state
    (row,) = state["jobs"]["failed"]
    (record,) = row["log"]
    assert row["id"] == job and row["retries_left"] == 0 and record["prompt_id"] is None, row
    assert SAMPLER in record["error"]["node_errors"] and "steps" in record["error"]["message"], record["error"]
    assert histories(servers) == before and not list((tmp_path / "out").glob("*.png"))


def test_queue_errors_are_clear(capsys):
    """A Redis that is not there, and bad worker options, end with one line naming the problem."""
    pytest.importorskip("rq", reason='the queue extra: pip install "comfyui-zimage[queue]"')
    with pytest.raises(SystemExit, match="redis://127.0.0.1:1/0: cannot use this Redis"):
        client_main(["--queue", "redis://127.0.0.1:1/0", "status"])
    assert client_main(["--queue", "redis://127.0.0.1:1/0", "worker", "--server", "x", "--in-flight", "0"]) == 2
    assert "--in-flight must be at least 1" in capsys.readouterr().err
