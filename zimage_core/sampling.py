"""Flow-matching Euler sampling with the references' shifted sigma schedule and classifier-free guidance.

The numbers are diffusers' `ZImagePipeline` with `FlowMatchEulerDiscreteScheduler` (shift 3, static): sigmas
evenly spaced in (0, 1] in float32, shifted, then a final 0, one transformer evaluation per sigma before the 0.
Latents are float32 between steps and cast to the transformer's dtype for each evaluation.

Guidance `scale` is diffusers' g (`pred = cond + g * (cond - uncond)`, off at 0); ComfyUI's cfg is g + 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import limits
from .edit import EditConditioning
from .text_encoder import Embeddings
from .vae import VAEConfig

if TYPE_CHECKING:
    from .controlnet import Control

FACTOR = VAEConfig().factor  # the Flux VAE's 8: image pixels per latent pixel
PATCH = 2  # every released Z-Image transformer's latent patch size
SHIFT = 3.0  # Z-Image's scheduler_config.json (Turbo; ComfyUI uses it for every Z-Image model)
VARIETY_SEED_OFFSET = 7919  # seed variety draws from seed + this, a stream apart from the latent noise's
VARIETY_STEPS = 2  # evaluations that see the varied prompt
# Steps and CFG (ComfyUI's scale) each variant samples with by default. Turbo: the official 8 NFE without CFG.
# Base (and Omni, trained from it): ComfyUI's Base template, 25 steps at CFG 4, inside the model card's 28-50 steps
# and CFG 3-5 (the card's scale is diffusers' guidance_scale = CFG - 1) at the fast end, so a user comparing with
# the template gets its image.
VARIANT_SETTINGS = {"turbo": (8, 1.0), "base": (25, 4.0), "omni": (25, 4.0)}


def sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """`steps` + 1 noise levels from 1 down to 0: one transformer evaluation per step, none at the final 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.cat([shifted(torch.linspace(1.0, 1 / steps, steps), shift), torch.zeros(1)])


def shifted(s, shift: float = SHIFT):
    """Flow time `s` (1: noise) under the resolution-independent shift, as diffusers' scheduler shifts it."""
    return shift * s / (1 + (shift - 1) * s)


