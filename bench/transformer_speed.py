"""Transformer forward time and memory: ours against diffusers' ZImageTransformer2DModel and ComfyUI's native NextDiT,
all three built from one state dict and timed interleaved in one process on the same inputs.

On a CPU the model is a slice of the real one (width 3840, 30 heads, `--layers` main layers and the 2 + 2 refiners)
in fp32; on a GPU it is the full model (30 layers) in bf16. Sizes are images of 512² and 1024² (latents 64² and
128², 1024 and 4096 image tokens) with a 128-token caption, as in ../shared/reference/gpu-peers.md. The FLOP count
is the GEMMs and attention of every block; the ceiling is a square matmul of the same dtype on the same device,
timed in the same run. Peak memory is what a forward adds to what was resident: CUDA's allocator peak on a GPU,
the process's resident set sampled every millisecond on a CPU.

ComfyUI's NextDiT comes from a host checkout (`--comfyui`, else $COMFYUI_PATH), run in that host's own python
(its `.venv`, where the server tests put one) with `--cpu` where there is no GPU, so its attention is the host's
own choice; without a host the table has two peers. Its q/k norms get the official eps (1e-5) as in the parity
tests, so all three compute the same function (their largest relative difference is printed).

    python bench/transformer_speed.py [--comfyui HOST] [--layers 2] [--sizes 512 1024] [--reps 3]
                                      [--out bench/out/transformer_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTION = 128


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout (0.8.0 or later)")
    p.add_argument("--layers", type=int, default=None, help="main layers (default: 2 on a CPU, 30 on a GPU)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes (square, pixels)")
    p.add_argument("--reps", type=int, default=3, help="timed forwards per peer and size (the median is reported)")
    p.add_argument("--compile", action="store_true", help="also each peer with its repeated blocks compiled")
    p.add_argument("--residual", choices=["fp32", "compute"], default="fp32", help="our residual stream's dtype")
    p.add_argument("--fp8", action="store_true", help="also ours with the blocks' Linears held in fp8 (per-row "
                   "scales) and multiplied by fp8 GEMMs (`_scaled_mm`)")  # fmt: skip
    p.add_argument("--fp4", action="store_true", help="also ours with the blocks' Linears held in nvfp4, multiplied "
                   "by Blackwell's fp4 GEMMs where the GPU has them (elsewhere dequantized per call)")  # fmt: skip
    p.add_argument("--cuda-graphs", action="store_true", help="also ours replayed from CUDA graphs (GPU only)")
    p.add_argument("--vram", type=float, default=0.0, metavar="GB",
                   help="also ours streaming its blocks within GB of device memory for its weights")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "transformer_speed.json")
    p.add_argument("--in-host", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def host_python(host: Path) -> str | None:
    for venv in (host / ".venv" / "bin" / "python", host / ".venv" / "Scripts" / "python.exe"):
        if venv.exists():
            return str(venv)
    return None


def main():
    args = parse()
    host = Path(args.comfyui).resolve() if args.comfyui else None
    python = host_python(host) if host else None
    if host and not args.in_host and python and Path(sys.prefix).resolve() != (host / ".venv").resolve():
        os.execv(python, [python, __file__, *sys.argv[1:], "--in-host"])  # the host's python, where comfy imports
    run(args, host)


def native_peer(host: Path, sd: dict, dtype, eps: float):
    """ComfyUI's NextDiT from `host`, loaded by the host's own loader (UNETLoader's call) from the state dict."""
    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(host))
    import torch
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
    model = patcher.model.diffusion_model.to(device())
    for module in model.modules():
        for norm in (getattr(module, "q_norm", None), getattr(module, "k_norm", None)):
            if hasattr(norm, "eps"):
                norm.eps = eps
    return model.eval().requires_grad_(False)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def flops(cfg, n_img: int, n_cap: int) -> float:
    """GEMM and attention FLOPs of one forward: noise refiner on the image tokens, context refiner on the caption,
    the main layers on both (sequences padded to multiples of 32, as every peer pads them)."""

    def block(s: int) -> float:
        return 2 * s * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_dim) + 4 * s * s * cfg.dim

    n_img, n_cap = n_img + (-n_img % 32), n_cap + (-n_cap % 32)
    refiners = cfg.n_refiner_layers * (block(n_img) + block(n_cap))
    return refiners + cfg.n_layers * block(n_img + n_cap)


