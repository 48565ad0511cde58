"""From prompts to images: find the three models, run them one at a time, sample as the references sample.

Memory schedule: the VAE (small) is loaded first and tells the size rules; the text encoder is loaded, encodes, and
is released before the transformer is loaded; the transformer is released before the VAE decodes. So peak memory
is the largest model plus activations, not the sum of the three.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Qwen3Config

from . import limits
from .checkpoint import CheckpointError
from .controlnet import Control, ControlRequest, control_context, load_controlnet
from .edit import EditConditioning, encode_prompts, prepare_references, reference_latents, siglip_features
from .loaders import LOADERS, load_siglip, transformer_facts
from .lora import apply_loras, check_file, linear_shapes, read_lora
from .sampling import PATCH, SHIFT, VARIANT_SETTINGS, control_range, denoise, encode_with_noise, start_index
from .speed import PLAIN, Speed
from .text_encoder import TextEncoder, load_tokenizer
from .transformer import TransformerConfig, ZImageTransformer
from .vae import VAE, VAEConfig

TINY_RANDOM = "tiny-random"
# Where ComfyUI keeps each model, and how the released files' names begin, most specific first.
COMFY_FOLDERS = {
    "transformer": (("diffusion_models", "unet"), ("z_image", "zimage", "z-image")),
    "text_encoder": (("text_encoders", "clip"), ("qwen_3_4b", "qwen3_4b", "qwen3-4b")),
    "vae": (("vae",), ("ae.safetensors", "flux", "z_image", "zimage")),
}
FLAGS = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae", "siglip": "--siglip"}


@dataclass
class Models:
    """Where each model is: a file or folder, or `TINY_RANDOM` for small random weights (no files needed)."""

    transformer: str | Path
    text_encoder: str | Path
    vae: str | Path
    siglip: str | Path | None = None  # SigLIP2, needed only to edit with reference images (Omni/Edit)


def find_models(model: str | Path | None, **given: str | Path | None) -> Models:
    """Resolve `model` (a diffusers pipeline folder, a ComfyUI `models/` folder, or `tiny-random`) and any files
    given per component (`transformer=`, `text_encoder=`, `vae=`, `siglip=`, which win). SigLIP2 is looked for
    (a pipeline's `siglip/`, or ComfyUI's `clip_vision/siglip2*`) but not required."""
    found = {}
    if given.get("siglip") or str(model) == TINY_RANDOM:
        found["siglip"] = given.get("siglip") or TINY_RANDOM
    elif model is not None:
        root = Path(model).expanduser()
        candidates = [root / "siglip", *sorted((root / "clip_vision").glob("siglip2*.safetensors"))]
        found["siglip"] = next((c for c in candidates if c.exists()), None)
    for component, (folders, names) in COMFY_FOLDERS.items():
        if given.get(component):
            found[component] = given[component]
        elif str(model) == TINY_RANDOM:
            found[component] = TINY_RANDOM
        elif model is None:
            raise CheckpointError(f"no {component.replace('_', ' ')}: pass --model or {FLAGS[component]} FILE")
        else:
            found[component] = find_component(Path(model).expanduser(), component, folders, names)
    return Models(**found)


def find_component(root: Path, component: str, folders: tuple[str, ...], names: tuple[str, ...]) -> Path:
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such folder (--model takes a diffusers pipeline or ComfyUI models folder)")
    if (root / component / "config.json").is_file():  # diffusers pipeline folder (ComfyUI's vae/ has no config)
        return root / component
    for folder in (root / f for f in folders if (root / f).is_dir()):
        files = sorted(folder.rglob("*.safetensors"))
        for name in names:
            matches = [f for f in files if f.name.lower().startswith(name)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise CheckpointError(
                    f"{folder}: several candidates for the {component.replace('_', ' ')} "
                    f"({', '.join(f.name for f in matches)}); pick one with {FLAGS[component]} FILE"
                )
    expected = " or ".join(f"{root / f}/" for f in folders)
    raise CheckpointError(
        f"{root}: no {component.replace('_', ' ')} found: expected a {component}/ folder (diffusers) or a file named "
        f"{names[0].removesuffix('.safetensors')}*.safetensors in {expected}; pass {FLAGS[component]} FILE to name it"
    )


def tiny_random(component: str, device, dtype):
    """Small random-weight stand-ins with the real architecture, for trying the whole path without weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if component == "transformer":
            cfg = TransformerConfig(dim=64, n_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                                    axes_dims=(8, 12, 12), siglip_feat_dim=32)  # fmt: skip
            model = ZImageTransformer(cfg)
            for p in (model.x_pad_token, model.cap_pad_token, model.siglip_pad_token):
                p.data.normal_()
        elif component == "text_encoder":
            config = Qwen3Config(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=151936, attn_implementation="sdpa",
            )  # fmt: skip
            model = TextEncoder(config, load_tokenizer())
        elif component == "siglip":  # imported here: transformers warns at import when torchvision is absent
            from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

            config = Siglip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, patch_size=8, num_patches=16, vision_use_head=False)  # fmt: skip
            model = Siglip2VisionModel(config)
            return model.to(device, dtype).eval().requires_grad_(False), Siglip2ImageProcessor(patch_size=8)
        else:
            model = VAE(VAEConfig(block_out_channels=(32, 32), layers_per_block=1))
    return model.to(device, dtype).eval().requires_grad_(False)