def control_range(start: float, end: float, shift: float = SHIFT) -> tuple[float, float]:
    """Sigmas (high, low) between which a ControlNet acts, from fractions of the denoising process as ComfyUI's
    `percent_to_sigma` reads start_percent and end_percent (0: the start, 1: the end)."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"control start {start} and end {end} must satisfy 0 <= start <= end <= 1")
    high = 1.0 if start <= 0 else float(shifted(torch.tensor(1.0 - start), shift))
    low = 0.0 if end >= 1 else float(shifted(torch.tensor(1.0 - end), shift))
    return high, low


def noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Initial latents as diffusers draws them for one CPU generator per image: float32, on the CPU."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def start_index(steps: int, strength: float) -> int:
    """img2img and inpaint: how many of `steps` sigmas to skip for `strength` (ComfyUI's denoise), as diffusers."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength (denoise) must be within [0, 1], got {strength}")
    first = int(max(steps - min(steps * strength, steps), 0))
    if first >= steps:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run: raise either")
    return first


def noised(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Latents at noise level `sigma` on the straight path from `clean` to `noise`."""
    return sigma * noise + (1.0 - sigma) * clean


def encode_with_noise(vae, images: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """img2img/inpaint inputs drawn as diffusers draws them: one CPU generator per image, seeded with its seed,
    first for the posterior sample of the image, then for the noise. Returns (normalized latents, noise)."""
    latents, noises = [], []
    for image, seed in zip(images, seeds):
        generator = torch.Generator().manual_seed(seed)
        z = vae.cfg.normalize(vae.encode(image[None], sample=True, generator=generator))
        latents.append(z)
        noises.append(torch.randn(z.shape, generator=generator).to(z.device))
    return torch.cat(latents), torch.cat(noises)


def vary(cond: Embeddings, seeds: list[int], strength: float) -> Embeddings:
    """Turbo's seed variety: the caption features plus seeded Gaussian noise, `strength` times each prompt's RMS.

    Turbo gives near-identical images for different seeds; conditioning that differs per seed for the first
    evaluations (`sample(..., variety=(vary(...), k))`) spreads the compositions and leaves the details to the
    clean prompt. The noise comes from its own generator per seed, so a seed always gives the same image.
    """
    features = cond.features.clone()
    for i, (seed, n) in enumerate(zip(seeds, cond.lengths)):
        real = features[i, :n].float()
        generator = torch.Generator().manual_seed((seed + VARIETY_SEED_OFFSET) % 2**64)
        jitter = torch.randn(real.shape, generator=generator).to(real.device)
        features[i, :n] = (real + strength * real.square().mean().sqrt() * jitter).to(features.dtype)
    return Embeddings(features, cond.lengths, cond.dropped)


def batch(*parts: Embeddings) -> tuple[torch.Tensor, list[int]]:
    """Caption features of several Embeddings as one right-padded batch, and every item's length."""
    longest = max(p.features.shape[1] for p in parts)
    features = [F.pad(p.features, (0, 0, 0, longest - p.features.shape[1])) for p in parts]
    return torch.cat(features), [n for p in parts for n in p.lengths]


@torch.no_grad()
def sample(
    model,
    latents: torch.Tensor,
    cond: Embeddings | EditConditioning,
    uncond: Embeddings | EditConditioning | None = None,
    schedule: torch.Tensor | None = None,
    scale: float = 0.0,
    truncation: float = 1.0,
    normalization: float = 0.0,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    variety: tuple[Embeddings, int] | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """Denoise `latents` (B, C, h, w) from `schedule[0]` down to `schedule[-1]`; returns float32 latents.

    With `scale` > 0 and `uncond`, each evaluation runs cond and uncond as one batch of 2B, except on steps where
    1 - sigma exceeds `truncation` (guidance off there). `normalization` k > 0 caps each guided prediction's norm
    at k times the cond prediction's. `callback(step, total, x0)` gets the predicted clean latents after each
    step; `cancelled()` is asked before each evaluation and stops with `InterruptedError`.
    `inpaint` = (clean latents, noise, mask (B, 1, h, w), 1 = repaint): after each step the kept region is put back
    at the next noise level (clean after the last step), as diffusers' inpaint pipeline does.
    `variety` = (perturbed cond from `vary`, k): the first k evaluations see it instead of `cond`.
    When the 2B guided batch runs out of CUDA memory, cond and uncond run one after the other.
    With `EditConditioning`, its references condition every evaluation (an edit negative gives only its text).
    `control`: a ControlNet and its input, joining every evaluation whose sigma is within its range.
    """
    schedule = sigmas(8) if schedule is None else schedule
    device, dtype = model.device, model.dtype
    guided = scale > 0 and uncond is not None
    if control is not None:
        if isinstance(cond, EditConditioning):
            raise ValueError("a ControlNet conditions text-to-image sampling; edit conditioning cannot take one")
        control.check(model.cfg, latents.shape)
    if isinstance(cond, EditConditioning):
        model = functools.partial(cond.to(device, dtype).velocity, model)
        cond = cond.text
    if isinstance(uncond, EditConditioning):
        uncond = uncond.text

    def prepare(first: Embeddings) -> tuple[torch.Tensor, list[int]]:
        captions, lengths = batch(first, uncond) if guided else batch(first)
        return captions.to(device), lengths

    plain = prepare(cond)
    varied, varied_steps = (prepare(variety[0]), variety[1]) if variety is not None else (plain, 0)
    n = len(cond.lengths)
    x = latents.to(device, torch.float32)
    timesteps = schedule.to(device) * 1000
    total = len(schedule) - 1
    # Read on the host once, so the loop never waits for the device: the sigmas, each step's float32 size, and the
    # model time as the device computes it below (the same float32 operations give the same values).
    sigma, step = schedule.tolist(), (schedule[1:] - schedule[:-1]).tolist()
    model_time = ((1000 - schedule * 1000) / 1000).tolist()
    clean, start, mask = (part.to(device) for part in inpaint) if inpaint is not None else (None, None, None)
    for i in range(total):
        if cancelled is not None and cancelled():
            raise InterruptedError(f"cancelled before step {i + 1} of {total}")
        t = ((1000 - timesteps[i]) / 1000).expand(x.shape[0])
        captions, lengths = varied if i < varied_steps else plain
        extra = {"control": control} if control is not None and control.active(sigma[i]) else {}
        if guided and model_time[i] <= truncation:
            try:
                pos, neg = (
                    model(x.to(dtype).repeat(2, 1, 1, 1), t.repeat(2), captions, lengths, **extra).float().chunk(2)
                )
            except torch.cuda.OutOfMemoryError:  # one after the other when the batch of 2B does not fit
                pos = model(x.to(dtype), t, captions[:n], lengths[:n], **extra).float()
                neg = model(x.to(dtype), t, captions[n:], lengths[n:], **extra).float()
            v = pos + scale * (pos - neg)
            if normalization > 0:
                limit = pos.flatten(1).norm(dim=1) * normalization
                norm = v.flatten(1).norm(dim=1)
                v = v * torch.where(norm > limit, limit / norm, torch.ones_like(norm))[:, None, None, None]
        else:
            v = model(x.to(dtype), t, captions[:n], lengths[:n], **extra).float()
        x = x + step[i] * -v
        if callback is not None:
            callback(i + 1, total, x - sigma[i + 1] * -v)
        if mask is not None:
            keep = noised(clean, start, sigma[i + 1]) if i < total - 1 else clean
            x = (1 - mask) * keep + mask * x
    return x


def denoise(
    transformer,
    cond: Embeddings | EditConditioning,
    uncond: Embeddings | EditConditioning | None,
    seeds: list[int],
    steps: int = 8,
    cfg: float = 1.0,
    *,
    shape: tuple[int, int, int] | None = None,
    clean: torch.Tensor | None = None,
    start_noise: torch.Tensor | None = None,
    strength: float = 1.0,
    masks: torch.Tensor | None = None,
    variety: float = 0.0,
    variety_steps: int = VARIETY_STEPS,
    shift: float = SHIFT,
    factor: int = FACTOR,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """Sample one image's latents per seed, in the transformer's (normalized) latent space, float32.

    From noise of `shape` (C, h, w), or from `clean` latents (B, C, h, w) at `strength` (img2img), repainting only
    where `masks` (B or 1, H, W) is >= 0.5 (inpaint). Noise is drawn per seed unless `start_noise` is given.
    `cond`/`uncond` with one item serve every seed. `factor` is the VAE's, for the size check in image pixels.
    Every setting and input is checked first (`limits`), so a bad one fails before any evaluation.
    """
    n = len(seeds)
    limits.settings(steps, cfg, strength, shift, variety, variety_steps)
    if variety > 0 and isinstance(cond, EditConditioning):
        raise ValueError("seed variety varies text conditioning; with edit conditioning set it to 0")
    channels = transformer.cfg.in_channels
    if clean is not None:
        limits.latents("latent", clean, channels)
        if clean.shape[0] != n:
            raise ValueError(f"{clean.shape[0]} latents but {n} seeds")
    h, w = shape[1:] if clean is None else clean.shape[2:]
    _, rows, cols = transformer.cfg.axes_lens
    limits.size(w * factor, h * factor, factor * transformer.cfg.patch_size, (cols, rows))
    if masks is not None:
        if clean is None:
            raise ValueError("a mask needs the latent of the image to inpaint: connect Z-Image VAE Encode's output")
        masks = limits.mask(masks, n, h, w, factor)
    cond = cond.repeat(n)
    uncond = uncond.repeat(n) if uncond is not None and cfg > 1 else None
    schedule = sigmas(steps, shift)
    inpaint = None
    if clean is None:
        latents = noise(shape, seeds)
    else:
        start_noise = noise(clean.shape[1:], seeds) if start_noise is None else start_noise
        schedule = schedule[start_index(steps, strength) :]
        latents = noised(clean, start_noise, schedule[0])
        if masks is not None:
            mask = F.interpolate((masks[:, None].float() >= 0.5).float(), (h, w), mode="nearest")
            inpaint = (clean, start_noise, mask.expand(n, -1, -1, -1))
    varied = (vary(cond, seeds, variety), variety_steps) if variety > 0 else None
    return sample(transformer, latents, cond, uncond, schedule, cfg - 1, callback=callback, cancelled=cancelled,
                  inpaint=inpaint, variety=varied, control=control)  # fmt: skip
