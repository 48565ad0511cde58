"""Z-Image Fun ControlNet Union (alibaba-pai): control blocks beside the transformer whose outputs ("hints") join its
stream, computed from a control image and, from 2.0 on, an inpaint mask and the masked image.

The authors' VideoX-Fun is the reference (`videox_fun/models/z_image_transformer2d_control.py`, the layer places in
`config/z_image/z_image_control*.yaml`); ComfyUI 0.33.0 (`comfy_extras/nodes_model_patch.py`) detects the same
layouts from the keys:

| version | control layers, at transformer layers | control tokens before the layers | input channels |
|---|---|---|---|
| 1.0 | 6, at 0, 5, ..., 25 | refined alone by two plain blocks | 16 |
| 2.1 (Tile, 8-step, 2601, Base) | 15, at 0, 2, ..., 28 | two control blocks; their hints join the noise refiner | 33 |
| 2.0 | as 2.1 | trained with a typo: the 15 control layers serve as that refiner too | 33 |
| lite | 3, at 0, 10, 20 | as 2.1 | 33 |

A chain of control blocks starts from `before_proj(control tokens) + the stream it joins`; each block's output
leaves through `after_proj` as the hint added after its place. In the layers the control stream is the control
tokens followed by the refined caption, beside the unified image + caption stream. The 33 channels are control
latents (16), a keep mask (1 where the image stays) and the latents of the image with the repainted part grey (16).

Two references differ from the authors: diffusers 0.42.1 never adds the refiner hints to the base model's noise
refiner (its transformer takes only the layers' hints), and ComfyUI runs the control layers over image tokens
only. The layer hints of 1.0 equal all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import limits
from .checkpoint import CheckpointError, ModelInfo, describe, fill, looks_like, open_checkpoint
from .loaders import block_sources
from .ops import DEFAULT, Ops
from .transformer import Block, Layout, TransformerConfig, patchify, to_patches

EMBEDDER = "control_all_x_embedder.{p}-1.weight"
MARKER = "control_layers.0.adaLN_modulation.0.weight"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "controlnet.", "")
LATENT_CHANNELS = 16  # the Flux VAE's


@dataclass(frozen=True)
class ControlLayout:
    """What a ControlNet file is, read from its keys (the files carry no config)."""

    version: str
    control_layers: int
    refiner: str  # "alone" (1.0), "hints" (2.1, lite) or "control layers" (2.0's typo)
    in_channels: int  # 16: control latents; 33: also the keep mask and the masked image's latents
    patch_size: int = 2

    @property
    def inpaints(self) -> bool:
        return self.in_channels > LATENT_CHANNELS

    def places(self, n_layers: int) -> tuple[int, ...]:
        """Transformer layers after which each control layer's hint joins: evenly spread, as every released
        version places them (VideoX-Fun's configs; ComfyUI's `round(30 / n)` stride)."""
        step = round(n_layers / self.control_layers)
        return tuple(k * step for k in range(self.control_layers))


class ControlBlock(Block):
    """A modulated block whose output also leaves through `after_proj` as a hint; the first block of a chain adds
    the stream it joins through `before_proj`."""

    def __init__(self, cfg: TransformerConfig, first: bool, ops: Ops):
        super().__init__(cfg, True, ops)
        self.first = first
        if first:
            self.before_proj = ops.Linear(cfg.dim, cfg.dim)
        self.after_proj = ops.Linear(cfg.dim, cfg.dim)

    def forward(self, c, x, rope, mask, dtype, cond):
        """Control stream `c` beside stream `x` -> (next control stream, hint), both in the residual stream's dtype."""
        if self.first:
            c = self.before_proj(c.to(dtype)).to(x.dtype) + x
        c = super().forward(c, rope, mask, dtype, cond)
        return c, self.after_proj(c.to(dtype)).to(c.dtype)


class ZImageControlNet(nn.Module):
    """The control blocks of one file; the transformer it joins lends its embedders, refiners and pad token."""

    def __init__(self, cfg: TransformerConfig, layout: ControlLayout, ops: Ops = DEFAULT):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        p = layout.patch_size
        self.control_all_x_embedder = nn.ModuleDict({f"{p}-1": ops.Linear(p * p * layout.in_channels, cfg.dim)})
        self.control_layers = nn.ModuleList(ControlBlock(cfg, i == 0, ops) for i in range(layout.control_layers))
        if layout.refiner == "alone":
            self.control_noise_refiner = nn.ModuleList(Block(cfg, True, ops) for _ in range(cfg.n_refiner_layers))
        elif layout.refiner == "hints":
            self.control_noise_refiner = nn.ModuleList(
                ControlBlock(cfg, i == 0, ops) for i in range(cfg.n_refiner_layers)
            )

    def embed(self, context: torch.Tensor, dtype) -> torch.Tensor:
        """Control latents (B, C, h, w) -> token rows (B, h * w / p^2, dim) in fp32."""
        p = self.layout.patch_size
        return self.control_all_x_embedder[f"{p}-1"](patchify(to_patches(context, p), p).to(dtype)).float()


