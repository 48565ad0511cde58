"""`python -m zimage_core.client` against real ComfyUI servers (0.33.0, 0.8.0, 0.3.64), judged by what the server
holds: `--concurrency` by its queue watched from outside, a lost answer to a POST by the jobs it queued, and a prompt
deleted from its queue by an error rather than a wait. The stand-in server's versions of these are in
test_client.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
from comfyui import node_of, small, workflow
from workflow_api import shipped

from zimage_core.client import ServerError, failure
from zimage_core.client.__main__ import main as client_main

VANISHED = "no longer queued, running or in the server's history"
API = next(api for ui, api in shipped() if ui.stem == "zimage_turbo_text_to_image")
SAMPLER = node_of(json.loads(API.read_text()), "ZImageSampler")


def held(server) -> list[str]:
    """The ids of the prompts the server holds now, running then pending."""
    queue = server.get("/queue")
    return [item[1] for key in ("queue_running", "queue_pending") for item in queue[key]]


def quick(seed: int) -> dict:
    """A job of a second or two on CPU: most of it is the VAE, at its real widths."""
    return small(workflow("zimage_turbo_text_to_image"), steps=2, seed=seed, size=(32, 32))


@contextlib.contextmanager
def blocked(server, client, seed: int):
    """A prompt of 1000 steps at 1024 x 1024 running while the block runs, so that what is queued after it stays
    pending; interrupted at the end (the server outlives the test)."""
    slow = client.queue(small(workflow("zimage_turbo_text_to_image"), steps=1000, seed=seed, size=(1024, 1024)))
    deadline = time.monotonic() + 30
    while [item[1] for item in server.get("/queue")["queue_running"]] != [slow]:
        assert time.monotonic() < deadline, "the slow prompt did not start"
        time.sleep(0.02)
    try:
        yield slow
    finally:
        client.call("/interrupt", {})
        assert failure(client.wait(slow, timeout=60))["type"] == "execution_interrupted"


def test_concurrency_2_is_at_most_two_prompts_on_the_server(server, tmp_path):
    """Six jobs with `--concurrency 2`: the server's queue, asked every 20 ms while they run, holds two of them at
    its fullest, never more, and all six finish."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a harbour at dusk, boat {i}\n" for i in range(6)))
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(held(server))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = {}
    jobs = threading.Thread(target=lambda: result.update(code=client_main([
        str(API), "--server", server.url, "--prompts", str(prompts), "--seed", "600", "--size", "32x32", "--set",
        f"{SAMPLER}.steps=2", "--concurrency", "2", "--out", str(tmp_path / "out"), "--quiet"])))  # fmt: skip
    jobs.start()
    jobs.join(120)
    stop.set()
    watcher.join()
    records = [json.loads(line) for line in (tmp_path / "out" / "jobs.jsonl").read_text().splitlines()]
    ids = {r["prompt_id"] for r in records}
    assert result.get("code") == 0 and len(ids) == 6 and all(r["error"] is None for r in records), records
    assert max(map(len, seen)) == 2, max(map(len, seen))
    assert {i for snapshot in seen for i in snapshot} <= ids  # what was watched was these jobs
    for prompt_id in ids:
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"


def test_a_prompt_deleted_from_the_servers_queue_ends_with_an_error(server, client, tmp_path):
    """Deleted while pending behind a slow prompt: `wait` raises within a poll or two, and the command-line client
    whose job is deleted logs the error and exits 1."""
    with blocked(server, client, seed=610) as slow:
        deleted = client.queue(quick(611))
        client.call("/queue", {"delete": [deleted]})
        start = time.monotonic()
        with pytest.raises(ServerError, match=VANISHED) as e:
            client.wait(deleted, timeout=60)
        assert time.monotonic() - start < 6 and e.value.details["error"]["type"] == "prompt_vanished"

        result = {}
        job = threading.Thread(target=lambda: result.update(code=client_main([
            str(API), "--server", server.url, "--seed", "612", "--size", "32x32", "--set", f"{SAMPLER}.steps=2",
            "--out", str(tmp_path / "out"), "--quiet"])))  # fmt: skip
        job.start()
        deadline = time.monotonic() + 30
        while len(held(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        (pending,) = [i for i in held(server) if i != slow]
        client.call("/queue", {"delete": [pending]})
        job.join(30)
        (record,) = [json.loads(line) for line in (tmp_path / "out" / "jobs.jsonl").read_text().splitlines()]
        assert result.get("code") == 1 and record["prompt_id"] == pending
        assert record["error"]["error"]["type"] == "prompt_vanished" and VANISHED in record["error"]["message"]


def test_a_lost_answer_is_not_sent_again_and_an_unsent_prompt_is(server, client, monkeypatch):
    """Two POSTs that get no answer, one that reached the server and one that did not (made so by wrapping the
    client's one request): the first is not sent again, the second is, and each is queued and runs exactly once."""
    attempts, send = [], client.send

    def lossy(path, body=None, raw=False, raw_body=None):
        if path != "/prompt":
            return send(path, body, raw, raw_body)
        first = body["prompt_id"] not in attempts
        attempts.append(body["prompt_id"])
        if first and body["prompt"][SAMPLER]["inputs"]["seed"] == 622:
            raise ConnectionRefusedError("refused before sending")
        answer = send(path, body, raw, raw_body)
        if first:
            raise TimeoutError("the answer was lost")
        return answer

    with blocked(server, client, seed=620):
        monkeypatch.setattr(client, "send", lossy)
        lost, unsent = client.queue(quick(621)), client.queue(quick(622))
        assert attempts == [lost, unsent, unsent]  # the lost one: asked about, not sent again
        pending = held(server)[1:]
        assert pending.count(lost) == 1 and pending.count(unsent) == 1, pending
    for prompt_id in (lost, unsent):
        events = []
        assert failure(client.wait(prompt_id, on_event=events.append, timeout=60)) is None
        assert [m["type"] for m in events].count("execution_start") == 1
        assert list(server.get(f"/history/{prompt_id}")) == [prompt_id]
    assert lost not in held(server) and unsent not in held(server)
