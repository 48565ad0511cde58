"""The Flux autoencoder Z-Image uses: images in [0, 1] to 16-channel latents and back, whole or in bands.

Numerically the official `src/zimage/autoencoder.py` (= diffusers' `AutoencoderKL` with the Flux config). Module
names follow Black Forest Labs' `ae.safetensors` (`down.{i}.block.{j}`, `mid.attn_1`, `up.{i}`), which ComfyUI
ships; `loaders.py` maps diffusers' `vae/` folder onto them. Widths, depth and latent channels come from the
config, so the downscale factor is 2^(levels - 1): 8 for the released model, 2 for diffusers' test VAE.

Latents here are the autoencoder's own ("raw", what ComfyUI's LATENT holds); the transformer works on
`normalize(z) = (z - shift) * scale`, and `denormalize` undoes it: the only place the two factors are applied.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import limits

BAND = 64  # rows per band when running in bands
PEAK_MAPS = 8  # a whole-image decode's peak in full-resolution first-level feature maps: 7.6 measured (bench/)


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are the released Flux VAE (diffusers' `vae/config.json` of Z-Image-Turbo)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    quant_conv: bool = False  # SD-style 1x1 convs around the latent: diffusers' test VAE has them, Flux's does not

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents (ComfyUI's LATENT) -> the transformer's latent space."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's latent space -> autoencoder latents."""
        return latents / self.scaling_factor + self.shift_factor


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (only at the lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.flatten(2)).transpose(1, 2)[:, None]  # (B, 1 head, H*W, C), normed as diffusers does
        h = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))[:, 0]
        return self.proj_out(h).transpose(1, 2).reshape(x.shape) + x  # memory format (and conv kernels) as diffusers


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The resnet blocks of one resolution, then a down- or upsampling (none at the last level)."""

    def __init__(self, channels: list[int], groups: int, resample: type[nn.Module] | None, kind: str):
        super().__init__()
        self.kind = kind
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(channels))
        if resample is not None:
            setattr(self, kind, resample(channels[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.kind, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(
                [chs[max(i - 1, 0)]] + [chs[i]] * cfg.layers_per_block, g,
                Downsample if i < n - 1 else None, "downsample",
            )
            for i in range(n)
        )  # fmt: skip
        self.mid = Mid(chs[-1], g)
        self.norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))

    def banded(self, x: torch.Tensor) -> torch.Tensor:
        """The same as `forward`, holding about two full-resolution feature maps (see `norm_silu`)."""
        x = conv_banded(self.conv_in, lambda band: band, x)
        for level in self.down:
            x = level_banded(level, x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], g)
        # up[i] works at level i (up[0] at full resolution) and runs from the last level back to the first
        self.up = nn.ModuleList(
            Level(
                [chs[min(i + 1, n - 1)]] + [chs[i]] * (cfg.layers_per_block + 1), g,
                Upsample if i > 0 else None, "upsample",
            )
            for i in range(n)
        )  # fmt: skip
        self.norm_out = group_norm(chs[0], g)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    def banded(self, z: torch.Tensor) -> torch.Tensor:
        """The same as `forward`, holding about two full-resolution feature maps (see `norm_silu`)."""
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level_banded(level, x)
        return conv_banded(self.conv_out, norm_silu(self.norm_out, x), x)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def bfl_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under `ae.safetensors`' names and shapes (BFL's, which ComfyUI's VAE reads): the attention
        projections as the 1x1 convolutions they are there."""
        return {k: v[..., None, None] if v.dim() == 2 else v for k, v in self.state_dict().items()}

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiled: bool | None = None,
    ) -> torch.Tensor:
        """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> autoencoder latents (B, 16, H / f, W / f), float32.

        `sample=False` takes the posterior mean (ComfyUI, diffusers' controlnet and Omni pipelines);
        `sample=True` draws from it with `generator` as diffusers' img2img and inpaint pipelines do.
        `tiled`: None runs in bands only when the whole image would not fit in free memory; True/False force it.
        """
        f = self.cfg.factor
        if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"pixels have shape {tuple(images.shape)}; expected images (B, H, W, 3)")
        limits.finite("pixels", images)
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[2]} x {images.shape[1]} is not a multiple of {f}")
        x = images.movedim(-1, 1).to(self.decoder.conv_in.weight.device) * 2 - 1
        x = x.to(self.dtype)
        h = self.run(self.encoder, x, 1, tiled)
        mean, logvar = (self.quant_conv(h) if self.cfg.quant_conv else h).float().chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        device = generator.device if generator is not None else mean.device
        return mean + std * torch.randn(mean.shape, generator=generator, device=device).to(mean.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Autoencoder latents (B, 16, h, w) -> ComfyUI IMAGE (B, h * f, w * f, 3) in [0, 1], float32.

        `tiled`: None runs in bands only when the whole image would not fit in free memory; True/False force it.
        """
        limits.latents("samples", z, self.cfg.latent_channels)
        z = z.to(self.decoder.conv_in.weight.device, self.dtype)
        z = self.post_quant_conv(z) if self.cfg.quant_conv else z
        x = self.run(self.decoder, z, self.cfg.factor, tiled)
        return (x.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1)

    def run(self, part: Encoder | Decoder, x: torch.Tensor, scale: int, tiled: bool | None) -> torch.Tensor:
        """`part` whole or in bands: as asked, or (tiled=None) in bands when the whole-image peak would not fit in
        free memory or the whole-image run meets an out-of-memory error (CUDA's; the CPU's cannot be caught)."""
        if tiled is not None:
            return part.banded(x) if tiled else part(x)
        pixels = x.shape[0] * x.shape[2] * x.shape[3] * scale**2
        peak = PEAK_MAPS * pixels * self.cfg.block_out_channels[0] * torch.finfo(self.dtype).bits // 8
        if peak <= free_bytes(x.device):
            try:
                return part(x)
            except torch.OutOfMemoryError:
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
        return part.banded(x)


def crop_to(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) cut at the centre to sizes that are multiples of `multiple` (as ComfyUI's VAE Encode)."""
    h, w = images.shape[1] // multiple * multiple, images.shape[2] // multiple * multiple
    if not h or not w:
        raise ValueError(f"image {images.shape[2]}x{images.shape[1]} is smaller than {multiple} pixels")
    top, left = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    return images[:, top : top + h, left : left + w]


def free_bytes(device: torch.device) -> int:
    """Memory a whole-image run may use: free device memory, or the kernel's MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return 1 << 62
    try:
        return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):  # not Linux: psutil where it is installed (ComfyUI requires it), else unknown
        try:
            import psutil
        except ImportError:
            return 1 << 62
        return psutil.virtual_memory().available


# ---- running in bands ----
# A whole-image run holds several full-resolution feature maps at once (a norm's output, its SiLU, a conv's
# output, the residual): about 8 maps of the first level's width at the peak. In bands, each convolution reads a
# band of rows plus a one-row halo and writes into one preallocated map, and each GroupNorm uses the statistics
# of its whole input, so the result equals the whole-image run (no seams, no blending) while only the maps
# between two layers are alive: about 5 at the peak (a 256-channel upsampled map, its resnet's output and inner
# map). Unlike tiles, the held maps still grow with the image.


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor):
    """GroupNorm (statistics of all of x) then SiLU, as a function of any band of x's rows.

    Mean first, then the mean squared deviation: two passes over the bands in fp32 (stable without float64,
    which some devices lack).
    """
    b, c, h, _ = x.shape
    g, n = norm.num_groups, x[0, 0].numel() * (c // norm.num_groups)

    def bands():
        return (x[:, :, r : r + BAND].float().reshape(b, g, -1) for r in range(0, h, BAND))

    mean = sum(band.sum(-1) for band in bands()) / n
    var = sum((band - mean[..., None]).square().sum(-1) for band in bands()) / n
    mean, inv = (t.repeat_interleave(c // g, dim=1)[..., None, None] for t in (mean, torch.rsqrt(var + norm.eps)))
    weight, bias = norm.weight.float()[:, None, None], norm.bias.float()[:, None, None]
    return lambda band: F.silu((band.float() - mean) * inv * weight + bias).to(x.dtype)


def conv_rows(conv: nn.Conv2d, pre, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of conv(pre(x)) for a stride-1 'same' convolution, from rows r0 - 1 .. r1 of x."""
    a, b = max(r0 - 1, 0), min(r1 + 1, x.shape[2])
    return conv(pre(x[:, :, a:b]))[:, :, r0 - a : r1 - a]


def resnet_banded(block: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[2]
    pre = norm_silu(block.norm1, x)
    h = x.new_empty(x.shape[0], block.conv1.out_channels, *x.shape[2:])
    for r in range(0, rows, BAND):
        h[:, :, r : r + BAND] = conv_rows(block.conv1, pre, x, r, min(r + BAND, rows))
    pre = norm_silu(block.norm2, h)
    out = x if h.shape[1] == x.shape[1] else torch.empty_like(h)  # a row's residual reads only that row of x
    for r in range(0, rows, BAND):
        end = min(r + BAND, rows)
        out[:, :, r:end] = block.nin_shortcut(x[:, :, r:end]) + conv_rows(block.conv2, pre, h, r, end)
    return out


def upsample_banded(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    rows = 2 * x.shape[2]
    out = x.new_empty(x.shape[0], up.conv.out_channels, rows, 2 * x.shape[3])
    for r in range(0, rows, BAND):
        end = min(r + BAND, rows)
        a, b = max(r - 1, 0) // 2, (min(end + 1, rows) + 1) // 2
        band = up.conv(F.interpolate(x[:, :, a:b], scale_factor=2.0, mode="nearest"))
        out[:, :, r:end] = band[:, :, r - 2 * a : end - 2 * a]
    return out


def downsample_banded(down: Downsample, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[2] // 2
    out = x.new_empty(x.shape[0], down.conv.out_channels, rows, x.shape[3] // 2)
    for r in range(0, rows, BAND):
        end = min(r + BAND, rows)
        band = x[:, :, 2 * r : 2 * end + 1]
        out[:, :, r:end] = down.conv(F.pad(band, (0, 1, 0, 2 * end + 1 - 2 * r - band.shape[2])))
    return out


def level_banded(level: Level, x: torch.Tensor) -> torch.Tensor:
    for block in level.block:
        x = resnet_banded(block, x)
    resample = getattr(level, level.kind, None)
    if isinstance(resample, Upsample):
        return upsample_banded(resample, x)
    return x if resample is None else downsample_banded(resample, x)


def conv_banded(conv: nn.Conv2d, pre, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[2]
    out = x.new_empty(x.shape[0], conv.out_channels, *x.shape[2:])
    for r in range(0, rows, BAND):
        out[:, :, r : r + BAND] = conv_rows(conv, pre, x, r, min(r + BAND, rows))
    return out
