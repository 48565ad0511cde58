"""Load seconds and peak RSS / weight bytes for the full-size Z-Image transformer and Qwen3-4B text encoder in
every layout, quantized ones included (ComfyUI's int8/mxfp8/nvfp4 and mixed fp8/fp4 files, GGUF), against the
loaders diffusers uses (diffusers for the transformer, transformers for Qwen3; neither loads fp8 or quantized files).

The files are sparse (a real header with the released names and shapes, a data region that is a hole), so the
bench needs no download and almost no disk; reading a hole costs what reading cached pages costs, so seconds are
a floor for a disk-bound load. Each load runs in a fresh process; the peer runs in the same way on the layouts
it can load, under a watchdog that stops it before it takes the machine down. The budget is the issue's: peak load
RSS at most 1.1 x the compact bytes held + 0.5 GB.

    python bench/load_memory.py [--dir /tmp/zimage-bench] [--component transformer|text_encoder] [--no-peer]
                                [--layouts SUBSTRING ...] [--limit-gb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PEER = """
import json, resource, sys, time, torch
from diffusers import ZImageTransformer2DModel
path, config = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if path.endswith(".safetensors"):
    model = ZImageTransformer2DModel.from_single_file(path, config=config, subfolder="transformer", torch_dtype=torch.bfloat16)
else:
    model = ZImageTransformer2DModel.from_pretrained(path, subfolder=None if path.endswith("transformer") else "transformer", torch_dtype=torch.bfloat16)
seconds = time.perf_counter() - start
held = sum(p.nbytes for p in model.parameters())
print(json.dumps({"load_seconds": seconds, "held_bytes": held, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
PEER_TEXT_ENCODER = """
import json, resource, sys, time, torch
from transformers import AutoModel
start = time.perf_counter()
model = AutoModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
for p in model.parameters():  # the weights stay memory-mapped until used: read each once, as a first run would
    p.sum()
seconds = time.perf_counter() - start
held = sum(p.nbytes for p in model.parameters())
print(json.dumps({"load_seconds": seconds, "held_bytes": held, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def run(cmd: list[str], limit: float) -> dict:
    """Run `cmd`, which prints a dict last; kill it if its RSS passes `limit` bytes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = []

    def watch():
        while proc.poll() is None:
            if rss_bytes(proc.pid) > limit:
                killed.append(True)
                proc.kill()
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    if killed:
        return {"error": f"stopped at RSS > {limit / 1e9:.0f} GB"}
    if proc.returncode:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:120]}
    text = out.strip()
    return json.loads(text.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zimage-bench")
    parser.add_argument("--no-peer", action="store_true", help="skip the peers")
    parser.add_argument("--component", choices=["transformer", "text_encoder"], help="bench only this component")
    parser.add_argument("--layouts", nargs="+", default=[""], metavar="SUBSTRING",
                        help="bench only the layouts whose name contains one of these (case-insensitive)")  # fmt: skip
    parser.add_argument("--limit-gb", type=float, default=20.0, help="stop a load whose RSS passes this")
    args = parser.parse_args()

    from helpers import quantized_sparse_layouts, qwen3_quantized_sparse_layouts, qwen3_sparse_layouts, sparse_layouts

    args.dir.mkdir(parents=True, exist_ok=True)
    config_dir = str(args.dir / "Z-Image-Turbo")
    limit = args.limit_gb * 1e9
    rows, layouts = [], []
    for build, component, peerless in (
        (sparse_layouts, "transformer", False), (quantized_sparse_layouts, "transformer", True),
        (qwen3_sparse_layouts, "text_encoder", False), (qwen3_quantized_sparse_layouts, "text_encoder", True),
    ):  # fmt: skip
        if args.component in (None, component):
            layouts += [(name, path, component, peerless) for name, path in build(args.dir).items()]
    for name, path, component, peerless in layouts:
        if not any(part.lower() in name.lower() for part in args.layouts):
            continue
        cmd = [sys.executable, "-m", "zimage_core", "inspect", "--json", "--component", component, str(path)]
        ours = run(cmd, limit)
        peer = {}
        if args.no_peer or peerless or "fp8" in name or (component == "text_encoder" and path.is_file()):
            pass  # neither peer loads fp8 or quantized files; transformers has no single-file loading
        elif component == "transformer":
            peer = run([sys.executable, "-c", PEER, str(path), config_dir], limit)
        else:
            peer = run([sys.executable, "-c", PEER_TEXT_ENCODER, str(path)], limit)
        rows.append((name, ours, peer))
        print(f"{name}: ours {ours}\n    peer {peer}", file=sys.stderr, flush=True)

    def cell(r: dict) -> str:
        if not r:
            return "-"
        if "error" in r:
            return r["error"]
        return f"{r['load_seconds']:6.1f} s  {r['peak_rss_bytes'] / 1e9:5.2f} GB  {r['peak_rss_bytes'] / r['held_bytes']:.2f}x"

    print(f"\n{'layout (full size, sparse)':<52} {'held':>8}  {'ours: load, peak RSS, RSS/held':<32} peer")
    for name, ours, peer in rows:
        held = f"{ours['held_bytes'] / 1e9:.2f} GB" if "held_bytes" in ours else "-"
        budget = ""
        if "held_bytes" in ours:
            ok = ours["peak_rss_bytes"] <= 1.1 * ours["held_bytes"] + 0.5e9
            budget = "" if ok else "  OVER 1.1x+0.5GB"
        print(f"{name:<52} {held:>8}  {cell(ours):<32} {cell(peer)}{budget}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "load_memory.json").write_text(
        json.dumps([{"layout": n, "ours": o, "peer": p} for n, o, p in rows], indent=2)
    )


if __name__ == "__main__":
    main()
