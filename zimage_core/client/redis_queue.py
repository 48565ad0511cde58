"""One queue in front of several ComfyUI servers: RQ on Redis (`python -m zimage_core.client --queue URL ...`).

`submit` puts one job per prompt line on the queue; `worker --server URL --in-flight N` runs N RQ workers (threads
of one process) that take jobs and run them on that server, so a server never holds more than N of them; `status`
lists the jobs with their log lines, the queue's depth and each server's throughput.

A job takes effect once from the user's view: its images are written under its job id, atomically, so a retried job
rewrites the same names; a worker that dies mid-job stops beating, and RQ's cleanup hands its job to another worker
(RQ's abandoned-job retry); a job whose prompt the server refused or failed is not retried: the same graph fails
the same way elsewhere. Only a lost server (no answer, a prompt gone from its queue) is worth another try.

`rq` and `redis` are the `queue` extra, imported only here. Workers are RQ's SimpleWorker (no fork: they run on
Windows too) with a heartbeat thread while a job runs, so an abandoned job is found in seconds, not after its timeout.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from . import Client, add_job_options, execute, job_prompt, jobs_of, parse_set

QUEUE = "zimage"
BEAT = 5  # seconds between a busy worker's heartbeats
GRACE = 10  # a job whose worker missed its heartbeats this long after the last one is abandoned
RETRIED = ("ConnectionError", "TimeoutError", "prompt_vanished")  # the server was lost, not the prompt refused

_context = threading.local()  # each worker thread's server, output folder and name, for `perform`


class JobFailed(Exception):
    """The job's error, as its log record gives it."""


def connect(url: str):
    """A Redis connection, checked; errors say what to install or which address failed."""
    try:
        import redis
        import rq  # noqa: F401 - the extra's other half, checked here once
    except ImportError as e:
        raise SystemExit(f'error: --queue needs rq and redis: pip install "comfyui-zimage[queue]" ({e})') from None
    try:
        connection = redis.Redis.from_url(url)
        connection.ping()
    except (ValueError, redis.exceptions.RedisError) as e:
        raise SystemExit(f"error: --queue {url}: cannot use this Redis: {e}") from None
    return connection


