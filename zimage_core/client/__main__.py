"""`python -m zimage_core.client`: the plain client (its jobs on one server, an in-process queue), or with
`--queue redis://...` the queue across servers (`redis_queue.py`)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import Client, ServerError, add_job_options, job_prompt, jobs_of, parse_set, run_job
from . import __doc__ as CLIENT_DOC


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--queue")
    known, rest = pre.parse_known_args(argv)
    if known.queue:  # the jobs go through Redis to workers, one per server (redis_queue.py)
        from .redis_queue import main as queue_main

        return queue_main(known.queue, rest)
    p = argparse.ArgumentParser(prog="python -m zimage_core.client", description=CLIENT_DOC.split("\n\n")[0],
                                epilog="--queue redis://HOST:PORT/DB {submit,worker,status} ...: one queue in front of "
                                       "several servers (--queue URL --help)")  # fmt: skip
    add_job_options(p)
    p.add_argument("--server", default="127.0.0.1:8188", help="host:port or URL of the ComfyUI server")
    p.add_argument("--token", default=os.environ.get("COMFYUI_TOKEN"),
                   help="bearer token for a server behind an authenticating proxy (default: $COMFYUI_TOKEN)")  # fmt: skip
    p.add_argument("--upload", action="append", default=[], metavar="NODE.INPUT=IMAGE",
                   help="upload IMAGE to the server's input folder and set the input (a LoadImage's image) to it")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=1, help="most prompts in flight at once (default 1)")
    p.add_argument("--retries", type=int, default=5, help="retries of a request on connection errors")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="folder for images and jobs.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    try:
        jobs = jobs_of(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    client = Client(args.server, args.token, args.retries)
    try:
        uploads = [(node, name, client.upload(Path(file))) for node, name, file in map(parse_set, args.upload)]
        jobs = [job_prompt(job, uploads) for job in jobs]
    except (OSError, ValueError, ServerError, ConnectionError) as e:
        print(f"error: --upload: {e}", file=sys.stderr)
        return 2
    client.listen()
    lock = threading.Lock()
    with open(args.out / "jobs.jsonl", "a", encoding="utf-8") as log, ThreadPoolExecutor(args.concurrency) as pool:
        results = list(
            pool.map(lambda j: run_job(client, j[0], j[1], args.out, log, lock, args.quiet), enumerate(jobs))
        )
    client.close()
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} jobs done; log: {args.out / 'jobs.jsonl'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
