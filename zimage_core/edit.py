"""Edit conditioning for Z-Image Omni/Edit: reference images given to the transformer twice, as clean VAE latents
and as SigLIP2 features, with the prompt's chat template cut at one vision slot per image. Everything is built as
diffusers' `ZImageOmniPipeline` builds it (zimage-spec.md 7.4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .text_encoder import MAX_LENGTH, TEMPLATE, Embeddings
from .vae import crop_to

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
REFERENCE_AREA = 1024 * 1024  # larger references are scaled down to this area (or to the output's, when given)


def segments(prompt: str, n_images: int) -> list[str]:
    """The chat template cut at each vision slot: N + 2 pieces (reference j follows piece j, the target piece N);
    without references, the plain template."""
    if n_images == 0:
        return [TEMPLATE.format(prompt)]
    user, assistant = TEMPLATE.split("{}")
    middle = [VISION_END + VISION_START] * (n_images - 1)
    return [user + VISION_START, *middle, VISION_END + prompt + assistant + VISION_START, VISION_END + "<|im_end|>"]


class EditConditioning(NamedTuple):
    """A prompt with its reference images: what an Omni/Edit transformer is conditioned on. `sampling` takes it
    where it takes text `Embeddings`, and calls the transformer through `velocity`."""

    text: Embeddings  # the pieces of `segments`, back to back per prompt; an item's length is its piece lengths
    refs: list[torch.Tensor]  # clean normalized latents (1, 16, h, w), the output's size is the last one's
    siglip: list[torch.Tensor] | None  # SigLIP2 features (Hs, Ws, C) per reference

    @property
    def dropped(self) -> tuple[int, ...]:
        return self.text.dropped

    def repeat(self, n: int) -> EditConditioning:
        return self._replace(text=self.text.repeat(n))

    def to(self, device: torch.device, dtype: torch.dtype) -> EditConditioning:
        siglip = [s.to(device, dtype) for s in self.siglip] if self.siglip else None
        return self._replace(refs=[r.to(device, dtype) for r in self.refs], siglip=siglip)

    def velocity(self, transformer, x: torch.Tensor, t: torch.Tensor, captions: torch.Tensor, lengths) -> torch.Tensor:
        """The transformer's prediction for a batch whose caption rows hold these pieces (and, under CFG, the
        negative's) back to back: split into per-piece batches for `forward_omni`."""
        pieces = []
        for k in range(len(lengths[0])):
            spans = [(sum(item[:k]), item[k]) for item in lengths]
            longest = max(n for _, n in spans)
            rows = [F.pad(captions[i, s : s + n], (0, 0, 0, longest - n)) for i, (s, n) in enumerate(spans)]
            pieces.append((torch.stack(rows), [n for _, n in spans]))
        return transformer.forward_omni(x, t, pieces, self.refs, self.siglip)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE (H, W, C) in [0, 1] as an RGB picture (exact for images loaded from 8-bit files)."""
    return Image.fromarray((image[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy())


def encode_prompts(encoder, prompts: list[str], n_images: int, max_length: int | None = MAX_LENGTH) -> Embeddings:
    """Each piece encoded on its own (cut at `max_length` on its own), as the reference encodes them.

    Returns one row per prompt holding its pieces back to back; `lengths` holds each prompt's piece lengths.
    """
    pieces = [
        encoder.encode([segments(p, n_images)[k] for p in prompts], max_length, template="{}")
        for k in range(len(segments("", n_images)))
    ]
    rows = [torch.cat([e.features[i, : e.lengths[i]] for e in pieces]) for i in range(len(prompts))]
    longest = max(len(r) for r in rows)
    features = torch.stack([F.pad(r, (0, 0, 0, longest - len(r))) for r in rows])
    lengths = tuple(tuple(e.lengths[i] for e in pieces) for i in range(len(prompts)))
    return Embeddings(features, lengths, tuple(sum(e.dropped[i] for e in pieces) for i in range(len(prompts))))


def prepare_references(images: list[Image.Image], multiple: int, area: int | None = None) -> tuple[list, list]:
    """References as the reference prepares them: scaled down (Lanczos) to `area` (default 1024²) when larger than
    1024², which SigLIP sees; then cut at the centre to multiples of `multiple` (whole latent patches: 16 for the
    Flux VAE) for the VAE, as IMAGEs (1, H, W, 3)."""
    resized, cropped = [], []
    for image in images:
        image = image.convert("RGB")
        if image.width * image.height > REFERENCE_AREA:
            scale = math.sqrt((area or REFERENCE_AREA) / (image.width * image.height))
            image = image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)
        resized.append(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]
        cropped.append(crop_to(pixels, multiple).contiguous())  # contiguous: the reference's memory layout
    return resized, cropped


def reference_latents(vae, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clean latents (1, 16, h, w) of IMAGEs: the posterior mean, normalized in the VAE's dtype as the reference
    does (it runs the VAE in bf16)."""
    return [vae.cfg.normalize(vae.encode(image).to(vae.dtype)).float() for image in images]


@torch.no_grad()
def siglip_features(model, processor, images: list[Image.Image]) -> list[torch.Tensor]:
    """SigLIP2 features (Hs, Ws, C) of each image: the last hidden state on its patch grid."""
    device, out = next(model.parameters()).device, []
    for image in images:
        inputs = processor(images=[image], return_tensors="pt").to(device)
        rows, cols = (int(v) for v in inputs["spatial_shapes"][0])
        hidden = model(**inputs).last_hidden_state
        out.append(hidden[0, : rows * cols].reshape(rows, cols, -1).float())
    return out
