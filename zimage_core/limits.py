"""What a request may ask for: each setting's range and the checks on inputs, shared by the command line and the
ComfyUI nodes, so that one graph and one command accept the same values, refuse the same ones with the same words,
and give the same numbers.

Every refusal is a `ValueError` that names the setting (the node input's name) and says what would be accepted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Range(NamedTuple):
    low: float
    high: float


STEPS = Range(1, 1000)
CFG = Range(1.0, 30.0)  # ComfyUI's scale: 1 = off
DENOISE = Range(0.0, 1.0)
SHIFT = Range(0.1, 100.0)  # at 0 every sigma is 0: nothing would be denoised
VARIETY = Range(0.0, 2.0)
VARIETY_STEPS = Range(1, 1000)
SIZE = Range(16, 4096)  # pixels, whole latent patches (16 for the Flux VAE)
BATCH = Range(1, 64)
SEED = Range(0, 2**64 - 1)
MAX_LENGTH = Range(0, 65536)  # tokens per prompt; 0 keeps every token
LORA_STRENGTH = Range(-100.0, 100.0)  # ComfyUI's LoRA loaders'
CONTROL_STRENGTH = Range(-10.0, 10.0)  # ComfyUI's ZImageFunControlnet's


def number(name: str, value, allowed: Range, integer: bool = False):
    """`value` when it is a finite number within `allowed` (a whole one when `integer`), else a ValueError."""
    what = "a whole number" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
    if not ok or not allowed.low <= value <= allowed.high:
        raise ValueError(f"{name} is {value!r}; it must be {what} from {allowed.low:g} to {allowed.high:g}")
    return value


def settings(steps: int, cfg: float, denoise: float, shift: float, variety: float, variety_steps: int):
    """The sampling settings' ranges, checked before anything slow runs."""
    number("steps", steps, STEPS, integer=True)
    number("cfg", cfg, CFG)
    number("denoise", denoise, DENOISE)
    number("shift", shift, SHIFT)
    number("variety", variety, VARIETY)
    number("variety_steps", variety_steps, VARIETY_STEPS, integer=True)


def seeds(seed: int, n: int) -> list[int]:
    """Image i of a batch uses seed + i (wrapping at 2^64), so any image of a batch can be made again alone."""
    number("seed", seed, SEED, integer=True)
    number("batch_size", n, BATCH, integer=True)
    return [(seed + i) % 2**64 for i in range(n)]


def size(width: int, height: int, cell: int, most: tuple[int, int] | None = None):
    """Images are whole patches of latent pixels (`cell` image pixels), and at most `most` patches across/down
    (the transformer's position table)."""
    number("width", width, SIZE, integer=True)
    number("height", height, SIZE, integer=True)
    if width % cell or height % cell:
        raise ValueError(f"width and height must be multiples of {cell} for this model, got {width}x{height}")
    if most is not None and (width // cell > most[0] or height // cell > most[1]):
        raise ValueError(
            f"{width}x{height} is beyond this model's position table: at most {most[0] * cell}x{most[1] * cell}"
        )


def finite(name: str, tensor: torch.Tensor):
    """Refuse NaN or infinite values, which would silently give black or noise images."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN or infinite values of {tensor.numel()}: it was made wrongly upstream")


def latents(name: str, z: torch.Tensor, channels: int):
    """Image latents (B, channels, h, w) with finite values."""
    if z.ndim != 4 or z.shape[1] != channels:
        raise ValueError(
            f"{name} has shape {tuple(z.shape)}; Z-Image works on {channels}-channel Flux latents (B, {channels}, h, "
            "w): use EmptySD3LatentImage or Z-Image VAE Encode, not an SD 1.x/XL (4-channel) or video latent"
        )
    finite(name, z)


def mask(m: torch.Tensor, batch: int, height: int, width: int, factor: int) -> torch.Tensor:
    """An inpaint mask (B or 1, H, W) at the image's size (H, W) = (height, width) * factor, or the latent's.
    ComfyUI's latent noise masks (B, 1, H, W) are taken too. A mask of another size is resized to the image's, as
    ComfyUI's samplers do: LoadImage gives an image without alpha a 64 x 64 empty mask, so an inpaint workflow run
    before a mask is painted keeps the whole image instead of failing."""
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[0] not in (1, batch)):
        raise ValueError(f"mask has shape {tuple(m.shape)}; it must be (H, W), (1, H, W) or ({batch}, H, W)")
    finite("mask", m)
    m = m.reshape(-1, *m.shape[-2:])
    if tuple(m.shape[-2:]) not in ((height * factor, width * factor), (height, width)):
        m = resize_mask(m, height * factor, width * factor)
    return m


def resize_mask(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask (B, H, W) at another size, nearest (it is binarized at 0.5 where it is used)."""
    return F.interpolate(m[:, None].float(), size=(height, width), mode="nearest")[:, 0]
