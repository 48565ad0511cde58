"""GGML block quantizations, the form GGUF files store weights in, turned back into float weights in torch.

Each block holds `block` values in `size` bytes: fp16 scales and packed integer codes. The arithmetic follows
llama.cpp's reference dequantization as the `gguf` package (gguf-py `quants.py`) writes it, operation for
operation in fp32, so the tests can ask for bit-equal weights. It runs where the weight lies (the GPU during
sampling), one layer per call, as city96's ComfyUI-GGUF does.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TYPES = {  # GGML type id -> name (ggml.h `ggml_type`)
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4",
}  # fmt: skip
PLAIN = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}  # fmt: skip
QK_K = 256
BLOCKS = {  # name -> (values per block, bytes per block), for the types dequantized here
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (QK_K, 136),
}  # fmt: skip
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@lru_cache(maxsize=64)
def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table of constants on `device`, made once: made per call, its copy from host memory would wait for
    the GPU to finish everything queued (a blocking copy), and could not be captured in a CUDA graph."""
    return torch.tensor(values, dtype=dtype, device=device)


def dequantize(data: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The float weight of `shape` in `dtype` from a GGML-quantized byte tensor, computed where `data` lies."""
    blocks = data.reshape(-1, BLOCKS[kind][1])
    return DEQUANTIZE[kind](blocks).reshape(shape).to(dtype)


def split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """A block's fields, `sizes` bytes each, then the rest."""
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def f16(field: torch.Tensor) -> torch.Tensor:
    return field.contiguous().view(torch.float16).float()


def shifted(q: torch.Tensor, width: int, shifts: tuple[int, ...]) -> torch.Tensor:
    """`q` in runs of `width` bytes, each shifted right by every one of `shifts`: (blocks, runs, shifts, width)."""
    by = constant(shifts, torch.uint8, q.device).reshape(1, 1, -1, 1)
    return q.reshape(q.shape[0], -1, 1, width) >> by


def nibbles(q: torch.Tensor, width: int) -> torch.Tensor:
    """4-bit codes, the low nibbles of a run of `width` bytes before their high ones."""
    return (shifted(q, width, (0, 4)) & 0x0F).reshape(q.shape[0], -1)


def high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The fifth bit of 32 codes, from the little-endian 32-bit word legacy 5-bit blocks keep them in."""
    return ((qh.contiguous().view(torch.int32) >> torch.arange(32, device=qh.device, dtype=torch.int32)) & 1).to(
        torch.uint8
    )


def q4_0(blocks):
    d, qs = split(blocks, 2)
    return f16(d) * (nibbles(qs, 16).to(torch.int8) - 8).float()


def q4_1(blocks):
    d, m, qs = split(blocks, 2, 2)
    return f16(d) * nibbles(qs, 16).float() + f16(m)


def q5_0(blocks):
    d, qh, qs = split(blocks, 2, 4)
    return f16(d) * ((nibbles(qs, 16) | (high_bits(qh) << 4)).to(torch.int8) - 16).float()


def q5_1(blocks):
    d, m, qh, qs = split(blocks, 2, 2, 4)
    return f16(d) * (nibbles(qs, 16) | (high_bits(qh) << 4)).float() + f16(m)


def q8_0(blocks):
    d, x = split(blocks, 2)
    return x.contiguous().view(torch.int8).float() * f16(d)


def k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins Q4_K and Q5_K pack into 12 bytes."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mins.float()


def q2_k(blocks):
    n = blocks.shape[0]
    scales, qs, d, dmin = split(blocks, QK_K // 16, QK_K // 4, 2)
    dl = (f16(d) * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (f16(dmin) * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = (shifted(qs, 32, (0, 2, 4, 6)) & 3).reshape(n, QK_K // 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def q3_k(blocks):
    n = blocks.shape[0]
    hmask, qs, scales, d = split(blocks, QK_K // 8, QK_K // 4, 12)
    low = scales[:, :8].reshape(n, 1, 8) >> constant((0, 4), torch.uint8, blocks.device)[:, None]
    high = scales[:, 8:].reshape(n, 1, 4) >> constant((0, 2, 4, 6), torch.uint8, blocks.device)[:, None]
    sc = (low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 0x03) << 4)
    dl = (f16(d) * (sc.to(torch.int8) - 32).float()).reshape(n, 16, 1)
    ql = shifted(qs, 32, (0, 2, 4, 6)).reshape(n, 16, QK_K // 16) & 3
    qh = (shifted(hmask, 32, tuple(range(8))).reshape(n, 16, QK_K // 16) & 1) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def q4_k(blocks):
    n = blocks.shape[0]
    d, dmin, scales, qs = split(blocks, 2, 2, 12)
    sc, mins = k_scales(scales)
    q = nibbles(qs, 32).reshape(n, -1, 32).float()
    return ((f16(d) * sc).reshape(n, -1, 1) * q - (f16(dmin) * mins).reshape(n, -1, 1)).reshape(n, QK_K)


def q5_k(blocks):
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = split(blocks, 2, 2, 12, QK_K // 8)
    sc, mins = k_scales(scales)
    high = (shifted(qh, 32, tuple(range(8))) & 1).reshape(n, -1, 32)
    q = (nibbles(qs, 32).reshape(n, -1, 32) | (high << 4)).float()
    return ((f16(d) * sc).reshape(n, -1, 1) * q - (f16(dmin) * mins).reshape(n, -1, 1)).reshape(n, QK_K)


def q6_k(blocks):
    n = blocks.shape[0]
    ql, qh, scales, d = split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    dl = (f16(d) * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    low = nibbles(ql, 64).reshape(n, -1, 32)
    high = (shifted(qh, 32, (0, 2, 4, 6)) & 3).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (dl * q).reshape(n, QK_K)


def iq4_nl(blocks):
    d, qs = split(blocks, 2)
    values = constant(IQ4_VALUES, torch.float32, blocks.device)
    return f16(d) * values[nibbles(qs, 16).long()]


def iq4_xs(blocks):
    n = blocks.shape[0]
    d, scales_h, scales_l, qs = split(blocks, 2, 2, QK_K // 64)
    high = scales_h.contiguous().view(torch.int16).int().reshape(n, 1)
    high = (high >> torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)) & 3
    low = torch.stack([scales_l & 0x0F, scales_l >> 4], dim=-1).reshape(n, 8)
    dl = (f16(d) * ((low | (high.to(torch.uint8) << 4)).to(torch.int8) - 32).float()).reshape(n, -1, 1)
    values = constant(IQ4_VALUES, torch.float32, blocks.device)
    return (dl * values[nibbles(qs, 16).long()].reshape(n, -1, 32)).reshape(n, QK_K)


DEQUANTIZE = {
    "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0, "Q2_K": q2_k, "Q3_K": q3_k,
    "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs,
}  # fmt: skip
