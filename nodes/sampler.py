"""Z-Image Sampler: the references' flow-matching Euler sampling, with ComfyUI's progress, previews and interrupt;
or, on request, the sampling of ComfyUI's Turbo template (res_multistep, simple, shift 3) through its own KSampler."""

import dataclasses
import importlib

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.utils
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from ..zimage_core import limits, sampling
from ..zimage_core.edit import EditConditioning
from ..zimage_core.vae import VAEConfig
from .loaders import expect, ready, transformer_of
from .model import CONTROL, control_of
from .text_encode import from_conditioning

HOST_NODES = importlib.import_module("nodes")  # ComfyUI's own nodes.py (its KSampler), not this package
OFFICIAL, TEMPLATE = "official", "comfyui_template"  # the sampler's methods
FLUX = VAEConfig()  # the released VAE's latent scale and shift, as ComfyUI's Flux latent format
NOT_OMNI = "edit conditioning needs an Omni/Edit transformer (this one has no SigLIP weights); with Turbo or Base, " \
    "edit through img2img or inpaint"  # fmt: skip
NOT_EDIT = "this is an Omni/Edit transformer: give it Z-Image Edit Conditioning (a prompt with reference images), " \
    "not plain text conditioning"  # fmt: skip


class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling with a chosen shift, as ComfyUI's ModelSamplingAuraFlow node builds it."""


def template(model, positive, negative, latent, mask, seed, steps, cfg, denoise, shift, shape) -> dict:
    """ComfyUI's Turbo template on this MODEL: KSampler (res_multistep, simple) with the shift set as
    ModelSamplingAuraFlow sets it (`comfy_extras/nodes_model_advanced.py`) and, without a negative, the zeroed
    prompt (ConditioningZeroOut), so the image is the one that template gives."""
    flow = FlowSampling(model.model.model_config)
    flow.set_parameters(shift=shift, multiplier=1.0)
    patched = model.clone()
    patched.add_object_patch("model_sampling", flow)
    negative = [[torch.zeros_like(positive[0][0]), {}]] if negative is None else negative
    latent = {"samples": torch.zeros(shape)} if latent is None else dict(latent)
    if mask is not None:
        latent["noise_mask"] = mask
    (out,) = HOST_NODES.common_ksampler(patched, seed, steps, cfg, "res_multistep", "simple", positive, negative,
                                        latent, denoise=denoise)  # fmt: skip
    return {"samples": out["samples"].to(mm.intermediate_device(), torch.float32)}


class ZImageSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageSampler",
            display_name="Z-Image Sampler",
            category="Z-Image/sampling",
            description="Text-to-image, img2img (a latent and denoise below 1) and inpaint (a mask). Defaults are "
            "Turbo's: 8 steps, CFG off. Base and Omni: 25-50 steps, CFG 3-5, a negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="From Z-Image Transformer Loader (LoRA loaders may sit between)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The prompt: Z-Image Text Encode, Edit Conditioning, or CLIPTextEncode "
                    "with a lumina2 CLIP (qwen_3_4b).",
                ),
                io.Conditioning.Input(
                    "negative", optional=True, tooltip="The negative prompt; used only when cfg > 1 (needed then)."
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Start from this latent (img2img, inpaint) or take its size and batch "
                    "(an empty latent); without it width, height and batch_size apply.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Inpaint: 1 = repaint, 0 = keep the latent's image (needs a latent). "
                    "A latent's own noise_mask is used when this is not connected.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=limits.SEED.low,
                    max=limits.SEED.high,
                    control_after_generate=True,
                    tooltip="Image i of a batch uses seed + i, so any image can be made again alone.",
                ),
                io.Int.Input(
                    "steps",
                    default=8,
                    min=limits.STEPS.low,
                    max=limits.STEPS.high,
                    tooltip="Transformer evaluations (Turbo: 8).",
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=limits.CFG.low,
                    max=limits.CFG.high,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance, ComfyUI's scale: 1 = off (Turbo); Base: 3-5.",
                ),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=limits.SIZE.low,
                    max=limits.SIZE.high,
                    step=16,
                    tooltip="Image width (no latent; editing: the last reference's size).",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=limits.SIZE.low,
                    max=limits.SIZE.high,
                    step=16,
                    tooltip="Image height (no latent).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=limits.BATCH.low,
                    max=limits.BATCH.high,
                    tooltip="Images per run (no latent).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=limits.DENOISE.low,
                    max=limits.DENOISE.high,
                    step=0.01,
                    tooltip="With a latent: how much to change it (img2img 0.6 is a good start).",
                ),
                io.Float.Input(
                    "shift",
                    default=sampling.SHIFT,
                    min=limits.SHIFT.low,
                    max=limits.SHIFT.high,
                    step=0.1,
                    tooltip="Sigma schedule shift; 3 as the released scheduler configs.",
                ),
                io.Float.Input(
                    "variety",
                    default=0.0,
                    min=limits.VARIETY.low,
                    max=limits.VARIETY.high,
                    step=0.05,
                    tooltip="Seed variety for Turbo: seeded noise on the prompt's features for the "
                    "first 2 steps, so seeds differ in composition (0.3-0.6); 0 = off.",
                ),
                io.Combo.Input(
                    "method",
                    options=[OFFICIAL, TEMPLATE],
                    default=OFFICIAL,
                    optional=True,
                    tooltip="official: the reference pipelines' Euler, image i from seed + i (the official "
                    "images). comfyui_template: what ComfyUI's Z-Image Turbo template gives, KSampler's "
                    "res_multistep on the simple schedule with this shift and KSampler's seeding.",
                ),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, seed, steps, cfg, width, height, batch_size, denoise, shift, variety,
                negative=None, latent=None, mask=None, method=OFFICIAL) -> io.NodeOutput:  # fmt: skip
        limits.settings(steps, cfg, denoise, shift, variety, sampling.VARIETY_STEPS)  # before any model moves
        if cfg > 1 and negative is None:
            raise ValueError("cfg > 1 needs a negative prompt: connect a Z-Image Text Encode (an empty text is fine)")
        inner = transformer_of(model)
        native = positive, negative
        positive = from_conditioning("positive", positive, inner.cfg.cap_feat_dim)
        if negative is not None:
            negative = from_conditioning("negative", negative, inner.cfg.cap_feat_dim)
        if latent is not None:
            expect("latent", latent, dict, "a LATENT")
            expect("latent", latent.get("samples"), torch.Tensor, "a LATENT holding samples")
            mask = latent.get("noise_mask") if mask is None else mask
        if mask is not None:
            expect("mask", mask, torch.Tensor, "a MASK")
        edit, omni = isinstance(positive, EditConditioning), inner.cfg.siglip_feat_dim is not None
        if edit != omni:
            raise ValueError(NOT_OMNI if edit else NOT_EDIT)
        if edit and negative is not None and not isinstance(negative, EditConditioning):
            raise ValueError("with edit conditioning, the negative must be the Z-Image Edit Conditioning's too")
        clean = None if latent is None else latent["samples"]
        if clean is not None:
            limits.latents("latent", clean, inner.cfg.in_channels)
            clean = FLUX.normalize(clean.float())
        seeds = limits.seeds(seed, batch_size if clean is None else clean.shape[0])
        if clean is None and not edit:
            limits.size(width, height, sampling.FACTOR * inner.cfg.patch_size)
        shape = (inner.cfg.in_channels, height // sampling.FACTOR, width // sampling.FACTOR)
        if edit:  # the output takes the last reference's size unless a latent says otherwise
            shape = (inner.cfg.in_channels, *positive.refs[-1].shape[2:])
        size = shape if clean is None else clean.shape[1:]
        options = model.model_options.get("transformer_options", {})
        control = control_of(options)
        if control is not None:  # its input made at this size now (KSampler's calls find it made), and checked
            if edit:
                raise ValueError("a ControlNet steers Turbo and Base; Omni/Edit transformers take none")
            control = control.fitted(size[-2:])
            control.check(inner.cfg, size)
        if method == TEMPLATE:
            if edit or variety > 0:
                raise ValueError("method comfyui_template: KSampler sees neither reference images nor seed variety; "
                                 "use the official method (or variety 0)")  # fmt: skip
            if mask is not None and latent is None:
                raise ValueError("a mask needs the latent of the image to inpaint: connect Z-Image VAE Encode's output")
            return io.NodeOutput(template(model, *native, latent, mask, seed, steps, cfg,
                                          denoise if latent is not None else 1.0, shift, (len(seeds), *size)))  # fmt: skip
        if method != OFFICIAL:
            raise ValueError(f"method: '{method}' is not one of: {OFFICIAL}, {TEMPLATE}")
        if control is not None:  # its range in this sampler's own shift
            control = dataclasses.replace(control, sigmas=sampling.control_range(*options[CONTROL]["range"], shift))
        memory = comfy.sampler_helpers.estimate_memory(model, (len(seeds), *size), {})  # as KSampler reserves
        transformer = ready(model, "model", memory)
        progress = comfy.utils.ProgressBar(steps)
        previewer = latent_preview.get_previewer(model.load_device, comfy.latent_formats.Flux())

        def callback(step, total, x0):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            progress.update_absolute(step, total, preview)

        try:
            out = sampling.denoise(transformer, positive, negative, seeds, steps, cfg, shape=shape, clean=clean,
                           strength=denoise if clean is not None else 1.0, masks=mask, variety=variety, shift=shift,
                           callback=callback, cancelled=mm.processing_interrupted, control=control)  # fmt: skip
        except InterruptedError:
            mm.throw_exception_if_processing_interrupted()
            raise
        return io.NodeOutput({"samples": FLUX.denormalize(out).to(mm.intermediate_device(), torch.float32)})
