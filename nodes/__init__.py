"""ComfyUI glue: thin V3-schema nodes over `zimage_core`, pinned to `comfy_api.v0_0_2` (ComfyUI 0.3.64 and 0.8.0)."""

from comfy_api.v0_0_2 import ComfyExtension

from .controlnet import ZImageControlNetApply, ZImageControlNetLoader
from .edit import ZImageEditConditioning
from .loaders import ZImageSigLIPLoader, ZImageTextEncoderLoader, ZImageTransformerLoader, ZImageVAELoader
from .lora import ZImageLoraLoader
from .sampler import ZImageSampler
from .text_encode import ZImageTextEncode
from .vae import ZImageVAEDecode, ZImageVAEEncode, ZImageVAEToVAE

NODES = [
    ZImageTransformerLoader,
    ZImageTextEncoderLoader,
    ZImageVAELoader,
    ZImageSigLIPLoader,
    ZImageLoraLoader,
    ZImageControlNetLoader,
    ZImageControlNetApply,
    ZImageTextEncode,
    ZImageEditConditioning,
    ZImageSampler,
    ZImageVAEDecode,
    ZImageVAEEncode,
    ZImageVAEToVAE,
]


class ZImageExtension(ComfyExtension):
    async def get_node_list(self):
        return NODES


async def comfy_entrypoint() -> ZImageExtension:
    return ZImageExtension()
