"""The speed and memory levers of a run, each switchable (bench/transformer_speed.py and bench/end_to_end.py
measure them; tests/test_levers.py and tests/test_streaming.py hold each within bf16 tolerance of the plain path,
fp8 GEMMs within that of ComfyUI's own fp8 GEMMs).

- attention: the kernel (`attention.BACKENDS`; `auto` picks per device);
- residual: the dtype of the residual stream, norms and RoPE between the GEMMs: `fp32` (the references' and
  ComfyUI's) or `compute` (the GEMMs' dtype: half the elementwise traffic in bf16, about 1.3x the plain bf16
  error against fp32);
- compile: regional `torch.compile` of the repeated blocks with dynamic shapes, so a new resolution or caption
  length does not recompile (the first call pays the compile: seconds to a minute);
- gemm: how Linears holding fp8, int8, mxfp8 or nvfp4 weights multiply (`gemm.MODES`): `dequantize` (the plain
  path), `auto` (fp8 `_scaled_mm`, int8 `_int_mm` and Blackwell's block-scaled GEMMs where the GPU runs them fast),
  `lowp` (fp8 and int8 wherever they run, the CPU too; the block-scaled ones where the GPU has them);
- vram: a budget in GB for the weights on the device (0: no limit): the text encoder and the transformer load
  into host memory and stream the blocks that do not fit (`streaming.py`);
- graphs: the transformer's plain forwards replayed from CUDA graphs, one per shape and caption lengths
  (`graphs.py`; CUDA only, not with streaming, whose weights move).

Inside ComfyUI the host decides these (its attention flags, its TorchCompileModel node, its partial loading, its
`--fast` flags); they are for the CLI and the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gemm
from .attention import attention, known, use_attention
from .graphs import Graphs
from .streaming import stream

RESIDUALS = ("fp32", "compute")


@dataclass(frozen=True)
class Speed:
    attention: str = "auto"
    residual: str = "fp32"
    compile: bool = False
    gemm: str = "dequantize"
    vram: float = 0.0
    graphs: bool = False

    def __post_init__(self):
        known(self.attention)
        if not self.vram >= 0:
            raise ValueError(f"VRAM budget {self.vram!r} GB: give a positive number of GB, or 0 for no limit")
        if self.graphs and self.vram:
            raise ValueError("CUDA graphs replay the weights where they were captured and streaming moves them: use "
                             "one or the other")  # fmt: skip
        gemm.known(self.gemm)
        if self.residual not in RESIDUALS:
            raise ValueError(f"unknown residual dtype {self.residual!r}: use one of {', '.join(RESIDUALS)}")

    def kernel(self, device, dtype: torch.dtype, head_dim: int = 128):
        """The attention kernel; a backend `device` cannot run in `dtype` fails here, before anything loads."""
        return attention(self.attention, device, dtype, head_dim)

    def gemms(self, device, dtype: torch.dtype) -> frozenset[str]:
        """The low-precision GEMMs to use; asked for where they cannot run, this fails before anything loads."""
        return gemm.kinds(self.gemm, device, dtype)

    def check(self, device, dtype: torch.dtype):
        """Fail now, before anything loads, on a lever `device` cannot run in `dtype`."""
        self.kernel(device, dtype)
        self.gemms(device, dtype)
        if self.graphs and torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")

    def home(self, device) -> str | torch.device:
        """Where to load a model: host memory when it will stream, else `device`."""
        return "cpu" if self.vram else device

    def place(self, model: torch.nn.Module, device) -> torch.nn.Module:
        """A model loaded at `home` set to run on `device`: streamed within the budget where one is set."""
        return stream(model, device, self.vram) if self.vram else model

    def apply(self, model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
        """`model` (a transformer or a ControlNet) set to run with these levers on `device` in `dtype`."""
        use_attention(model, self.kernel(device, dtype, model.cfg.head_dim))
        gemm.use_gemms(model, self.gemms(device, dtype))
        if hasattr(model, "residual_dtype"):
            model.residual_dtype = dtype if self.residual == "compute" else torch.float32
        if self.compile:
            compile_blocks(model)
        if self.graphs and hasattr(model, "graphs"):
            model.graphs = Graphs()
        return model


PLAIN = Speed()


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Compile each repeated block in place (regional compilation: one graph per block kind, reused by every
    block of that kind), with dynamic shapes so sequence lengths do not recompile."""
    for name in ("noise_refiner", "context_refiner", "siglip_refiner", "layers", "control_layers",
                 "control_noise_refiner"):  # fmt: skip
        for block in getattr(model, name, ()):
            block.compile(dynamic=True)
    return model
