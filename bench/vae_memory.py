"""Peak memory and seconds of decoding with the real-width Flux VAE, whole image vs in bands, at 1024² and 2048².

Each decode runs in a fresh process (random weights, fp32 by default, CPU unless --device cuda); memory is the
peak above what the process held before decoding (RSS high-water mark on the CPU, torch's peak allocation on
CUDA), also given in full-resolution feature maps of the first level (128 channels), which is how
`zimage_core.vae.PEAK_MAPS` is calibrated. The banded result is compared with the whole-image one in the same run.

    python bench/vae_memory.py [--sizes 1024 2048] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, re, sys, time, torch
from pathlib import Path
from zimage_core.vae import VAE, VAEConfig
size, device, dtype = int(sys.argv[1]), sys.argv[2], {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]

def hwm():
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

torch.manual_seed(0)
vae = VAE(VAEConfig()).to(device, dtype).eval()
z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(device)
out = {}
for mode in ("whole", "bands"):
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    before = torch.cuda.memory_allocated() if device == "cuda" else hwm()
    start = time.perf_counter()
    image = vae.decode(z, tiled=mode == "bands")
    if device == "cuda":
        torch.cuda.synchronize()
    out[mode] = {"seconds": time.perf_counter() - start, "peak_bytes": hwm() - before}
    out[mode + "_image"] = image
    del image
feature_map = size * size * 128 * torch.finfo(dtype).bits // 8
diff = (out.pop("whole_image") - out.pop("bands_image")).abs().max().item()
print(json.dumps({"size": size, "feature_map_bytes": feature_map, "max_diff_255": diff * 255, **out}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, "-c", RUN, str(size), args.device, args.dtype]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if result.returncode:
            print(f"{size}: failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{'image':>10}  {'whole: s, peak GB (maps)':<28}{'bands: s, peak GB (maps)':<28}bands/whole  max diff")
    for r in rows:
        cells = [
            f"{r[m]['seconds']:6.1f} s {r[m]['peak_bytes'] / 1e9:6.2f} GB ({r[m]['peak_bytes'] / r['feature_map_bytes']:.1f})"
            for m in ("whole", "bands")
        ]
        ratio = r["bands"]["peak_bytes"] / r["whole"]["peak_bytes"]
        print(f"{r['size']:>5}²{'':4}  {cells[0]:<28}{cells[1]:<28}{ratio:10.2f}x  {r['max_diff_255']:.4f}/255")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / f"vae_memory_{args.device}_{args.dtype}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
