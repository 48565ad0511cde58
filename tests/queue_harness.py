"""What the queue's tests and bench share: a real redis-server on a free loopback port, and queue workers as
separate processes (`python -m zimage_core.client --queue URL worker ...`), as users run them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from comfyui import free_port

ROOT = Path(__file__).resolve().parents[1]
REDIS = shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(folder: Path):
    """A throwaway redis-server (no persistence) bound to 127.0.0.1; yields its URL."""
    port = free_port()
    args = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    with open(folder / "redis.log", "wb") as log:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        import redis

        url, deadline = f"redis://127.0.0.1:{port}/0", time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(20)


def start_worker(url: str, server_url: str, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """One worker process on one server; its output goes to `log`."""
    args = [sys.executable, "-X", "faulthandler", "-m", "zimage_core.client", "--queue", url, "worker",
            "--server", server_url, "--out", str(out), *extra]  # fmt: skip
    with open(log, "ab") as sink:
        return subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)


def stop_worker(worker: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    """Ctrl-C's path (SIGTERM: after the current jobs). A worker still running after `timeout` is made to print its
    threads' stacks into `log` (faulthandler, on SIGABRT), killed, and reported with the log's end."""
    worker.terminate()
    try:
        return worker.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGABRT)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        raise AssertionError(f"the worker did not stop in {timeout} s:\n{log.read_text()[-6000:]}") from None
