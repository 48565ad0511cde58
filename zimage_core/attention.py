"""Attention kernels for the core (the CLI and the library); inside ComfyUI the host's own choice runs instead
(`nodes/model.py` `host_attention`: its sage, flash, xformers or PyTorch flags).

Every kernel takes q, k, v of (B, S, heads, head_dim) and a mask (B, S) of the keys that exist, and returns
(B, S, heads * head_dim). `auto` picks per device: on Hopper and later PyTorch's cuDNN attention first (1.9x flash
and 3.6x memory-efficient at 4224 tokens on an H100, ../shared/reference/gpu-peers.md), elsewhere PyTorch's own
order. FlashAttention (`flash_attn`) and SageAttention (`sageattention`) run when installed and asked for; neither
takes a key mask, so a masked batch (captions of different lengths) goes to PyTorch's attention.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA = {"sdpa": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
        "math": "MATH"}  # fmt: skip
PACKAGES = {"flash-attn": ("flash_attn", "flash_attn_func", {}), "sage": ("sageattention", "sageattn",
            {"tensor_layout": "NHD"})}  # fmt: skip
BACKENDS = ("auto", *SDPA, *PACKAGES)


def sdpa(q: torch.Tensor, k, v, mask: torch.Tensor | None, backends: tuple = ()) -> torch.Tensor:
    """PyTorch's scaled-dot-product attention, restricted to `backends` (in that order of preference) if given."""
    if mask is not None:
        mask = mask[:, None, None, :]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backends:
        with sdpa_kernel(list(backends), set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def packaged(kernel: Callable, q: torch.Tensor, k, v, mask: torch.Tensor | None, **options) -> torch.Tensor:
    """A FlashAttention or SageAttention kernel (both take (B, S, heads, head_dim)); masked batches go to SDPA."""
    if mask is not None:
        return sdpa(q, k, v, mask)
    return kernel(q, k, v, **options).flatten(2)


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The SDPA backends `auto` prefers on `device`: cuDNN first on Hopper and later, else PyTorch's choice."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return ()


def known(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: use one of {', '.join(BACKENDS)}")
    return name


def attention(name: str, device: str | torch.device, dtype: torch.dtype, head_dim: int = 128) -> Callable:
    """The kernel called `name` (one of `BACKENDS`) for `device` and `dtype`, tried once on a small input so a
    backend this device, dtype or install cannot run fails here, by name, and not in the middle of sampling."""
    device = torch.device(device)
    if known(name) in PACKAGES:
        module, function, options = PACKAGES[name]
        try:
            kernel = getattr(importlib.import_module(module), function)
        except ImportError as e:
            raise ValueError(f"attention {name!r} needs the {module} package ({e}); pip install it or use auto") from e
        fn = functools.partial(packaged, kernel, **options)
    else:
        order = auto_order(device) if name == "auto" else (SDPA[name],) if SDPA[name] else ()
        fn = functools.partial(sdpa, backends=tuple(getattr(SDPBackend, b) for b in order))
    q = torch.zeros(1, 32, 1, head_dim, device=device, dtype=dtype)
    try:
        fn(q, q, q, None)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"attention {name!r} cannot run on {device} in {dtype}: {str(e).splitlines()[0]}") from e
    return fn


def use_attention(model: torch.nn.Module, kernel: Callable) -> torch.nn.Module:
    """Make every attention layer of `model` (those built from an ops namespace: `attend`) call `kernel`."""
    for module in model.modules():
        if hasattr(module, "attend"):
            module.attend = kernel
    return model