@dataclass
class Control:
    """A ControlNet with its input for one sampling: hints scaled by `strength`, while sigma is within
    `sigmas` (high, low), both included (`sampling.control_range` turns start/end fractions into these).
    `refit(h, w)`, where given, makes the input again for latents of another size (ComfyUI's own control patch
    re-encodes its images at the latent's size too); each size is made once."""

    net: ZImageControlNet
    context: torch.Tensor  # (1 or B, in_channels, h, w) normalized latents, from `control_context`
    strength: float = 1.0
    sigmas: tuple[float, float] = (1.0, 0.0)
    refit: Callable[[int, int], torch.Tensor] | None = None
    fits: dict = field(default_factory=dict, repr=False, compare=False)

    def fitted(self, latent_size: tuple[int, int]) -> Control:
        """This control with its input at `latent_size` (h, w): itself when it is that size or cannot refit."""
        size = tuple(latent_size)
        if tuple(self.context.shape[2:]) == size or self.refit is None:
            return self
        if size not in self.fits:
            self.fits[size] = self.refit(*size)
        return replace(self, context=self.fits[size])

    def active(self, sigma: float) -> bool:
        return self.strength != 0 and self.sigmas[1] <= sigma <= self.sigmas[0]

    def check(self, cfg: TransformerConfig, latent_shape: tuple[int, ...]):
        """Refuse a ControlNet or context that does not fit this transformer or these latents, before sampling."""
        net = self.net.cfg
        if (net.dim, net.n_heads) != (cfg.dim, cfg.n_heads) or self.net.layout.patch_size != cfg.patch_size:
            raise ValueError(f"this ControlNet has width {net.dim} and {net.n_heads} heads, the transformer "
                             f"{cfg.dim} and {cfg.n_heads}: it was made for another model")  # fmt: skip
        if self.net.layout.control_layers > cfg.n_layers:
            raise ValueError(f"this ControlNet has {self.net.layout.control_layers} control layers, more than the "
                             f"transformer's {cfg.n_layers}")  # fmt: skip
        if tuple(self.context.shape[2:]) != tuple(latent_shape[-2:]):
            (h, w), (lh, lw) = self.context.shape[2:], latent_shape[-2:]
            raise ValueError(f"the control image's latents are {w} x {h}, the image being made has {lw} x {lh}: "
                             "resize the control image to the image's size")  # fmt: skip

    def begin(self, model, img: torch.Tensor, shape: Layout, cond: torch.Tensor, dtype) -> ControlRun:
        return ControlRun(self, model, img, shape, cond, dtype)


