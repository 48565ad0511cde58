"""Seconds per image end to end (prompt encode, the sampling steps, VAE decode) and peak memory: ours against
diffusers' ZImagePipeline on the same random components, in one run.

The components are diffusers' and transformers' own models with seeded random weights, saved once (diffusers
layout) and loaded by our loaders, so both pipelines compute from the same weights; the output images are compared.
On a GPU they are full size in bf16 (Turbo: 1024², 8 steps, no CFG); on a CPU the transformer is a real-width slice
(`--layers` main layers and the 2 + 2 refiners), Qwen3 real-width with 3 layers and the VAE at its real widths, in
fp32 at `--size`. Ours may take the speed levers (`--attention`, `--residual`, `--compile`, `--gemm`, `--vram`,
`--cuda-graphs`).
Both are loaded at once and their runs interleaved; memory is the bytes of weights each holds on the device plus
what a run adds at its peak (CUDA's allocator, or the resident set sampled each ms on a CPU). The GPU figures the
issue targets (0.72 s bf16 end to end on an H100, peak VRAM 14 GB bf16, 6 GB streaming) come from here.

    python bench/end_to_end.py [--size 1024] [--steps 8] [--reps 3] [--layers N] [--residual compute] [--compile]
                               [--gemm auto|lowp] [--vram GB] [--cuda-graphs] [--out bench/out/end_to_end.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
PROMPT = "a lighthouse on a cliff in a storm, waves crashing, dramatic light"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 on a GPU, 512 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 8 on a GPU, 2 on a CPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="main layers (default: 30 on a GPU, 2 on a CPU)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--residual", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gemm", default="auto")
    p.add_argument("--vram", type=float, default=0.0)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "end_to_end.json")
    return p.parse_args()


def components(root: Path, layers: int, gpu: bool, dtype):
    """Save diffusers' transformer and VAE and transformers' Qwen3 with seeded random weights under `root`."""
    from helpers import QWEN3_REAL, REAL, VAE_REAL, reference_qwen3, reference_transformer, reference_vae

    qwen = QWEN3_REAL if gpu else dict(QWEN3_REAL, num_hidden_layers=3)
    for name, build in (("transformer", lambda: reference_transformer(dict(REAL, n_layers=layers), seed=0)),
                        ("text_encoder", lambda: reference_qwen3(qwen, seed=1)),
                        ("vae", lambda: reference_vae(VAE_REAL, seed=2))):  # fmt: skip
        build().to(dtype).save_pretrained(root / name)  # one at a time: full size, they are 40 GB in fp32


def ours(root: Path, args, dev, dtype):
    """Our three models loaded from `root`, and a function giving one image (B, H, W, 3) for a prompt and seed."""
    import torch

    from zimage_core.loaders import load_text_encoder, load_transformer, load_vae
    from zimage_core.sampling import denoise
    from zimage_core.speed import Speed

    speed = Speed(args.attention, args.residual, args.compile, args.gemm, args.vram, args.cuda_graphs)
    fp8 = torch.float8_e4m3fn if args.gemm == "lowp" else None  # fp8-held weights give the GEMMs something to do
    encoder = speed.place(load_text_encoder(root / "text_encoder", speed.home(dev), dtype), dev)
    transformer = load_transformer(root / "transformer", speed.home(dev), dtype, fp8)
    transformer = speed.apply(speed.place(transformer, dev), dev, dtype)
    vae = load_vae(root / "vae", dev, torch.float32)  # the official pipeline's VAE dtype
    models = (encoder, transformer, vae)

    def image(seed: int) -> torch.Tensor:  # what `pipeline.generate` runs, with the models resident
        shape = (vae.cfg.latent_channels, args.size // vae.cfg.factor, args.size // vae.cfg.factor)
        latents = denoise(transformer, encoder.encode([PROMPT]), None, [seed], args.steps, shape=shape)
        return vae.decode(vae.cfg.denormalize(latents))

    return image, models


def theirs(root: Path, args, dev, dtype):
    """diffusers' ZImagePipeline on the same saved components (its VAE in fp32, as ours)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from zimage_core.text_encoder import BUNDLED_TOKENIZER

    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32),
        text_encoder=Qwen3Model.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)),
        transformer=ZImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype),
    ).to(dev)

    def image(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        out = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=0.0,
                   generator=generator, output_type="pt").images  # fmt: skip
        return out.permute(0, 2, 3, 1)

    return image, (pipe.text_encoder, pipe.transformer, pipe.vae)


def on_device(models, dev) -> int:
    """Bytes of weights `models` hold on `dev` (a streamed model holds only part of them there)."""
    tensors = {id(t): t for m in models for t in (*m.parameters(), *m.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == dev.type)


def measure(pipelines: dict, args, dev) -> tuple[list[dict], dict]:
    """Warm each up (compiling, if asked), then time their runs interleaved; rows and each one's first image."""
    import torch
    from transformer_speed import PeakMemory, timed

    images = {name: image(0).float().cpu() for name, (image, _) in pipelines.items()}  # files paged in too
    added, times = {name: 0 for name in pipelines}, {name: [] for name in pipelines}
    for _ in range(args.reps):
        for name, (image, _) in pipelines.items():
            with PeakMemory() as run:
                times[name].append(timed(lambda image=image: image(0)))
            added[name] = max(added[name], run.added)
    rows = []
    for name, (_, models) in pipelines.items():
        weights = on_device(models, dev)
        rows.append({"pipeline": name, "seconds": statistics.median(times[name]), "runs": times[name],
                     "weights_bytes": weights, "run_peak_added_bytes": added[name],
                     "peak_bytes": weights + added[name]})  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, images


def main():
    args = parse()
    import torch
    from transformer_speed import device

    gpu = torch.cuda.is_available()
    dev, dtype = device(), (torch.bfloat16 if gpu else torch.float32)
    args.size, args.steps = args.size or (1024 if gpu else 512), args.steps or (8 if gpu else 2)
    layers = args.layers or (30 if gpu else 2)
    torch.set_grad_enabled(False)
    root = Path(tempfile.mkdtemp(prefix="zimage-e2e-"))
    try:
        components(root, layers, gpu, dtype)
        pipelines = {"ours": ours(root, args, dev, dtype), "diffusers ZImagePipeline": theirs(root, args, dev, dtype)}
        rows, images = measure(pipelines, args, dev)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # full size: about 20 GB
    a, b = images.values()
    diff = float((a - b).abs().max())
    for row in rows:
        row["ours_speedup"] = row["seconds"] / rows[0]["seconds"]
    report = {"device": torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads",
              "dtype": str(dtype), "layers": layers, "size": args.size, "steps": args.steps,
              "levers": {k: getattr(args, k) for k in ("attention", "residual", "compile", "gemm", "vram")},
              "max_pixel_difference": diff, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, {report['dtype']}, {layers} layers, {args.size}², {args.steps} steps, levers "
          f"{report['levers']}; images differ by at most {diff * 255:.1f}/255")  # fmt: skip
    print(f"{'pipeline':>26} {'s/image':>8} {'ours is':>8} {'weights MB':>11} {'peak MB':>8}")
    for r in rows:
        print(f"{r['pipeline']:>26} {r['seconds']:>8.3f} {r['ours_speedup']:>7.3f}x "
              f"{r['weights_bytes'] / 2**20:>11.0f} {r['peak_bytes'] / 2**20:>8.0f}")  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