def load(component: str, path, device, dtype):
    """A model (SigLIP2: the model and its image processor) from `path`, or a tiny random one."""
    if path is None:
        raise CheckpointError(f"no {component.replace('_', ' ')} given: pass {FLAGS[component]} PATH")
    if str(path) == TINY_RANDOM:
        return tiny_random(component, device, dtype)
    return (load_siglip if component == "siglip" else LOADERS[component])(path, device, dtype)


def variant_settings(transformer, steps: int | None, cfg: float | None) -> tuple[int, float]:
    """`steps` and `cfg` where given, else the defaults of the transformer's variant (read from its header)."""
    if steps is not None and cfg is not None:
        return steps, cfg
    variant = "turbo" if str(transformer) == TINY_RANDOM else transformer_facts(transformer).variant
    default_steps, default_cfg = VARIANT_SETTINGS[variant]
    return (default_steps if steps is None else steps), (default_cfg if cfg is None else cfg)


def release(model_device):
    gc.collect()
    if torch.device(model_device).type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Result:
    images: torch.Tensor  # (B, H, W, 3) in [0, 1]
    latents: torch.Tensor  # (B, 16, H / 8, W / 8), the autoencoder's own (as ComfyUI's LATENT holds them)
    dropped: tuple[int, ...]  # prompt tokens cut by the maximum length, per prompt
    steps: int  # as sampled: the variant's defaults where none were given
    cfg: float
    loras: list[str]  # what each LoRA matched, and how it was applied


