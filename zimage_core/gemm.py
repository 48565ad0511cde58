"""Low-precision GEMMs behind the one dequantize point (`ops.Compact`): a Linear holding fp8 or int8 weights can
multiply them as held (fp8 `torch._scaled_mm`, 1.5-1.66x a bf16 GEMM on an H100 by gpu-peers.md; int8
`torch._int_mm`) instead of dequantizing the weight first.

The activations are then quantized per call, per row (per token): int8 exactly as comfy-kitchen 0.2.31's
`int8_linear` does for ComfyUI 0.33.0's int8 files (amax / 127, rounded; ConvRot rotates the activations as the
weights were rotated when stored), fp8 with comfy-kitchen's `quantize_per_tensor_fp8` arithmetic applied with one
scale per row (amax / 448), where ComfyUI takes one per tensor: a row's scale follows its own range, so one
outlier token does not flatten the rest. Weight scales may be per tensor or per row (fused q/k/v of three scaled
fp8 tensors). tests/test_levers.py checks both against comfy-kitchen and the model's output against the
dequantizing path. mxfp8 and nvfp4 (Blackwell's block-scaled GEMMs) and GGUF stay dequantized.
"""

from __future__ import annotations

import torch

from .quant import hadamard

MODES = ("dequantize", "auto", "lowp")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
MIN_ROWS = 32  # fewer rows (the modulation's one per image) gain nothing; cuBLAS's int8 GEMM wants more than 16
NEEDS = {"fp8": (8, 9), "int8": (8, 0)}  # the CUDA capability from which each is a fast path


def row_scales(x: torch.Tensor, top: float) -> torch.Tensor:
    return (x.abs().amax(dim=-1, keepdim=True).float() / top).clamp(min=1e-30)


def weight_scales(scale: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """A per-tensor or per-row weight scale as the (1, N) fp32 row `_scaled_mm` and the int8 epilogue take."""
    if scale is None:
        return torch.ones(1, n, device=device)
    return scale.to(device, torch.float32).reshape(1, -1).expand(1, n).contiguous()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K, e4m3) scaled, in x's dtype: x quantized per row, one fp8 GEMM."""
    xs = row_scales(x, FP8_MAX)
    xq = torch.clamp(x * (1.0 / xs).to(x.dtype), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    ws = weight_scales(scale, weight.shape[0], x.device)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, convrot: int) -> torch.Tensor:
    """x (M, K) @ weight (N, K, int8) scaled, in x's dtype: x rotated (ConvRot) and quantized per row, one int8
    GEMM into int32, then both scales."""
    if convrot:
        h = hadamard(convrot, x.device, x.dtype)
        x = (x.reshape(len(x), -1, convrot) @ h).reshape(len(x), -1)
    xs = row_scales(x, 127.0)
    divisor = xs.to(x.dtype)  # comfy-kitchen divides in x's dtype, a scale that underflows there by its smallest
    divisor = torch.where(divisor == 0, torch.finfo(x.dtype).tiny, divisor)
    xq = (x / divisor).round_().clamp_(-128, 127).to(torch.int8)
    out = torch._int_mm(xq, weight.t())
    return (out.float() * (xs * weight_scales(scale, weight.shape[0], x.device))).to(x.dtype)


def kind(layer) -> str | None:
    """Which low-precision GEMM a Linear's held weight can take: e4m3 fp8 (plain or scaled) or int8_tensorwise."""
    w = getattr(layer, "weight", None)
    if w is None or w.dim() != 2 or w.shape[0] % 16 or w.shape[1] % 16:
        return None
    if w.dtype == torch.float8_e4m3fn and layer.quant is None:
        return "fp8"
    if layer.quant is not None and layer.quant.name == "int8_tensorwise":
        return "int8"
    return None


def linear(layer, x: torch.Tensor) -> torch.Tensor | None:
    """`layer`'s product with x (..., K) by its low-precision GEMM, or None where it takes none (too few rows)."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) < MIN_ROWS:
        return None
    w = layer.weight.to(x.device)
    if layer.lowp == "fp8":
        out = fp8_linear(rows, w, layer.weight_scale)
    else:
        out = int8_linear(rows, w, layer.weight_scale, layer.quant.convrot)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def runs(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the `name` GEMM runs on `device` in `dtype`, else why not (tried once on a small input)."""
    x = torch.randn(MIN_ROWS, 64, device=device).to(dtype)
    try:
        if name == "fp8":
            fp8_linear(x, torch.ones(32, 64, device=device).to(torch.float8_e4m3fn), torch.ones(32, 1))
        else:
            int8_linear(x, torch.ones(32, 64, device=device, dtype=torch.int8), torch.ones(()), 16)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def known(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown GEMM mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def kinds(mode: str, device, dtype: torch.dtype) -> frozenset[str]:
    """The low-precision GEMMs `mode` turns on for `device` and `dtype`: none for `dequantize`; for `auto` those
    the device runs fast (CUDA from sm89 for fp8, sm80 for int8); for `lowp` every one that runs there (the CPU
    too, where they are slow: for tests), an error naming any that cannot."""
    known(mode)
    device = torch.device(device)
    if mode == "dequantize":
        return frozenset()
    if mode == "auto":
        if device.type != "cuda":
            return frozenset()
        capability = torch.cuda.get_device_capability(device)
        return frozenset(k for k, need in NEEDS.items() if capability >= need and runs(k, device, dtype) is None)
    failed = {k: why for k in NEEDS if (why := runs(k, device, dtype)) is not None}
    if failed:
        reasons = "; ".join(f"{k}: {why}" for k, why in failed.items())
        raise ValueError(f"GEMM mode 'lowp' cannot run on {device} in {dtype}: {reasons}")
    return frozenset(NEEDS)


def use_gemms(model: torch.nn.Module, allowed: frozenset[str]) -> int:
    """Point every Linear of `model` whose held weight takes one of the `allowed` GEMMs at it (the others, and
    all when `allowed` is empty, dequantize); the number of layers that now take one."""
    count = 0
    for module in model.modules():
        if hasattr(module, "lowp"):
            module.lowp = k if (k := kind(module)) in allowed else None
            count += module.lowp is not None
    return count