class ControlRun:
    """One evaluation's control stream: refined beside the noise refiner, then advanced beside the layers, one
    control block at a time, so only one control stream and hint are held (ComfyUI interleaves them too)."""

    def __init__(self, control: Control, model, img: torch.Tensor, shape: Layout, cond, dtype):
        net, bsz = control.net, len(img)
        self.net, self.shape, self.cond, self.dtype, self.scale = net, shape, cond, dtype, control.strength
        context = control.context.to(img.device)
        if bsz % len(context):
            raise ValueError(f"{len(context)} control inputs for a batch of {bsz}")
        context = context.repeat(bsz // len(context), 1, 1, 1)  # guidance batches cond items, then uncond items
        c = model.padded(net.embed(context, dtype), img.shape[1])  # pad rows as the image's
        self.refiner_hints: list[torch.Tensor] = []
        if net.layout.refiner == "alone":
            for block in net.control_noise_refiner:
                c = block(c, shape.img_rope, None, dtype, cond)
        else:
            blocks = net.control_noise_refiner if net.layout.refiner == "hints" else net.control_layers
            for block in blocks:
                c, hint = block(c, img, shape.img_rope, None, dtype, cond)
                if len(self.refiner_hints) < len(model.noise_refiner):
                    self.refiner_hints.append(hint)
        self.tokens = c
        self.places = dict(map(reversed, enumerate(net.layout.places(len(model.layers)))))

    def after_refiner(self, i: int, img: torch.Tensor) -> torch.Tensor:
        return img + self.refiner_hints[i] * self.scale if i < len(self.refiner_hints) else img

    def begin_layers(self, seq: torch.Tensor, cap: torch.Tensor):
        """The stream the layers start from, and the control stream beside it: control tokens, then caption."""
        self.start, self.c = seq, torch.cat([self.tokens, cap], dim=1)

    def after_layer(self, i: int, seq: torch.Tensor) -> torch.Tensor:
        k = self.places.get(i)
        if k is None:
            return seq
        self.c, hint = self.net.control_layers[k](self.c, self.start, self.shape.rope, self.shape.mask, self.dtype,
                                                  self.cond)  # fmt: skip
        return seq + hint * self.scale


def control_context(vae, layout: ControlLayout, image=None, inpaint=None, mask=None) -> torch.Tensor:
    """The control input (B, in_channels, h, w) in normalized latents, as VideoX-Fun's pipeline builds it.

    image: the control image (B, H, W, 3) in [0, 1], or None (zero latents); inpaint (2.x): the image to repaint,
    mask (B or 1, H, W) at any size (resized, nearest): >= 0.5 repaints; no inpaint image gives zero latents and an
    all-repaint mask, no mask repaints everything. Images are encoded to their posterior mean, as diffusers' ControlNet pipelines do.
    """
    given = next((x for x in (image, inpaint) if x is not None), None)
    if given is None:
        raise ValueError("a ControlNet needs a control image or an image to inpaint")
    if not layout.inpaints and (inpaint is not None or mask is not None):
        raise ValueError(f"this ControlNet ({layout.version}) cannot inpaint: use a 2.0 or 2.1 Union ControlNet")
    if mask is not None and inpaint is None:
        raise ValueError("a ControlNet inpaint mask needs the image to inpaint: give the inpaint image too")
    size = tuple(given.shape[1:3])
    for name, hw in (("control image", image), ("inpaint image", inpaint)):
        if hw is not None and tuple(hw.shape[1:3]) != size:
            raise ValueError(f"the {name} is {hw.shape[2]} x {hw.shape[1]}, the other inputs {size[1]} x {size[0]}: "
                             "give them one size")  # fmt: skip
    if mask is not None and tuple(mask.shape[-2:]) != size:
        mask = limits.resize_mask(mask.reshape(-1, *mask.shape[-2:]), *size)  # as ComfyUI resizes masks

    def encode(pixels):
        return vae.cfg.normalize(vae.encode(pixels))

    parts = [encode(image)] if image is not None else []
    if layout.inpaints:
        if inpaint is None:
            latents = torch.zeros_like(parts[0])
            keep = torch.zeros_like(latents[:, :1])
        else:
            repaint = torch.ones(1, *size) if mask is None else (mask.float() >= 0.5).float()
            repaint = repaint.to(inpaint.device)
            latents = encode(torch.where(repaint[..., None] > 0, torch.full_like(inpaint, 0.5), inpaint))
            keep = F.interpolate(1 - repaint[:, None], size=latents.shape[2:], mode="nearest").to(latents.device)
            keep = keep.expand(len(latents), -1, -1, -1)
        if not parts:
            parts = [torch.zeros_like(latents)]
        n = max(len(parts[0]), len(latents))
        parts = [t.expand(n, -1, -1, -1) if len(t) == 1 else t for t in (parts[0], keep, latents)]
    return torch.cat(parts, dim=1)


@dataclass
class ControlRequest:
    """A ControlNet as a caller asks for it, before anything is loaded: the file, the images (B or 1, H, W, 3) in
    [0, 1] and mask (B or 1, H, W) at any size (resized to the image being made), strength and the fractions of the
    process it acts in. The default strength is diffusers' pipelines' 0.75, inside the model card's 0.65-1.0."""

    model: str | Path
    image: torch.Tensor | None = None
    inpaint: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    strength: float = 0.75
    start: float = 0.0
    end: float = 1.0

    def resized(self, width: int, height: int) -> tuple:
        """(image, inpaint, mask) at the size being made: images bicubic, the mask nearest (it is binarized)."""

        def scale(x, mode):
            if x is None or tuple(x.shape[1:3]) == (height, width):
                return x
            out = F.interpolate(x.movedim(-1, 1).float(), size=(height, width), mode=mode)
            return out.clamp(0, 1).movedim(1, -1)

        mask = self.mask
        if mask is not None:
            mask = limits.resize_mask(mask.reshape(-1, *mask.shape[-2:]), height, width)
        return scale(self.image, "bicubic"), scale(self.inpaint, "bicubic"), mask


@dataclass
class ControlNetInfo(ModelInfo):
    version: str
    places: tuple[int, ...]


def control_layout(ckpt, sources: dict[str, list[str]]) -> ControlLayout:
    """Which version a file is, from its keys; the 2.0 refiner is told by its all-zero projections."""
    embedder = next((n for n in sources if n.startswith("control_all_x_embedder.") and n.endswith(".weight")), None)
    if embedder is None or "control_layers.0.after_proj.weight" not in sources:
        raise CheckpointError(f"{ckpt.path}: not a Z-Image Fun ControlNet: it looks like {looks_like(ckpt.names)} "
                              f"(no {EMBEDDER.format(p=2)} and control_layers among its tensors).")  # fmt: skip
    patch = int(embedder.split(".")[1].split("-")[0])
    in_channels = ckpt.shape(sources[embedder][0])[1] // patch**2
    n = len({name.split(".")[1] for name in sources if name.startswith("control_layers.")})
    projections = [
        s for key in ("before_proj", "after_proj") for s in sources.get(f"control_noise_refiner.0.{key}.weight", [])
    ]
    plain = "control_noise_refiner.0.adaLN_modulation.0.weight" in sources and not projections
    if plain:
        refiner = "alone"
    elif not projections or any(not ckpt.read(s).float().count_nonzero() for s in projections):
        refiner = "control layers"
    else:
        refiner = "hints"
    version = {("alone", 6): "1.0", ("control layers", 15): "2.0", ("hints", 15): "2.1", ("hints", 3): "2.1 lite"}
    name = version.get((refiner, n), f"{n} control layers, refiner {refiner}")
    if (in_channels == LATENT_CHANNELS) != (refiner == "alone") or in_channels not in (16, 33):
        raise CheckpointError(f"{ckpt.path}: a Z-Image ControlNet with {in_channels} input channels and refiner "
                              f"'{refiner}' matches no released version (1.0: 16 channels, 2.x: 33).")  # fmt: skip
    return ControlLayout(name, n, refiner, in_channels, patch)


def load_controlnet(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    ops: Ops = DEFAULT,
) -> ZImageControlNet:
    """Load a Z-Image Fun ControlNet Union file (diffusers' attention names, as released, or ComfyUI's fused
    ones; bf16, fp32 or fp8); a 2.0 file's unused refiner is not loaded."""
    with open_checkpoint(path, "controlnet") as ckpt:
        prefix = next((p for p in PREFIXES if p + MARKER in ckpt.names), None)
        if prefix is None:
            raise CheckpointError(f"{ckpt.path}: not a Z-Image Fun ControlNet: it looks like "
                                  f"{looks_like(ckpt.names)} (no {MARKER}).")  # fmt: skip
        sources = block_sources(ckpt.names, prefix)
        layout = control_layout(ckpt, sources)
        if layout.refiner == "control layers":
            sources = {k: v for k, v in sources.items() if not k.startswith("control_noise_refiner.")}
        dim = ckpt.shape(sources["control_layers.0.after_proj.weight"][0])[0]
        head_dim = ckpt.shape(sources["control_layers.0.attention.q_norm.weight"][0])[0]
        refiners = len({n.split(".")[1] for n in sources if n.startswith("control_noise_refiner.")}) or 2
        # the blocks' widths; RoPE and the layer count come from the transformer the ControlNet joins
        cfg = TransformerConfig(dim=dim, n_heads=dim // head_dim, n_layers=0, n_refiner_layers=refiners,
                                axes_dims=(head_dim,), axes_lens=(1,), patch_size=layout.patch_size)  # fmt: skip
        with torch.device("meta"):
            model = ZImageControlNet(cfg, layout, ops).to(dtype)
        fill(model, ckpt, sources, torch.device(device), dtype, weight_dtype,
             f"a Z-Image ControlNet {layout.version} with width {dim}")  # fmt: skip
        model.info = ControlNetInfo(
            **describe(
                "Z-Image ControlNet", model, ckpt, prefix, {"dim": dim, "heads": dim // head_dim}, device, dtype
            ),
            version=layout.version,
            places=layout.places(TransformerConfig().n_layers),  # in the released transformer
        )
    return model.eval().requires_grad_(False)