def generate(
    models: Models,
    prompts: list[str],
    negatives: list[str] | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seeds: list[int] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    masks: torch.Tensor | None = None,
    variety: float = 0.0,
    variety_steps: int = 2,
    references: list[Image.Image] | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    vae_dtype: torch.dtype = torch.float32,
    loras: list[tuple[str | Path, float]] | None = None,
    control: ControlRequest | None = None,
    speed: Speed = PLAIN,
) -> Result:
    """Text-to-image (1024x1024 unless sized), img2img (`init_images`, `strength`), inpaint (`masks` (B, H, W),
    1 = repaint) or edit (`references`: images an Omni/Edit transformer follows; the size defaults to the last's).

    `cfg` is ComfyUI's (1 = off; the references' guidance scale is cfg - 1); with it on, `negatives` default to "".
    `steps` and `cfg` default to the transformer's variant's (`sampling.VARIANT_SETTINGS`): Turbo 8 and 1, Base 25
    and 4.
    Each image has its own seed (default 0, 1, ...), drawn as diffusers draws per-image generators.
    `variety` > 0 (Turbo's seed variety, off by default) perturbs the prompt's features with seeded noise of that
    relative strength for the first `variety_steps` evaluations (0.3-0.6 and 2 are good starting points).
    The VAE computes in `vae_dtype`, fp32 as the official pipeline and the VAE loader node's default (diffusers'
    edit pipeline runs it in bf16). The returned latents are the sampler's, unrounded.
    `loras` (file, strength) are merged into the transformer's weights (compact weights take them per call).
    `control`: a Fun ControlNet Union and what it follows (its images set the size when none is given).
    `speed`: the attention kernel, residual dtype, compilation and GEMMs the transformer and ControlNet run with,
    and the VRAM budget the text encoder and transformer stream their blocks within.
    """
    steps, cfg = variant_settings(models.transformer, steps, cfg)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    limits.settings(steps, cfg, strength, SHIFT, variety, variety_steps)  # before anything slow
    speed.check(device, dtype)
    loras = [(check_file(path), limits.number("LoRA strength", s, limits.LORA_STRENGTH)) for path, s in loras or []]
    for seed in seeds:
        limits.number("seed", seed, limits.SEED, integer=True)
    if references and (init_images is not None or variety > 0):
        raise ValueError("reference images (edit) do not combine with an init image or seed variety")
    if control is not None:
        if references:
            raise ValueError("a ControlNet conditions text-to-image sampling; it does not combine with edit images")
        limits.number("ControlNet strength", control.strength, limits.CONTROL_STRENGTH)
        sigma_range = control_range(control.start, control.end)
        if not Path(control.model).is_file():
            raise CheckpointError(f"{control.model}: no such ControlNet file.")
    n_refs = len(references or [])
    vae = load("vae", models.vae, device, vae_dtype)  # small, and it tells the size rules before anything slow
    cell = vae.cfg.factor * PATCH
    refs = features = None
    if references:
        resized, cropped = prepare_references(references, cell, width * height if width and height else None)
        width, height = width or cropped[-1].shape[2], height or cropped[-1].shape[1]
        refs = reference_latents(vae, cropped)
        features = siglip_features(*load("siglip", models.siglip, device, dtype), resized)
        release(device)
    given = control and next((x for x in (control.image, control.inpaint) if x is not None), None)
    if given is not None and not (width and height):  # as diffusers' ControlNet pipelines: the control image's size
        width, height = (d // cell * cell for d in (given.shape[2], given.shape[1]))
    width, height = width or 1024, height or 1024
    limits.size(width, height, cell)
    if control is not None:
        net = speed.apply(load_controlnet(control.model, device, dtype), device, dtype)
        context = control_context(vae, net.layout, *control.resized(width, height))
        control = Control(net, context, control.strength, sigma_range)
    if init_images is not None:
        start_index(steps, strength)  # a strength that leaves no step fails here, not after loading
    encoder = speed.place(load("text_encoder", models.text_encoder, speed.home(device), dtype), device)
    if references:
        cond = encode_prompts(encoder, prompts, n_refs)
        uncond = encode_prompts(encoder, negatives or [""] * len(prompts), n_refs) if cfg > 1 else None
    elif cfg > 1:  # prompts and negatives in one pass: the encoder's time is launches, not tokens
        cond, uncond = encoder.encode(prompts + (negatives or [""] * len(prompts))).split(len(prompts))
    else:
        cond, uncond = encoder.encode(prompts), None
    del encoder
    release(device)

    clean = start = None
    if init_images is not None:
        if masks is not None:  # the mask goes with the image: the same size, resized with it
            masks = limits.mask(masks, len(seeds), *init_images.shape[1:3], 1)
            masks = F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0]
        if init_images.shape[1:3] != (height, width):
            init_images = F.interpolate(init_images.movedim(-1, 1), size=(height, width), mode="bicubic")
            init_images = init_images.clamp(0, 1).movedim(1, -1)
        clean, start = encode_with_noise(vae, init_images.expand(len(seeds), -1, -1, -1), seeds)
    shape = (vae.cfg.latent_channels, height // vae.cfg.factor, width // vae.cfg.factor)
    transformer = load("transformer", models.transformer, speed.home(device), dtype)
    if references and transformer.cfg.siglip_feat_dim is None:
        raise CheckpointError(
            f"{models.transformer}: not an Omni/Edit transformer (it has no SigLIP weights); editing with reference "
            "images needs the Z-Image-Omni or Z-Image-Edit transformer"
        )
    read = [(read_lora(path, linear_shapes(transformer)), s) for path, s in loras]
    applied = apply_loras(transformer, read, keep_originals=False) if read else None
    transformer = speed.apply(speed.place(transformer, device), device, dtype)
    notes = [f"{lora.summary()}\n  strength {s}, {applied.describe()}" for lora, s in read]
    if references:
        cond = EditConditioning(cond, refs, features)
    latents = denoise(transformer, cond, uncond, seeds, steps, cfg, shape=shape, clean=clean, start_noise=start,
                      strength=strength, masks=masks if clean is not None else None, variety=variety,
                      variety_steps=variety_steps, factor=vae.cfg.factor, callback=callback, cancelled=cancelled,
                      control=control)  # fmt: skip
    del transformer, control
    release(device)
    z = vae.cfg.denormalize(latents)  # float32: what a ComfyUI LATENT holds; decode casts to the VAE's dtype
    return Result(vae.decode(z), z.cpu(), cond.dropped, steps, cfg, notes)
