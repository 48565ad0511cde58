"""The layers the models are built from, passed in as a namespace (ComfyUI's `operation_settings` pattern).

`DEFAULT` is ours, so the CLI and the library need no host. Inside ComfyUI the nodes pass the host's own layers
(`comfy.ops`) and attention instead, so its partial loading, dtype and attention flags apply. Every layer here
follows the host's contract: it computes in its input's dtype on its input's device, whatever it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm
from .attention import sdpa
from .quant import Format, dequantize


class Compact:
    """A Linear weight held as stored (fp8 with a per-row scale, int8, mxfp8, nvfp4, GGML blocks; `quant.py`),
    turned dense only for the call that needs it, so a quantized checkpoint is never held twice. The loader
    (`checkpoint.fill`) keeps a weight compact in any Linear that mixes this in: ours and, inside ComfyUI, the
    host's."""

    def hold_compact(self):
        self.quant: Format | None = None
        self.dense_dtype = torch.float32  # the dtype the loader would have held it in (an embedding's output)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_scale_2", None)
        self.lowp: str | None = None  # the low-precision GEMM it multiplies by, if any (`gemm.use_gemms`)

    @property
    def is_compact(self) -> bool:
        return self.quant is not None or self.weight_scale is not None

    @property
    def dense_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dense_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(device)
        return dequantize(w, self.quant, self.weight_scale, self.weight_scale_2, self.dense_shape, dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of the dense weight in `dense_dtype`, dequantizing only them: every format here
        scales each row on its own (block scales are untiled at load), so a lookup never needs the table dense."""
        rows = ids.reshape(-1).to(self.weight.device)
        scale = self.weight_scale
        if scale is not None and scale.dim() and scale.shape[0] == self.weight.shape[0]:
            scale = scale[rows]
        shape = (len(rows), self.dense_shape[1])
        w = dequantize(
            self.weight[rows].to(ids.device), self.quant, scale, self.weight_scale_2, shape, self.dense_dtype
        )
        return w.reshape(*ids.shape, shape[1])


class Linear(Compact, nn.Linear):
    """`nn.Linear` that computes in its input's dtype whatever form it holds its weight in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_compact()
        self.weight_function: list[Callable] = []  # per-call updates of a compact weight (`lora.apply_loras`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        if self.lowp and not self.weight_function and (out := gemm.linear(self, x)) is not None:
            return out if b is None else out + b
        w = self.dense_weight(x.device, x.dtype)
        for update in self.weight_function:
            w = update(w)
        return F.linear(x, w, b)


class Embedding(Compact, nn.Embedding):
    """`nn.Embedding` that can hold its table compact (a GGUF file's token embedding): a lookup dequantizes only
    the rows it reads, in the dtype the loader would have held the table in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_compact()

    @property
    def dense_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids) if self.is_compact else super().forward(ids)


class RMSNorm(nn.Module):
    """RMSNorm in its input's dtype (the models call it on fp32), with the signature of `torch.nn.RMSNorm`."""

    def __init__(self, dim: int, eps: float | None = None, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.device, x.dtype), self.eps)


class Ops(NamedTuple):
    Linear: type = Linear
    RMSNorm: type = RMSNorm
    attention: Callable = sdpa
    Embedding: type = Embedding


DEFAULT = Ops()
