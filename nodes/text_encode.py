"""Z-Image Text Encode: a prompt through Qwen3 with Z-Image's chat template, as native CONDITIONING.

CONDITIONING is ComfyUI's list of [features (B, L, hidden), options]; ours carries one prompt's rows exactly, so
native KSampler and ConditioningZeroOut take it, and ours takes native CLIPTextEncode's. Edit conditioning rides
along in the options under `EDIT`.
"""

import comfy.model_management as mm
import torch
from comfy_api.v0_0_2 import io

from ..zimage_core import limits
from ..zimage_core.edit import EditConditioning
from ..zimage_core.text_encoder import MAX_LENGTH, Embeddings
from .loaders import ZImageTextEncoder, expect, ready

EDIT = "zimage_edit"


def to_conditioning(text: Embeddings, edit: EditConditioning | None = None) -> list:
    """One prompt's features as native CONDITIONING (with its edit conditioning, if any)."""
    features = text.features[:1, : sum(text.lengths[0]) if edit else text.lengths[0]]
    return [[features.to(mm.intermediate_device()), {EDIT: edit} if edit else {}]]


def from_conditioning(name: str, value, width: int) -> Embeddings | EditConditioning:
    """Our conditioning from native CONDITIONING (ours or CLIPTextEncode's), or an error naming the input."""
    expect(name, value, list, "conditioning from Z-Image Text Encode, Edit Conditioning or CLIPTextEncode")
    if len(value) != 1 or not isinstance(value[0], (list, tuple)) or len(value[0]) != 2:
        raise ValueError(f"{name}: expected the CONDITIONING of one prompt, got {len(value)} entries "
                         "(combined or area conditioning needs KSampler)")  # fmt: skip
    features, options = value[0]
    expect(name, features, torch.Tensor, "CONDITIONING holding features")
    expect(name, options, dict, "CONDITIONING holding options")
    if isinstance(options.get(EDIT), EditConditioning):
        return options[EDIT]
    if features.dim() != 3 or features.shape[-1] != width or features.shape[1] == 0:
        raise ValueError(f"{name}: features of shape {tuple(features.shape)} are not Z-Image's (B, L, {width}): "
                         "encode with Z-Image Text Encode or a lumina2 CLIP (qwen_3_4b)")  # fmt: skip
    mask = options.get("attention_mask")
    lengths = [features.shape[1]] * features.shape[0]
    if isinstance(mask, torch.Tensor) and mask.shape[0] == features.shape[0]:
        lengths = [max(1, int(n)) for n in mask.flatten(1)[:, : features.shape[1]].sum(1)]
    return Embeddings(features, tuple(lengths), (0,) * len(lengths))


class ZImageTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageTextEncode",
            display_name="Z-Image Text Encode",
            category="Z-Image/conditioning",
            description="Encodes a prompt (any language; Chinese and English are what Z-Image knows best) as "
            "CONDITIONING for the Z-Image Sampler or KSampler. Use a second one for the negative prompt when CFG "
            "is on.",
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
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, text, max_length) -> io.NodeOutput:
        encoded = ready(text_encoder, "text_encoder").encode([text], max_length or None)  # a cut prompt is logged there
        return io.NodeOutput(to_conditioning(encoded))
