"""Command line: `python -m zimage_core inspect PATH` and `python -m zimage_core smoke`."""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .loaders import components, load_text_encoder, load_transformer, load_vae
from .transformer import TransformerConfig, ZImageTransformer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


LOADERS = {"transformer": load_transformer, "text_encoder": load_text_encoder, "vae": load_vae}


def reset_peak_rss():
    """Start a new peak-RSS measurement (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def inspect(args) -> int:
    """Load each component at the path, one at a time, and report it; JSON output is one object per line."""
    config = None
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build or machine has no CUDA device")
    found = [args.component] if args.component else components(args.path)
    if config is not None and len(found) > 1:
        raise ValueError(f"{args.path} holds {' and '.join(found)}: say which one --config is for with --component")
    for component in found:
        gc.collect()
        reset_peak_rss()
        start = time.perf_counter()
        model = LOADERS[component](
            args.path, args.device, DTYPES[args.dtype], WEIGHT_DTYPES.get(args.weight_dtype), config=config
        )
        info = {**model.info.as_dict(), "load_seconds": round(time.perf_counter() - start, 3)}
        info["peak_rss_bytes"] = peak_rss_bytes()
        del model
        print(json.dumps(info) if args.json else report(info), flush=True)
    return 0


def report(info: dict) -> str:
    gb = 1e9
    if info["kind"] == "Z-Image transformer":
        specific = [
            ("variant", f"{info['variant']} ({info['variant_reason']})"),
            ("naming", f"{info['naming']} tensor names"),
        ]
    elif info["kind"] == "Flux VAE":
        specific = [("naming", f"{info['naming']} tensor names"), ("downscale", f"{info['factor']}x")]
    else:
        layers = f"{info['layers_used']} of {info['config']['num_hidden_layers']} (Z-Image reads the second-to-last)"
        specific = [("model", info["model"]), ("layers used", layers), ("tokenizer", info["tokenizer"])]
    rows = [
        ("path", info["path"]),
        ("kind", info["kind"]),
        *specific,
        ("layout", info["layout"] + (f", prefix '{info['prefix']}'" if info["prefix"] else "")),
        ("file dtypes", ", ".join(f"{k} x{v}" for k, v in info["file_dtypes"].items())),
        ("quantization", info["quantization"]),
        ("config", ", ".join(f"{k} {v}" for k, v in info["config"].items() if v is not None)),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.2f} B)"),
        ("held", f"{info['held_bytes'] / gb:.2f} GB on {info['device']}, computing in {info['dtype']}"),
        ("load time", f"{info['load_seconds']:.1f} s"),
        ("peak RSS", f"{info['peak_rss_bytes'] / gb:.2f} GB ({info['peak_rss_bytes'] / info['held_bytes']:.2f} x held)"),
    ]  # fmt: skip
    return "\n".join(f"{key:<13} {value}" for key, value in rows) + "\n"


def smoke(args) -> int:
    """Build a small random-weight transformer and run one forward: proves the install without any weights."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=256, n_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=64)
    model = ZImageTransformer(cfg).to(args.device).eval()
    latents = torch.randn(1, cfg.in_channels, args.size // 8, args.size // 8, device=args.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(latents, torch.tensor([0.5], device=args.device), torch.randn(1, 12, 64, device=args.device))
    print(
        f"ok: random {sum(p.numel() for p in model.parameters()):,}-parameter Z-Image transformer, "
        f"{args.size}x{args.size} image ({tuple(latents.shape[2:])} latent) forward on {args.device} in "
        f"{time.perf_counter() - start:.2f} s, "
        f"output {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimage_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="load a checkpoint and say what it is and whether it works")
    p.add_argument("path", help="a .safetensors file, a diffusers model folder or a diffusers pipeline folder")
    p.add_argument("--component", choices=LOADERS, help="which model to load (default: every one found)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--device", default="cpu", help="where to load it (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, help="hold Linear weights in fp8 (fp8 files always are)")
    p.add_argument("--config", help="a diffusers config.json to use instead of inferring the architecture")
    p.set_defaults(run=inspect)
    p = sub.add_parser("smoke", help="run a small random-weight transformer forward (no weights needed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    p.set_defaults(run=smoke)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
