"""Jobs per minute through the Redis queue with one and with two ComfyUI servers (one worker each), and the plain
client on one server beside them, on the same jobs: the tiny random-weight models of the server tests, the newest
host, a throwaway redis-server. On a CPU the servers share its cores, so the scaling ratio says what the queue adds or
loses, not what two GPUs give; each server gets `--threads` torch threads (half the cores by default), the CPU's
stand-in for a GPU of its own: two servers oversubscribing two cores ran 3x slower than one.

    python bench/queue_throughput.py [--jobs 20] [--in-flight 2] [--size 64] [--steps 2]
                                     [--out bench/out/queue_throughput.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads per server (default: half the cores, never oversubscribed)")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "queue_throughput.json")
    args = p.parse_args()

    import redis
    from comfyui import NEWEST, Server, host, node_of, write_models
    from queue_harness import redis_server, start_worker
    from workflow_api import shipped

    from zimage_core.client.__main__ import main as client_main
    from zimage_core.client.redis_queue import status

    api = next(api for ui, api in shipped() if ui.stem == "zimage_turbo_text_to_image")
    sampler = node_of(json.loads(api.read_text()), "ZImageSampler")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        write_models(tmp / "models")
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(f"a lighthouse at night, take {i}\n" for i in range(args.jobs)))
        job = [str(api), "--prompts", str(prompts), "--seed", "1", "--size", f"{args.size}x{args.size}",
               "--set", f"{sampler}.steps={args.steps}"]  # fmt: skip
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it: each its share of the cores
        servers = [Server(host(NEWEST), tmp / f"server-{i}", (tmp / "models")).start() for i in range(2)]
        rows, per_server, lags = {}, {}, {}
        try:
            with redis_server(tmp) as url:
                for server in servers:  # the first prompt of each server loads the models: not timed
                    assert client_main([*job[:1], "--server", server.url, "--size", "32x32", "--quiet",
                                        "--out", str(tmp / "warm")]) == 0  # fmt: skip
                start = time.monotonic()
                assert client_main([*job, "--server", servers[0].url, "--concurrency", str(args.in_flight),
                                    "--quiet", "--out", str(tmp / "direct")]) == 0  # fmt: skip
                rows["plain client, 1 server"] = args.jobs / (time.monotonic() - start) * 60
                for n in (1, 2):
                    redis.Redis.from_url(url).flushdb()
                    with contextlib.redirect_stdout(io.StringIO()):  # the job ids
                        assert client_main(["--queue", url, "submit", *job]) == 0
                    start = time.monotonic()
                    workers = [start_worker(url, s.url, tmp / f"queue-{n}", tmp / f"worker-{n}-{i}.log",
                                            "--in-flight", str(args.in_flight), "--burst")
                               for i, s in enumerate(servers[:n])]  # fmt: skip
                    for worker in workers:
                        assert worker.wait(1800) == 0
                    elapsed = time.monotonic() - start
                    report = status(url, args.jobs)
                    assert report["counts"]["finished"] == args.jobs
                    rows[f"queue, {n} server{'s' * (n > 1)}"] = args.jobs / elapsed * 60
                    per_server[n] = report["servers"]
                    records = [r for row in report["jobs"]["finished"] for r in row["log"]]
                    wall = time.time() - (time.monotonic() - start)  # the clock time the workers started at
                    lags[n] = {"first job start": round(min(r["ended"] - r["seconds"] for r in records) - wall, 1),
                               "last job end": round(max(r["ended"] for r in records) - wall, 1),
                               "workers ended": round(elapsed, 1)}  # fmt: skip
        finally:
            for server in servers:
                server.stop()
    result = {"jobs": args.jobs, "in_flight": args.in_flight, "threads_per_server": args.threads, "size": args.size,
              "steps": args.steps, "jobs_per_minute": {k: round(v, 1) for k, v in rows.items()},
              "per_server": per_server, "seconds": lags,
              "scaling_2_vs_1": round(rows["queue, 2 servers"] / rows["queue, 1 server"], 2),
              "queue_vs_plain_client": round(rows["queue, 1 server"] / rows["plain client, 1 server"], 2)}  # fmt: skip
    print("| run | jobs per minute |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")
    print(
        f"2 servers / 1 server: {result['scaling_2_vs_1']}x; queue / plain client: {result['queue_vs_plain_client']}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
