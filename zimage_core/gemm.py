"""Low-precision GEMMs behind the one dequantize point (`ops.Compact`): a Linear holding fp8, int8, mxfp8 or nvfp4
weights can multiply them as held (fp8 `torch._scaled_mm`, 1.5-1.66x a bf16 GEMM on an H100 by gpu-peers.md; int8
`torch._int_mm`; Blackwell's block-scaled mxfp8 and nvfp4 GEMMs, `torch.nn.functional.scaled_mm`) instead of
dequantizing the weight first.

The activations are then quantized per call: int8 exactly as comfy-kitchen 0.2.31's `int8_linear` does for ComfyUI
0.33.0's int8 files (per row, amax / 127, rounded; ConvRot rotates the activations as the weights were rotated when
stored), fp8 with comfy-kitchen's `quantize_per_tensor_fp8` arithmetic applied with one scale per row (amax /
448), where ComfyUI takes one per tensor: a row's scale follows its own range, so one outlier token does not flatten
the rest. Weight scales may be per tensor or per row (fused q/k/v of three scaled fp8 tensors). mxfp8 (a power-of-two
scale per 32 values) and nvfp4 (an e4m3 scale per 16 values under one per tensor) quantize the activations as
ComfyUI 0.33.0's layouts do on Blackwell, by comfy-kitchen's `quantize_mxfp8` / `quantize_nvfp4` arithmetic, and call
the kernel as its `scaled_mm_mxfp8` / `scaled_mm_nvfp4` do. tests/test_levers.py checks each against comfy-kitchen
and the model's output against the dequantizing path. GGUF stays dequantized.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch
import torch.nn.functional as F

from .ggml import constant
from .quant import E2M1, hadamard, to_blocked

MODES = ("dequantize", "auto", "lowp")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
E2M1_MAX = 6.0
MIN_ROWS = 32  # fewer rows (the modulation's one per image) gain nothing; cuBLAS's int8 GEMM wants more than 16
NEEDS = {"fp8": (8, 9), "int8": (8, 0), "mxfp8": (10, 0), "nvfp4": (10, 0)}  # the CUDA capability of each
BLOCK_SCALED = ("mxfp8", "nvfp4")  # Blackwell's kernels: torch has none for the CPU


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


def mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as e4m3 values and a power-of-two (e8m0) scale per 32, the smallest that holds each block's
    largest value, as comfy-kitchen's `quantize_mxfp8`: (values, plain scales as uint8 exponents)."""
    blocks = x.reshape(len(x), -1, 32)
    amax = blocks.abs().amax(dim=-1).float()
    exponents = torch.ceil(torch.log2((amax / FP8_MAX).clamp(min=2.0**-127))).int().add_(127).clamp_(0, 254)
    scales = torch.where(exponents == 0, 0.0, (exponents << 23).view(torch.float32))
    scales = torch.where(amax == 0, 1.0, scales)
    values = torch.where(amax[..., None] == 0, 0.0, blocks.float() / scales[..., None])
    values = values.clamp_(-FP8_MAX, FP8_MAX).reshape(x.shape).to(torch.float8_e4m3fn)
    return values, torch.where(amax == 0, 0, exponents).to(torch.uint8)


# e2m1's magnitudes are E2M1[:8]; these are the midpoints between them, each tie rounding to the even code: those
# where the even code is the upper neighbour are moved one float32 step below the midpoint, so a tie goes up.
E2M1_MIDPOINTS = [(a + b) / 2 for a, b in pairwise(E2M1[:8])]
E2M1_BOUNDS = tuple(torch.nextafter(torch.tensor(m), torch.tensor(0.0)).item() if i % 2 else m
                    for i, m in enumerate(E2M1_MIDPOINTS))  # fmt: skip


def nvfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) as e2m1 values two a byte (high nibble first), an e4m3 scale per 16 and one fp32 scale for the
    tensor (amax / (448 * 6), taken in x's dtype), as ComfyUI 0.33.0's nvfp4 layout quantizes activations with
    comfy-kitchen's `quantize_nvfp4`: (packed values, plain block scales, tensor scale). Compiled, Inductor keeps
    that division in fp32: a scale a bf16 rounding finer than ComfyUI's, as good a scale, not bit for bit its."""
    tensor_scale = nvfp4_tensor_scale(x)
    blocks = x.reshape(len(x), -1, 16)
    block_scales = (blocks.abs().amax(dim=-1).float() / E2M1_MAX / tensor_scale).clamp(max=FP8_MAX)
    block_scales = block_scales.to(torch.float8_e4m3fn)
    total = tensor_scale * block_scales.float()
    values = blocks.float() / torch.where(total == 0, 1.0, total)[..., None]
    values = torch.where(total[..., None] == 0, 0.0, values).clamp_(-E2M1_MAX, E2M1_MAX).reshape(x.shape)
    codes = e2m1_codes(values)
    return codes[:, 0::2] << 4 | codes[:, 1::2], block_scales, tensor_scale


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    return (x.abs().amax() / (FP8_MAX * E2M1_MAX)).float().clamp(min=1e-30)  # 0 only for an all-zero x


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit e2m1 code of each value (in [-6, 6]), rounded to the nearest, ties to even, sign kept (-0 too)."""
    magnitude = torch.bucketize(values.abs(), constant(E2M1_BOUNDS, torch.float32, values.device))
    return magnitude.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3)


@lru_cache(maxsize=1)
def kitchen():
    """comfy-kitchen where it is installed (ComfyUI 0.33.0 ships it), else None: on the GPU its one fused kernel
    quantizes an activation to mxfp8 or nvfp4, bit for bit as ours, which eagerly is about 30 elementwise kernels."""
    try:
        import comfy_kitchen
    except (ImportError, OSError, RuntimeError):  # absent, or built for another CUDA: ours quantizes
        return None
    return comfy_kitchen


def fused(x: torch.Tensor) -> bool:
    return x.is_cuda and kitchen() is not None


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, -len(x) % multiple))


def mxfp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K, e4m3 with plain e8m0 scales per 32) in x's dtype: x quantized to mxfp8 (its rows
    padded to 32, as ComfyUI pads them), one block-scaled GEMM."""
    e8m0, padded = torch.float8_e8m0fnu, pad_rows(x, 32)
    if fused(x):
        values, blocked = kitchen().quantize_mxfp8(padded)
    else:
        values, scales = mxfp8_quantize(padded)
        blocked = to_blocked(scales).view(e8m0)
    out = F.scaled_mm(
        values, weight.t(),
        scale_a=blocked, scale_recipe_a=F.ScalingType.BlockWise1x32,
        scale_b=to_blocked(scale).view(e8m0), scale_recipe_b=F.ScalingType.BlockWise1x32,
        swizzle_a=F.SwizzleType.SWIZZLE_32_4_4, swizzle_b=F.SwizzleType.SWIZZLE_32_4_4,
        output_dtype=x.dtype, use_fast_accum=False,
    )  # fmt: skip
    return out[: len(x)]


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K / 2 packed e2m1, plain e4m3 scales per 16, one per tensor) in x's dtype: x quantized
    to nvfp4 (its rows padded to 16, as ComfyUI pads them), one block-scaled GEMM. The weight's scales are held
    untiled, as dequantizing reads them, and tiled per call (an eighth of the weight's bytes), not held twice."""
    padded = pad_rows(x, 16)
    if fused(x):
        tensor_scale = nvfp4_tensor_scale(padded)
        values, blocked = kitchen().quantize_nvfp4(padded, tensor_scale)
    else:
        values, scales, tensor_scale = nvfp4_quantize(padded)
        blocked = to_blocked(scales)
    fp4, recipe = torch.float4_e2m1fn_x2, [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]
    swizzle = [F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE]
    out = F.scaled_mm(
        values.view(fp4), weight.view(fp4).t(),
        scale_a=[blocked.view(-1), tensor_scale], scale_recipe_a=recipe,
        scale_b=[to_blocked(scale).view(-1), scale_2], scale_recipe_b=recipe,
        swizzle_a=swizzle, swizzle_b=swizzle, output_dtype=x.dtype, use_fast_accum=False,
    )  # fmt: skip
    return out[: len(x)]


def kind(layer) -> str | None:
    """Which low-precision GEMM a Linear's held weight can take: e4m3 fp8 (plain or scaled), int8_tensorwise,
    mxfp8 or nvfp4 (those two only unpadded: the formats pad odd shapes, which dequantizing handles)."""
    w = getattr(layer, "weight", None)
    if w is None or w.dim() != 2 or w.shape[0] % 16 or w.shape[1] % 16:
        return None
    if w.dtype == torch.float8_e4m3fn and layer.quant is None:
        return "fp8"
    if layer.quant is None:
        return None
    if layer.quant.name == "int8_tensorwise":
        return "int8"
    if layer.quant.name in BLOCK_SCALED and layer.quant.logical_shape(tuple(w.shape)) == layer.dense_shape:
        return layer.quant.name
    return None


def linear(layer, x: torch.Tensor) -> torch.Tensor | None:
    """`layer`'s product with x (..., K) by its low-precision GEMM, or None where it takes none (too few rows)."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) < MIN_ROWS:
        return None
    w, scale = layer.weight.to(x.device), layer.weight_scale
    if layer.lowp == "fp8":
        out = fp8_linear(rows, w, scale)
    elif layer.lowp == "int8":
        out = int8_linear(rows, w, scale, layer.quant.convrot)
    elif layer.lowp == "mxfp8":
        out = mxfp8_linear(rows, w, scale.to(x.device))
    else:
        out = nvfp4_linear(rows, w, scale.to(x.device), layer.weight_scale_2.to(x.device))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def runs(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the `name` GEMM runs on `device` in `dtype`, else why not (tried once on a small input)."""
    x = torch.randn(MIN_ROWS, 64, device=device).to(dtype)
    ones = torch.ones(32, 64, device=device)
    try:
        if name == "fp8":
            fp8_linear(x, ones.to(torch.float8_e4m3fn), torch.ones(32, 1))
        elif name == "int8":
            int8_linear(x, ones.to(torch.int8), torch.ones(()), 16)
        elif name == "mxfp8":
            mxfp8_linear(x, ones.to(torch.float8_e4m3fn), torch.full((32, 2), 127, dtype=torch.uint8, device=device))
        else:
            scales = torch.ones(32, 4, device=device).to(torch.float8_e4m3fn)
            packed = torch.full((32, 32), 0x22, dtype=torch.uint8, device=device)
            nvfp4_linear(x, packed, scales, torch.ones((), device=device))
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def known(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown GEMM mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def kinds(mode: str, device, dtype: torch.dtype) -> frozenset[str]:
    """The low-precision GEMMs `mode` turns on for `device` and `dtype`: none for `dequantize`; for `auto` those
    the device runs fast (CUDA from sm89 for fp8, sm80 for int8, sm100 for mxfp8 and nvfp4); for `lowp` every one
    that runs there (fp8 and int8 on the CPU too, where they are slow: for tests), an error naming fp8 or int8 if
    either cannot; the block-scaled two where the device has them (Blackwell), else those layers dequantize."""
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
    required = {k: why for k, why in failed.items() if k not in BLOCK_SCALED}
    if required:
        reasons = "; ".join(f"{k}: {why}" for k, why in required.items())
        raise ValueError(f"GEMM mode 'lowp' cannot run on {device} in {dtype}: {reasons}")
    return frozenset(NEEDS) - set(failed)


def use_gemms(model: torch.nn.Module, allowed: frozenset[str]) -> int:
    """Point every Linear of `model` whose held weight takes one of the `allowed` GEMMs at it (the others, and
    all when `allowed` is empty, dequantize); the number of layers that now take one."""
    count = 0
    for module in model.modules():
        if hasattr(module, "lowp"):
            module.lowp = k if (k := kind(module)) in allowed else None
            count += module.lowp is not None
    return count
