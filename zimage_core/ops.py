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

from .quant import Format, dequantize


class Linear(nn.Linear):
    """`nn.Linear` that computes in its input's dtype whatever form it holds its weight in.

    Quantized weights (fp8, int8, mxfp8, nvfp4; `quant.py`) stay compact in memory and are dequantized for each
    call, as ComfyUI does, so a quantized checkpoint is never held twice.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant: Format | None = None
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_scale_2", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.device)
        w = dequantize(
            w, self.quant, self.weight_scale, self.weight_scale_2, (self.out_features, self.in_features), x.dtype
        )
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, w, b)


class RMSNorm(nn.Module):
    """RMSNorm in its input's dtype (the models call it on fp32), with the signature of `torch.nn.RMSNorm`."""

    def __init__(self, dim: int, eps: float | None = None, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.device, x.dtype), self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention over (B, S, heads, head_dim) to (B, S, heads * head_dim); `mask` (B, S) marks the
    keys that exist."""
    if mask is not None:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class Ops(NamedTuple):
    Linear: type = Linear
    RMSNorm: type = RMSNorm
    attention: Callable = attention
    Embedding: type = nn.Embedding


DEFAULT = Ops()
