"""Z-Image Edit Conditioning: a prompt with reference images for the Omni/Edit transformer."""

import comfy.model_management as mm
import torch
from comfy_api.v0_0_2 import io

from ..zimage_core import limits
from ..zimage_core.edit import (
    EditConditioning,
    encode_prompts,
    prepare_references,
    reference_latents,
    siglip_features,
    to_pil,
)
from ..zimage_core.sampling import PATCH
from ..zimage_core.text_encoder import MAX_LENGTH
from .loaders import ZImageSigLIP, ZImageTextEncoder, ZImageVAE, expect, ready
from .text_encode import to_conditioning


class ZImageEditConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageEditConditioning",
            display_name="Z-Image Edit Conditioning",
            category="Z-Image/conditioning",
            description="An instruction with reference images for Z-Image Omni/Edit: the images go to the model as "
            "VAE latents and SigLIP2 features, the prompt gets one vision slot per image (as diffusers' "
            "ZImageOmniPipeline). Turbo/Base cannot edit this way: use img2img or inpaint with them.",
            inputs=[
                ZImageTextEncoder.Input("text_encoder", tooltip="From Z-Image Text Encoder Loader."),
                ZImageVAE.Input("vae", tooltip="From Z-Image VAE Loader: encodes the references."),
                ZImageSigLIP.Input("siglip", tooltip="From Z-Image SigLIP2 Loader: reads the references."),
                io.Image.Input("image", tooltip="The image to edit (every image of a batch is a reference)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What to do with the image(s)."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt (used with CFG)."),
                io.Int.Input(
                    "max_length",
                    default=MAX_LENGTH,
                    min=limits.MAX_LENGTH.low,
                    max=limits.MAX_LENGTH.high,
                    tooltip="Tokens kept per template piece: 512 as the reference; 0 keeps all.",
                ),
                io.Image.Input("image_2", optional=True, tooltip="A second reference image (optional)."),
                io.Image.Input("image_3", optional=True, tooltip="A third reference image (optional)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, text_encoder, vae, siglip, image, prompt, negative, max_length, image_2=None, image_3=None):
        given = {"image": image, "image_2": image_2, "image_3": image_3}
        batches = [expect(k, v, torch.Tensor, "an IMAGE") for k, v in given.items() if v is not None]
        pictures = [to_pil(item) for batch in batches for item in batch]
        autoencoder = ready(vae, "vae")
        resized, cropped = prepare_references(pictures, autoencoder.cfg.factor * PATCH)
        refs = [r.to(mm.intermediate_device()) for r in reference_latents(autoencoder, cropped)]
        vision = ready(siglip, "siglip")
        features = [f.to(mm.intermediate_device()) for f in siglip_features(vision.model, vision.processor, resized)]
        encoder = ready(text_encoder, "text_encoder")
        texts = [encode_prompts(encoder, [p], len(pictures), max_length or None) for p in (prompt, negative)]
        texts = [t._replace(features=t.features.to(mm.intermediate_device())) for t in texts]
        return io.NodeOutput(*(to_conditioning(t, EditConditioning(t, refs, features)) for t in texts))