def perform(graph: dict, uploads: list = ()) -> dict:
    """The job, run by a worker thread: `uploads` (node, input, file name, base64 bytes) sent to this worker's server
    and set in the graph, the prompt run there, its images saved under the job's id. Every attempt adds its record
    to the job's log (its meta), which `status` prints."""
    from rq import get_current_job

    job, ctx = get_current_job(), _context.value
    sent = [
        (node, name, ctx["client"].upload(Path(file), base64.b64decode(data))) for node, name, file, data in uploads
    ]
    graph = job_prompt(graph, sent)
    name = lambda node, index, ref: ctx["out"] / f"{job.id}_{node}_{index}{Path(ref['filename']).suffix}"
    record = {"job": job.id, **execute(ctx["client"], graph, name), "worker": ctx["name"], "server": ctx["server"]}
    record["ended"] = round(time.time(), 3)
    job.meta.setdefault("log", []).append(record)
    job.save_meta()
    with ctx["lock"], open(ctx["out"] / "jobs.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
    error = record["error"]
    if error is None:
        return record
    if not {error.get("type"), (error.get("error") or {}).get("type")} & set(RETRIED):
        job.retries_left = 0  # read by RQ's failure handling right after this raises: failed, not retried
    raise JobFailed(json.dumps(error, ensure_ascii=False))


def submit(url: str, jobs: list[dict], retries: int, timeout: int, uploads: list = ()) -> list[str]:
    """Enqueue the jobs (each with the `uploads`, which every worker sends to its own server); their ids, which
    order them by submission and name their images."""
    from rq import Queue, Retry

    queue, stamp = Queue(QUEUE, connection=connect(url)), time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    ids = []
    for i, graph in enumerate(jobs):
        job = queue.enqueue(perform, graph, list(uploads), job_id=f"{stamp}-{i:05d}",
                            retry=Retry(max=retries) if retries else None, job_timeout=timeout, meta={"log": []},
                            result_ttl=7 * 86400, failure_ttl=7 * 86400, description=f"job {i}")  # fmt: skip
        ids.append(job.id)
    return ids


def worker_class():
    """RQ's SimpleWorker, made to run in a thread and to beat while a job runs."""
    from rq import SimpleWorker
    from rq.timeouts import TimerDeathPenalty
    from rq.worker import WorkerStatus

    class ServerWorker(SimpleWorker):
        death_penalty_class = TimerDeathPenalty  # the job timeout, without signals: works in any thread, any OS

        def _install_signal_handlers(self):
            """The process's main thread handles Ctrl-C for all its workers (`work`)."""

        def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
            """Waits in slices of `timeout`, so that a stop asked from the main thread ends an idle worker within
            seconds (RQ's own wait ends only by a signal in the thread it runs in); None ends the work loop."""
            if timeout is None:  # --burst: one look at the queue
                return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
            while not self._stop_requested:
                job = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
                if job is not None:
                    return job
            return None

        def subscribe(self):
            """RQ's command channel (shutdown, stop a job), read in 1 s waits instead of RQ's 60 s: closing it at
            the end waits for the reader's current wait, which kept finished `--burst` workers alive a minute."""
            self.pubsub = self.connection.pubsub()
            self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
            self.pubsub_thread = self.pubsub.run_in_thread(
                sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
            )

        def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
            return BEAT + GRACE

        def execute_job(self, job, queue):
            execution = self.prepare_execution(job)
            done = threading.Event()

            def beat():
                while not done.wait(BEAT):
                    self.maintain_heartbeats(job, execution)

            beating = threading.Thread(target=beat, daemon=True)
            beating.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                done.set()
                beating.join()
            self.set_state(WorkerStatus.IDLE)

    return ServerWorker


def work(url: str, server: str, in_flight: int, out: Path, token: str | None, burst: bool) -> int:
    """`in_flight` workers on one server, each a thread with its own connections; returns when they stop (Ctrl-C:
    after their current jobs; `burst`: when the queue is empty)."""
    from redis import Redis
    from rq import Queue

    connect(url)
    out.mkdir(parents=True, exist_ok=True)
    lock, host = threading.Lock(), server.split("://")[-1].rstrip("/")
    workers = []
    for i in range(in_flight):
        connection = Redis.from_url(url)
        name = f"{host}#{i}@{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        workers.append(worker_class()([Queue(QUEUE, connection=connection)], connection=connection, name=name,
                                      worker_ttl=BEAT + 15,  # RQ waits for a job in slices of worker_ttl - 15 s
                                      maintenance_interval=BEAT, job_monitoring_interval=BEAT))  # fmt: skip

    def run(worker):
        client = Client(server, token)
        client.listen()
        _context.value = {"client": client, "server": server, "out": out, "lock": lock, "name": worker.name}
        try:
            worker.work(burst=burst, logging_level="WARNING")
        finally:
            client.close()

    def stop(signum, frame):
        print("stopping after the current jobs (again to quit now)", file=sys.stderr)
        for worker in workers:
            worker._stop_requested = True
        signal.signal(signum, signal.SIG_DFL)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(0.5)
    return 0


