"""Z-Image Text Encode: a prompt through Qwen3 with Z-Image's chat template."""

import comfy.model_management as mm
from comfy_api.v0_0_2 import io

from ..zimage_core import limits
from ..zimage_core.text_encoder import MAX_LENGTH
from .loaders import ZImageTextEncoder, ready

ZImageConditioning = io.Custom("ZIMAGE_CONDITIONING")


class ZImageTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageTextEncode",
            display_name="Z-Image Text Encode",
            category="Z-Image/conditioning",
            description="Encodes a prompt (any language; Chinese and English are what Z-Image knows best) for the "
            "Z-Image Sampler. Use a second one for the negative prompt when CFG is on.",
            inputs=[
                ZImageTextEncoder.Input("text_encoder", tooltip="From Z-Image Text Encoder Loader."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt."),
                io.Int.Input(
                    "max_length",
                    default=MAX_LENGTH,
                    min=limits.MAX_LENGTH.low,
                    max=limits.MAX_LENGTH.high,
                    tooltip="Tokens kept, chat template included: 512 as the official pipelines; "
                    "0 keeps all (ComfyUI's native encoder). Cut prompts are logged.",
                ),
            ],
            outputs=[ZImageConditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, text, max_length) -> io.NodeOutput:
        encoded = ready(text_encoder, "text_encoder").encode([text], max_length or None)  # a cut prompt is logged there
        return io.NodeOutput(encoded._replace(features=encoded.features.to(mm.intermediate_device())))