class PeakMemory:
    """What a call adds to the memory in use: CUDA's allocator peak, or on a CPU the resident set sampled each ms."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        import psutil
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss

        def sample():
            while not self.stop.wait(0.001):
                self.peak = max(self.peak, self.process.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.added = max(self.peak, self.process.memory_info().rss) - self.base


def compiled(name: str, model):
    """A copy of `model` (sharing its weights) with its repeated blocks compiled the way its authors do it:
    ours `speed.compile_blocks`, diffusers `compile_repeated_blocks`, ComfyUI each of its blocks."""
    import copy

    from zimage_core.speed import compile_blocks

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared)  # new modules, the same tensors
    if name == "ours":
        return compile_blocks(twin)
    if name == "diffusers":
        twin.compile_repeated_blocks(dynamic=True)
        return twin
    for blocks in (twin.noise_refiner, twin.context_refiner, twin.layers):
        for block in blocks:
            block.compile(dynamic=True)
    return twin


def quantized_twin(model, dev, dtype, kind: str):
    """A copy of ours whose blocks' Linears hold e4m3 weights with one scale per row (`fp8`) or nvfp4 weights
    (`nvfp4`, quantized as comfy-kitchen quantizes them), multiplied by those GEMMs where the device has them."""
    import copy

    import torch

    from zimage_core import gemm
    from zimage_core.quant import Format
    from zimage_core.speed import Speed
    from zimage_core.streaming import block_lists

    twin = copy.deepcopy(model)
    for block in block_lists(twin):
        for layer in block.modules():
            if hasattr(layer, "weight_scale") and layer.weight.dim() == 2:
                w = layer.weight
                if kind == "fp8":
                    scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
                    held = (w.float() / scale).to(torch.float8_e4m3fn)
                else:
                    held, scale, layer.weight_scale_2 = gemm.nvfp4_quantize(w)
                    layer.quant = Format("nvfp4")
                layer.weight = torch.nn.Parameter(held, requires_grad=False)
                layer.weight_scale = scale
    return Speed(gemm="lowp" if kind == "fp8" else "auto").apply(twin, dev, dtype)


def streamed_twin(model, dev, budget_gb: float):
    """A copy of ours loaded into host memory and streamed onto `dev` within `budget_gb` for its weights."""
    import copy

    from zimage_core.streaming import stream

    return stream(copy.deepcopy(model).cpu(), dev, budget_gb)


def timed(call) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ceiling(dtype) -> float:
    """FLOP/s of a square matmul of 4096 in `dtype` on this device: the practical ceiling the shares are of."""
    import torch

    a = torch.randn(4096, 4096, device=device()).to(dtype)
    timed(lambda: a @ a)
    return 2 * 4096**3 / min(timed(lambda: a @ a) for _ in range(5))


def run(args, host: Path | None):
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from helpers import REAL, reference_transformer, to_comfy

    from zimage_core.graphs import Graphs
    from zimage_core.speed import Speed
    from zimage_core.transformer import TransformerConfig, ZImageTransformer

    gpu = torch.cuda.is_available()
    dtype, dev = (torch.bfloat16 if gpu else torch.float32), device()
    layers = args.layers or (30 if gpu else 2)
    torch.set_grad_enabled(False)
    config = dict(REAL, n_layers=layers)
    ref = reference_transformer(config, seed=0).to(dev, dtype)
    sd = to_comfy(ref.state_dict())
    cfg = TransformerConfig(n_layers=layers)
    with torch.device("meta"):
        ours = ZImageTransformer(cfg)
    ours.load_state_dict(sd, assign=True)
    ours = ours.to(dev).eval().requires_grad_(False)
    Speed(residual=args.residual).apply(ours, dev, dtype)
    peers = {"ours": ours, "diffusers": ref}
    if host:
        peers["ComfyUI"] = native_peer(host, sd, dtype, cfg.norm_eps)
    del sd
    if args.fp8:
        peers["ours fp8"] = quantized_twin(ours, dev, dtype, "fp8")
    if args.fp4:
        peers["ours nvfp4"] = quantized_twin(ours, dev, dtype, "nvfp4")
    if args.vram:
        peers["ours streamed"] = streamed_twin(ours, dev, args.vram)
    if args.cuda_graphs:  # the same weights; the warm-up call captures, the timed ones replay
        peers["ours graphs"] = copy.copy(ours)
        peers["ours graphs"].graphs = Graphs()
    if args.compile:  # each peer's own regional compilation, beside its eager self (the same weights)
        for name in list(peers):
            peers[f"{name} compiled"] = compiled(name, peers[name])

    def call(name: str, x, t, cap):
        model = peers[name]
        if name.startswith("ours"):
            return model(x, t, cap)
        if name.startswith("diffusers"):
            return model([x[0][:, None]], t, [cap[0]], return_dict=False)[0][0][:, 0][None]
        return -model(x, 1 - t, cap, num_tokens=cap.shape[1])  # ComfyUI's model time and sign

    peak = ceiling(dtype)
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(dev, dtype)
        t = torch.tensor([0.6], device=dev)
        cap = torch.randn(1, CAPTION, cfg.cap_feat_dim, generator=g).to(dev, dtype)
        work = flops(cfg, (size // 16) ** 2, CAPTION)
        outs, mem = {}, {}
        for name in peers:  # warm-up, outputs compared, memory
            with PeakMemory() as m:
                outs[name] = call(name, x, t, cap).float()
            mem[name] = m.added
        times = {name: [] for name in peers}
        for _ in range(args.reps):  # interleaved, so drift hits every peer alike
            for name in peers:
                times[name].append(timed(lambda name=name: call(name, x, t, cap)))  # noqa: B023
        scale = outs["diffusers"].abs().max()
        for name in peers:
            seconds = statistics.median(times[name])
            rows.append({
                "size": size, "peer": name, "seconds": seconds, "runs": times[name],
                "tflops": work / seconds / 1e12, "share_of_ceiling": work / seconds / peak,
                "peak_added_bytes": mem[name],
                "rel_diff_to_diffusers": float((outs[name] - outs["diffusers"]).abs().max() / scale),
            })  # fmt: skip
        ours_best = min(r["seconds"] for r in rows[-len(peers) :] if r["peer"].startswith("ours"))
        for row in rows[-len(peers) :]:
            row["ours_speedup"] = row["seconds"] / ours_best

    report = {
        "device": torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads",
        "dtype": str(dtype), "layers": layers, "refiners": cfg.n_refiner_layers, "caption_tokens": CAPTION,
        "ceiling_tflops": peak / 1e12, "torch": torch.__version__, "comfyui": str(host) if host else None, "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, {report['dtype']}, {layers} layers + {cfg.n_refiner_layers} + {cfg.n_refiner_layers} "
          f"refiners, caption {CAPTION} tokens; matmul ceiling {peak / 1e12:.2f} TFLOP/s")  # fmt: skip
    print(f"{'image':>6} {'peer':>14} {'seconds':>9} {'TFLOP/s':>8} {'ceiling':>8} {'peak +MB':>9} "
          f"{'ours is':>8} {'rel diff':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['size']:>5}² {r['peer']:>14} {r['seconds']:>9.3f} {r['tflops']:>8.3f} {r['share_of_ceiling']:>8.1%} "
              f"{r['peak_added_bytes'] / 2**20:>9.0f} {r['ours_speedup']:>7.3f}x {r['rel_diff_to_diffusers']:>9.1e}")  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
