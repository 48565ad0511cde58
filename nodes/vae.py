"""Z-Image VAE Decode / Encode: ComfyUI's IMAGE and LATENT (the autoencoder's own latents, as native nodes hold)."""

import comfy.model_management as mm
import comfy.sd
import torch
from comfy_api.v0_0_2 import io

from ..zimage_core.sampling import PATCH
from ..zimage_core.vae import VAE, crop_to
from .loaders import ZImageVAE, check_choices, expect, ready

TILED = {"auto": None, "on": True, "off": False}
TILED_TOOLTIP = "Run in bands of rows (same result, a fraction of the memory): auto does when the whole image " \
    "would not fit in free memory."  # fmt: skip


class TiledNode(io.ComfyNode):
    """Both VAE nodes check their `tiled` choice themselves: ComfyUI 0.3.64 does not check V3 combo values."""

    @classmethod
    def validate_inputs(cls, tiled):
        return check_choices(("tiled", tiled, list(TILED)))


class ZImageVAEDecode(TiledNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageVAEDecode",
            display_name="Z-Image VAE Decode",
            category="Z-Image/latent",
            description="Latents to images; also decodes latents of native samplers using the Flux VAE.",
            inputs=[
                ZImageVAE.Input("vae", tooltip="From Z-Image VAE Loader."),
                io.Latent.Input("samples", tooltip="From Z-Image Sampler, or any Flux-VAE latent."),
                io.Combo.Input("tiled", options=list(TILED), default="auto", tooltip=TILED_TOOLTIP),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, vae, samples, tiled) -> io.NodeOutput:
        z = expect("samples", expect("samples", samples, dict, "a LATENT").get("samples"), torch.Tensor, "a LATENT")
        return io.NodeOutput(ready(vae, "vae").decode(z, tiled=TILED[tiled]).to(mm.intermediate_device()))


class ZImageVAEEncode(TiledNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageVAEEncode",
            display_name="Z-Image VAE Encode",
            category="Z-Image/latent",
            description="Images to latents for img2img and inpaint (the posterior mean, as ComfyUI encodes). Sizes "
            "are cropped at the centre to a multiple of 16 pixels, which the sampler needs.",
            inputs=[
                ZImageVAE.Input("vae", tooltip="From Z-Image VAE Loader."),
                io.Image.Input("pixels", tooltip="The image(s) to encode."),
                io.Combo.Input("tiled", options=list(TILED), default="auto", tooltip=TILED_TOOLTIP),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, vae, pixels, tiled) -> io.NodeOutput:
        model = ready(vae, "vae")
        images = crop_to(expect("pixels", pixels, torch.Tensor, "an IMAGE")[..., :3], model.cfg.factor * PATCH)
        return io.NodeOutput({"samples": model.encode(images, tiled=TILED[tiled]).to(mm.intermediate_device())})


class ZImageVAEToVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageVAEToVAE",
            display_name="Z-Image VAE to VAE",
            category="Z-Image/loaders",
            description="The same VAE (its weights and dtype) as ComfyUI's own VAE, for native nodes that take "
            "one: VAE Decode/Encode (Tiled), inpaint conditioning, detailers.",
            inputs=[ZImageVAE.Input("vae", tooltip="From Z-Image VAE Loader.")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        model = expect("vae", getattr(vae, "model", None), VAE, "a Z-Image VAE from Z-Image VAE Loader")
        return io.NodeOutput(comfy.sd.VAE(sd=model.bfl_state_dict(), dtype=model.dtype))
