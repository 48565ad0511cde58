"""Quantized weights as ComfyUI stores them (`comfy_quant`) and as GGUF files do (`ggml.py`): the formats, each
layer's tensors, and the one place they turn back into float weights.

Names and layouts are ComfyUI 0.33.0's (`comfy/quant_ops.py` QUANT_ALGOS, `comfy/ops.py`
`_load_quantized_module`): per layer `weight`, `weight_scale` (and `weight_scale_2` for nvfp4) and a `comfy_quant`
JSON tensor, or one `_quantization_metadata` table in the header. The arithmetic follows comfy-kitchen 0.2.31's
eager backend (`backends/eager/quantization.py`) operation for operation, so the tests, which quantize with
comfy-kitchen, can ask for bit-equal weights. Weights stay compact in memory and `dequantize` runs per layer and
per call, unless a layer multiplies by its format's own GEMM (`gemm.py`: int8, fp8, mxfp8 and nvfp4).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import ggml

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
STORAGE = {  # format -> (stored dtype, block size of its scales, values per stored element)
    "float8_e4m3fn": (torch.float8_e4m3fn, 0, 1),
    "float8_e5m2": (torch.float8_e5m2, 0, 1),
    "int8_tensorwise": (torch.int8, 0, 1),
    "mxfp8": (torch.float8_e4m3fn, 32, 1),
    "nvfp4": (torch.uint8, 16, 2),
}
KNOWN_ELSEWHERE = ("convrot_w4a4", "asym_w4a8_int8")  # in ComfyUI's table, used by no Z-Image file we know
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Format:
    """How one layer's weight is stored: a `comfy_quant` format (and the ConvRot group size for rotated int8), or
    a GGML block type from a GGUF file."""

    name: str
    convrot: int = 0

    @classmethod
    def parse(cls, conf, where: str) -> Format:
        """A layer's `comfy_quant` entry (a dict, or the bare format name in old tables) as a Format."""
        conf = conf if isinstance(conf, dict) else {"format": conf}
        name = conf.get("format")
        if name not in STORAGE:
            known = ", ".join(STORAGE)
            later = " (a format ComfyUI knows, no Z-Image file we know uses it)" if name in KNOWN_ELSEWHERE else ""
            raise ValueError(f"{where} is quantized as {name!r}{later}; we load {known}. Use another file of it.")
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        rotated = conf.get("convrot", params.get("convrot", False))
        group = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))) if rotated else 0
        if group and name != "int8_tensorwise":
            raise ValueError(f"{where}: ConvRot is defined for int8_tensorwise only, not {name!r}.")
        return cls(name, group)

    @property
    def storage(self) -> torch.dtype:
        return torch.uint8 if self.name in ggml.BLOCKS else STORAGE[self.name][0]

    @property
    def label(self) -> str:
        return f"{self.name} + convrot {self.convrot}" if self.convrot else self.name

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The (padded) weight shape a stored tensor holds: nvfp4 packs two values in a byte."""
        return (*stored[:-1], stored[-1] * STORAGE[self.name][2])

    def fits(self, stored: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        """Whether a stored tensor holds a weight of `shape`, padded as the format pads (to 16 or 32); a GGUF
        tensor's `stored` is its shape in the model."""
        if self.name in ggml.BLOCKS:
            return tuple(stored) == tuple(shape)
        block = STORAGE[self.name][1]
        have = self.logical_shape(stored)
        if len(have) != len(shape):
            return False
        return all(h == s or (block and s < h < s + block + block) for h, s in zip(have, shape))

    def prepare_scale(self, scale: torch.Tensor, stored: tuple[int, ...]) -> torch.Tensor:
        """The file's scale as `dequantize` reads it, in memory of its own (the file's pages can go back): block
        scales leave cuBLAS's tiled layout once, at load."""
        block = STORAGE[self.name][1]
        if not block:
            return (scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())).clone()
        rows, cols = stored[0], self.logical_shape(stored)[1] // block
        raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
        plain = from_blocked(raw.reshape(-1), rows, cols)
        return plain.view(torch.float8_e4m3fn) if self.name == "nvfp4" else plain


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Undo cuBLAS's block-scale tiling (128 x 4 tiles stored as 32 x 16), as comfy-kitchen's `from_blocked`."""
    row_blocks, col_blocks = -(-rows // 128), -(-cols // 4)  # one copy: the load's temporaries stay few
    tiles = blocked.reshape(row_blocks, col_blocks, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_blocks * 128, col_blocks * 4)[:rows, :cols]


def to_blocked(plain: torch.Tensor) -> torch.Tensor:
    """cuBLAS's block-scale tiling of (rows, cols) scales, zero-padded to whole 128 x 4 tiles: the layout the
    block-scaled GEMMs read (`gemm.py`), as comfy-kitchen's `to_blocked`; `from_blocked` undoes it."""
    rows, cols = plain.shape
    row_blocks, col_blocks = -(-rows // 128), -(-cols // 4)
    padded = plain.new_zeros(row_blocks * 128, col_blocks * 4)
    padded[:rows, :cols] = plain
    tiles = padded.reshape(row_blocks, 4, 32, col_blocks, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_blocks * 128, col_blocks * 4)


@lru_cache(maxsize=16)
def hadamard(size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized regular Hadamard matrix ConvRot rotates by (Kronecker powers of one 4 x 4; symmetric and
    its own inverse), as comfy-kitchen's `_build_hadamard`."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=dtype, device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    if h.shape[0] != size:
        raise ValueError(f"ConvRot group size {size} is not a power of 4.")
    return h / size**0.5


def dequantize(
    weight: torch.Tensor,
    fmt: Format | None,
    scale: torch.Tensor | None,
    scale_2: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The float weight of `shape` in `dtype`, computed where `weight` lies. fp8 multiplies in `dtype` and nvfp4
    scales in `dtype`; int8 and mxfp8 scale in fp32: each as comfy-kitchen does, so results match bit for bit."""
    if fmt is None or fmt.name in ("float8_e4m3fn", "float8_e5m2"):
        w = weight.to(dtype)
        return w if scale is None else w * scale.to(weight.device, dtype)
    if fmt.name in ggml.BLOCKS:
        return ggml.dequantize(weight, fmt.name, shape, dtype)
    scale = scale.to(weight.device)
    rows = weight.shape[0]
    if fmt.name == "int8_tensorwise":
        w = weight.float() * scale
        if fmt.convrot:
            g = fmt.convrot
            w = (w.reshape(rows, -1, g) @ hadamard(g, w.device).T).reshape(rows, -1)
    elif fmt.name == "mxfp8":
        exponents = (scale.to(torch.int32) << 23).view(torch.float32)
        exponents = torch.where(scale == 0, 0.0, exponents)
        w = (weight.float().reshape(rows, -1, 32) * exponents[..., None]).reshape(rows, -1)
    else:  # nvfp4: two e2m1 values a byte, high nibble first, times an fp8 scale per 16 and one per tensor
        codes = torch.stack([weight >> 4, weight & 0x0F], dim=-1).reshape(rows, -1).int()
        w = ggml.constant(E2M1, dtype, weight.device)[codes]
        total = scale_2.to(weight.device, dtype) * scale.to(dtype)
        w = (w.reshape(rows, -1, 16) * total[..., None]).reshape(rows, -1)
    return w[tuple(slice(0, n) for n in shape)].to(dtype)
