"""Command line: `python -m zimage_core generate`, `inspect PATH` and `smoke`."""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from tqdm import tqdm

from . import limits
from .attention import BACKENDS
from .checkpoint import CheckpointError
from .controlnet import ControlRequest
from .gemm import MODES as GEMM_MODES
from .loaders import LOADERS, components
from .pipeline import TINY_RANDOM, find_models
from .pipeline import generate as pipeline_generate
from .speed import RESIDUALS, Speed
from .transformer import TransformerConfig, ZImageTransformer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def reset_peak_rss():
    """Start a new peak-RSS measurement (Linux: clear_refs 5 resets VmHWM; elsewhere the peak is the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's /proc/self/status (VmRSS, VmHWM), None elsewhere."""
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory: Linux's VmHWM, else `resource` (macOS, BSD), else None (Windows has neither)."""
    peak = status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the others KiB


def inspect(args) -> int:
    """Load each component at the path, one at a time, and report it; JSON output is one object per line."""
    config = None
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build or machine has no CUDA device")
    found = [args.component] if args.component else components(args.path)
    if config is not None and len(found) > 1:
        raise ValueError(f"{args.path} holds {' and '.join(found)}: say which one --config is for with --component")
    if "text_encoder" in found:
        from . import text_encoder  # noqa: F401 (transformers, imported before memory is measured)
    for component in found:
        gc.collect()
        reset_peak_rss()
        before = status_bytes("VmRSS")  # the interpreter and its libraries: a CUDA build of torch adds ~0.3 GB
        start = time.perf_counter()
        model = LOADERS[component](
            args.path, args.device, DTYPES[args.dtype], WEIGHT_DTYPES.get(args.weight_dtype), config=config
        )
        info = {**model.info.as_dict(), "load_seconds": round(time.perf_counter() - start, 3)}
        info["peak_rss_bytes"], info["rss_before_bytes"] = peak_rss_bytes(), before
        del model
        print(json.dumps(info) if args.json else report(info), flush=True)
    return 0


def report(info: dict) -> str:
    gb, peak, held = 1e9, info["peak_rss_bytes"], info["held_bytes"]
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
        ("peak RSS", "not measurable on this system" if peak is None else f"{peak / gb:.2f} GB ({peak / held:.2f}x held)"),
    ]  # fmt: skip
    return "\n".join(f"{key:<13} {value}" for key, value in rows) + "\n"


def read_image(path: str, mode: str) -> torch.Tensor:
    """An image file as a (1, H, W, C) float tensor in [0, 1] (C = 3 for RGB, 1 for a grayscale mask)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1))[None]


def default_dtype(device: str) -> str:
    """As ComfyUI's default: bf16 on GPUs that have it, fp32 on the CPU (where bf16 is slow)."""
    kind = torch.device(device).type
    return "bf16" if kind != "cpu" and (kind != "cuda" or torch.cuda.is_bf16_supported()) else "fp32"


def lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH (a Windows drive's colon is part of FILE)."""
    path, sep, strength = text.rpartition(":")
    try:
        return (path, float(strength)) if sep and path else (text, 1.0)
    except ValueError:
        return text, 1.0


def generate(args) -> int:
    """Generate images from a prompt, with the models loaded one at a time, and save them as PNG."""
    width, height = (int(v) for v in args.size.lower().split("x")) if args.size else (None, None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = find_models(args.model, transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae,
                         siglip=args.siglip)  # fmt: skip
    references = []
    for path in args.edit_image:
        with Image.open(path) as image:
            references.append(image.convert("RGB"))
    seeds = limits.seeds(args.seed, args.batch)
    init = read_image(args.init_image, "RGB") if args.init_image else None
    mask = read_image(args.mask, "L")[..., 0] if args.mask else None
    if mask is not None and init is None:
        raise ValueError("--mask needs --init-image: the mask says which part of that image to repaint")
    strength = args.strength if args.strength is not None else (1.0 if mask is not None else 0.6)  # diffusers
    control = None
    if args.control or args.control_inpaint:
        if not args.control_model:
            raise ValueError("--control and --control-inpaint need --control-model: the ControlNet file")
        control = ControlRequest(
            args.control_model, read_image(args.control, "RGB") if args.control else None,
            read_image(args.control_inpaint, "RGB") if args.control_inpaint else None,
            read_image(args.control_mask, "L")[..., 0] if args.control_mask else None,
            args.control_strength, args.control_start, args.control_end,
        )  # fmt: skip
    elif args.control_model or args.control_mask:
        raise ValueError("--control-model and --control-mask need --control IMAGE or --control-inpaint IMAGE")
    bar = tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr)

    def progress(step: int, total: int, x0: torch.Tensor):
        bar.total = total  # img2img runs only the last steps of the schedule
        bar.update(1)

    result = pipeline_generate(
        models, [args.prompt] * args.batch, [args.negative] * args.batch if args.negative else None,
        width, height, args.steps, args.cfg, seeds, device, DTYPES[args.dtype or default_dtype(device)], init,
        strength, mask, args.variety, args.variety_steps, references or None, callback=progress,
        vae_dtype=DTYPES[args.vae_dtype], loras=args.lora, control=control,
        speed=Speed(args.attention, args.residual, args.compile, args.gemm, args.vram, args.cuda_graphs),
    )  # fmt: skip
    for note in result.loras:
        print(note, file=sys.stderr)
    height, width = result.images.shape[1:3]
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, (image, seed) in enumerate(zip(result.images, seeds)):
        path = out if args.batch == 1 else out.with_name(f"{out.stem}_{i:02d}{out.suffix}")
        info = PngInfo()
        params = {
            "prompt": args.prompt, "negative": args.negative, "size": f"{width}x{height}", "steps": result.steps,
            "cfg": result.cfg, "seed": seed, "strength": strength if init is not None else None,
            "edit_images": [str(e) for e in args.edit_image] or None,
            "variety": [args.variety, args.variety_steps] if args.variety else None,
            "loras": [[str(path), s] for path, s in args.lora] or None,
            "control": control and {"model": str(args.control_model), "image": args.control,
                                    "inpaint": args.control_inpaint, "mask": args.control_mask,
                                    "strength": args.control_strength, "range": [args.control_start, args.control_end]},
            "sampler": "euler, shift 3", "models": {k: str(v) for k, v in vars(models).items()},
        }  # fmt: skip
        info.add_text("parameters", json.dumps(params, ensure_ascii=False))
        Image.fromarray((image * 255).round().byte().numpy()).save(path, pnginfo=info)
        print(f"wrote {path}")
    if args.save_latent:
        # ComfyUI's Save Latent format: raw autoencoder latents plus the marker that says they are not SD-scaled
        save_file({"latent_tensor": result.latents.contiguous(), "latent_format_version_0": torch.tensor([])},
                  args.save_latent)  # fmt: skip
        print(f"wrote {args.save_latent}")
    return 0


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
    p = sub.add_parser(
        "generate", help="generate images (defaults by the transformer: Turbo 8 steps, cfg 1; Base 25 steps, cfg 4)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", help="negative prompt (used when --cfg > 1; default empty)")
    p.add_argument("--model", help=f"a diffusers pipeline folder, a ComfyUI models/ folder, or {TINY_RANDOM}")
    p.add_argument("--transformer", help="transformer file or folder (wins over --model)")
    p.add_argument("--text-encoder", help="text encoder file or folder, e.g. qwen_3_4b.safetensors")
    p.add_argument("--vae", help="VAE file or folder, e.g. ae.safetensors")
    p.add_argument("--siglip", help="SigLIP2 vision encoder folder or file, for --edit-image (Omni/Edit)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 1024x1024; editing: the last image's)")
    p.add_argument("--steps", type=int, help="transformer evaluations (default: Turbo 8, Base 25)")
    p.add_argument(
        "--cfg", type=float, help="ComfyUI's CFG scale, 1 = off (default: Turbo 1, Base 4); diffusers' g = cfg - 1"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--batch", type=int, default=1, help="images to generate")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="fp32", help="the VAE's (default fp32)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--variety", type=float, default=0.0, help="Turbo seed variety: prompt noise strength (0 = off)")
    p.add_argument("--variety-steps", type=int, default=2, help="evaluations that see the varied prompt (default 2)")
    p.add_argument("--init-image", help="img2img: start from this image")
    p.add_argument("--strength", type=float, help="how much to change, ComfyUI's denoise (img2img 0.6, inpaint 1.0)")
    p.add_argument("--mask", help="inpaint: grayscale image, white = repaint (needs --init-image)")
    p.add_argument("--edit-image", action="append", default=[], metavar="IMAGE",
                   help="edit (Omni/Edit transformer + --siglip): a reference image the prompt refers to; repeatable")  # fmt: skip
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_arg,
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (any trainer's format) at STRENGTH (default 1); repeat to stack",
    )
    p.add_argument("--control", metavar="IMAGE", help="ControlNet: the control image (canny, depth, pose, ...)")
    p.add_argument("--control-model", metavar="FILE", help="a Z-Image Fun ControlNet Union file (1.0, 2.0, 2.1, lite)")
    p.add_argument("--control-strength", type=float, default=0.75, help="how strongly it steers (default 0.75)")
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the process it starts at (default 0)")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the process it ends at (default 1)")
    p.add_argument("--control-inpaint", metavar="IMAGE", help="ControlNet 2.x inpainting: the image to repaint")
    p.add_argument("--control-mask", metavar="MASK", help="with --control-inpaint: grayscale, white = repaint")
    p.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="attention kernel (default auto: cuDNN first on Hopper and later, else PyTorch's choice)",
    )
    p.add_argument(
        "--residual",
        choices=RESIDUALS,
        default="fp32",
        help="the residual stream's dtype: fp32 (default, as the references) or compute (faster, in bf16)",
    )
    p.add_argument("--compile", action="store_true", help="compile the transformer's blocks (the first image waits)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the transformer's steps from CUDA graphs, one "
                   "per size and prompt length (its activations stay reserved; not with --vram)")  # fmt: skip
    p.add_argument(
        "--gemm",
        choices=GEMM_MODES,
        default="auto",
        help="how fp8, int8, mxfp8 and nvfp4 weights multiply: auto (default: their low-precision GEMMs where "
        "the GPU has them, mxfp8/nvfp4 on Blackwell, else dequantized to the compute dtype), dequantize, or lowp "
        "(fp8/int8 GEMMs wherever they run, the CPU too)",
    )
    p.add_argument(
        "--vram",
        type=float,
        default=0.0,
        metavar="GB",
        help="keep the weights on the GPU within GB: the text encoder and transformer stream the blocks that do not "
        "fit from host memory (default 0: no limit)",
    )
    p.add_argument("--save-latent", help="also write the latent in ComfyUI's Save Latent format (.latent)")
    p.add_argument("--out", required=True, help="PNG to write (with a batch: NAME_00.png, NAME_01.png, ...)")
    p.set_defaults(run=generate)
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
    except (CheckpointError, OSError, ValueError, InterruptedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
