"""Seconds per image inside ComfyUI: our MODEL (Z-Image Transformer Loader) and the host's native Z-Image
(UNETLoader) under the same KSampler, on one server, the same file, prompts interleaved.

The transformer is a slice of the real one written as a ComfyUI single file (width 3840, 30 heads, `--layers` main
layers and the 2 + 2 refiners, so the host detects it as Z-Image; a 64-wide caption projection so the servers'
small Qwen3 feeds both) with seeded random weights, loaded in fp32 by both on a CPU (the host's default there).
Each prompt is text encode (cached after the first), KSampler (euler, simple, `--steps`, a new seed each time, so it
always runs) and Save Latent: the time is the host's own, from its execution-start to execution-success messages.

    python bench/comfyui_speed.py --comfyui HOST [--layers 2] [--sizes 512 1024] [--steps 2] [--reps 3]
                                  [--out bench/out/comfyui_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout, 0.8.0 or later")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "comfyui_speed.json")
    return p.parse_args()


def write_slice(path: Path, layers: int):
    import torch
    from helpers import REAL, reference_transformer, to_comfy
    from safetensors.torch import save_file

    ref = reference_transformer(dict(REAL, n_layers=layers, cap_feat_dim=64), seed=0)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in to_comfy(ref.state_dict()).items()}, path)


def graph(loader: str, size: int, steps: int, seed: int) -> dict:
    model = {
        "native": {"class_type": "UNETLoader", "inputs": {"unet_name": "z_image_slice.safetensors",
                                                          "weight_dtype": "default"}},
        "ours": {"class_type": "ZImageTransformerLoader", "inputs": {"name": "z_image_slice.safetensors",
                                                                      "weight_dtype": "fp32", "device": "default"}},
    }[loader]  # fmt: skip
    return {
        "1": model,
        "2": {"class_type": "ZImageTextEncoderLoader",
              "inputs": {"name": "qwen_3_4b.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "3": {"class_type": "ZImageTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "a lighthouse in a storm",
                                                           "max_length": 512}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"bench_{loader}"}},
    }  # fmt: skip


def host_seconds(entry: dict) -> float:
    """Execution start to success, from the host's own status messages (ms timestamps)."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def main():
    args = parse()
    if not args.comfyui:
        sys.exit("give --comfyui HOST (a ComfyUI checkout, 0.8.0 or later) or set COMFYUI_PATH")
    from comfyui import Server, version, write_models

    from zimage_core.client import Client

    host = Path(args.comfyui).resolve()
    work = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
    models = work / "models-src"
    write_models(models)
    write_slice(models / "z_image_slice.safetensors", args.layers)
    server = Server(host, work / "base", models)
    (work / "base" / "models" / "diffusion_models" / "z_image_slice.safetensors").symlink_to(
        models / "z_image_slice.safetensors"
    )
    server.start()
    client = Client(server.url)
    rows, seed = [], 0
    try:
        for size in args.sizes:
            times = {"native": [], "ours": []}
            for rep in range(args.reps + 1):  # the first round loads the models and is not counted
                for loader, runs in times.items():
                    seed += 1
                    entry = client.wait(client.queue(graph(loader, size, args.steps, seed)), timeout=3600)
                    if entry["status"].get("status_str") != "success":
                        raise RuntimeError(f"{loader} at {size}: {entry['status']}\n{server.tail()}")
                    if rep:
                        runs.append(host_seconds(entry))
            for loader, runs in times.items():
                rows.append({"size": size, "model": loader, "seconds_per_image": statistics.median(runs), "runs": runs})
            rows[-1]["native_over_ours"] = rows[-2]["seconds_per_image"] / rows[-1]["seconds_per_image"]
    finally:
        client.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the slice file alone is gigabytes
    report = {"comfyui": version(host), "layers": args.layers, "steps": args.steps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"ComfyUI {report['comfyui']}, KSampler euler/simple {args.steps} steps, slice with {args.layers} layers, fp32"
    )
    for r in rows:
        ratio = f"  native / ours {r['native_over_ours']:.3f}x" if "native_over_ours" in r else ""
        print(f"{r['size']:>5}² {r['model']:>7} {r['seconds_per_image']:8.2f} s/image{ratio}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