def status(url: str, limit: int) -> dict:
    """Queued, running, finished and failed jobs (the newest `limit` of each) with their log records, the queue's
    depth, the workers, and per server its finished jobs and jobs per minute over the span they ran in."""
    from rq import Queue, Worker
    from rq.job import Job

    connection = connect(url)
    queue = Queue(QUEUE, connection=connection)
    registries = {"queued": queue.job_ids, "running": queue.started_job_registry.get_job_ids(),
                  "finished": queue.finished_job_registry.get_job_ids(),
                  "failed": queue.failed_job_registry.get_job_ids()}  # fmt: skip
    jobs, servers = {}, {}
    for state, ids in registries.items():
        rows = []
        for job in Job.fetch_many(ids, connection=connection):
            if job is None:
                continue
            log = job.meta.get("log", [])
            rows.append({"id": job.id, "retries_left": job.retries_left, "log": log})
            for record in log if state == "finished" else ():
                if record["error"] is None:
                    span = servers.setdefault(record["server"], {"jobs": 0, "first": record["ended"], "last": 0.0})
                    span["jobs"] += 1
                    span["first"] = min(span["first"], record["ended"] - record["seconds"])
                    span["last"] = max(span["last"], record["ended"])
        jobs[state] = rows[max(len(rows) - limit, 0) :]
    per_minute = lambda s: round(60 * s["jobs"] / max(s["last"] - s["first"], 1e-3), 2)
    throughput = {server: {"jobs": s["jobs"], "per_minute": per_minute(s)} for server, s in servers.items()}
    state = lambda w: getattr(w.get_state(), "value", w.get_state())  # a WorkerStatus, or a plain string
    workers = [{"name": w.name, "state": state(w), "job": w.get_current_job_id()} for w in Worker.all(queue=queue)]
    return {"depth": len(registries["queued"]), "counts": {k: len(v) for k, v in registries.items()},
            "jobs": jobs, "servers": throughput, "workers": workers}  # fmt: skip


def print_status(report: dict):
    counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
    print(f"queue depth {report['depth']}; jobs: {counts}")
    for worker in report["workers"]:
        print(f"worker {worker['name']}: {worker['state']}" + (f", job {worker['job']}" if worker["job"] else ""))
    for server, s in report["servers"].items():
        print(f"server {server}: {s['jobs']} jobs finished, {s['per_minute']} per minute")
    for state, rows in report["jobs"].items():
        for row in rows:
            print(f"{state} {row['id']} ({len(row['log'])} attempts logged, {row['retries_left'] or 0} retries left)")
            for record in row["log"]:
                print("  " + json.dumps(record, ensure_ascii=False))


def main(url: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m zimage_core.client --queue {url}",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    commands = p.add_subparsers(dest="command", required=True)
    s = commands.add_parser("submit", help="put one job per prompt line on the queue")
    add_job_options(s)
    s.add_argument("--upload", action="append", default=[], metavar="NODE.INPUT=IMAGE",
                   help="an image each worker uploads to its server, set as the input (a LoadImage's image)")  # fmt: skip
    s.add_argument("--retries", type=int, default=2, help="tries after the first when a worker or server is lost")
    s.add_argument("--job-timeout", type=int, default=3600, help="seconds a job may run (default 3600)")
    w = commands.add_parser("worker", help="run jobs on one ComfyUI server")
    w.add_argument("--server", required=True, help="host:port or URL of this worker's ComfyUI server")
    w.add_argument("--in-flight", type=int, default=1, help="most prompts on the server at once (default 1)")
    w.add_argument("--out", type=Path, default=Path("outputs"), help="folder for images and jobs.jsonl")
    w.add_argument("--token", default=os.environ.get("COMFYUI_TOKEN"),
                   help="bearer token for a server behind an authenticating proxy (default: $COMFYUI_TOKEN)")  # fmt: skip
    w.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    t = commands.add_parser("status", help="jobs, their logs, the queue's depth and each server's throughput")
    t.add_argument("--json", action="store_true", help="one JSON object")
    t.add_argument("--jobs", type=int, default=20, help="the newest N jobs of each state (default 20)")
    args = p.parse_args(argv)
    if args.command == "submit":
        try:
            jobs = jobs_of(args)
            uploads = [(node, name, Path(file).name, base64.b64encode(Path(file).read_bytes()).decode())
                       for node, name, file in map(parse_set, args.upload)]  # fmt: skip
            for node, name, _, _ in uploads:
                job_prompt(jobs[0], [(node, name, "")])  # the node and input exist
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ids = submit(url, jobs, args.retries, args.job_timeout, uploads)
        print("\n".join(ids))
        print(f"{len(ids)} jobs queued on {url}", file=sys.stderr)
        return 0
    if args.command == "worker":
        if args.in_flight < 1:
            print("error: --in-flight must be at least 1", file=sys.stderr)
            return 2
        return work(url, args.server, args.in_flight, args.out, args.token, args.burst)
    report = status(url, args.jobs)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print_status(report)
    return 0
