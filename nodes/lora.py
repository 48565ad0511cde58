"""Z-Image LoRA Loader: a LoRA from any trainer (`zimage_core.lora` reads it onto the layer names) as the host's
own patches on a Z-Image MODEL, ours or the host's native one. ModelPatcher applies them, so they stack with the
host's LoRA loaders, and partial loading and compact (quantized) weights take them as they take the host's."""

import logging

import comfy.lora
import comfy.model_patcher
import folder_paths
from comfy_api.v0_0_2 import io

from ..zimage_core import limits
from ..zimage_core.loaders import stamp
from ..zimage_core.lora import LoRA, linear_shapes, read_lora
from .loaders import check_choices, expect


def host_patches(lora: LoRA) -> dict:
    """The host's patches: each update under its kohya/LyCORIS names, keyed by its layer's weight (a q, k or v
    update with its rows of the fused qkv as the host's offset), built by the host's own adapters."""
    tensors, to_load = {}, {}
    for i, adapter in enumerate(lora.adapters):
        tensors |= {f"{i}.{name}": t for name, t in adapter.tensors.items()}
        key, rows = f"diffusion_model.{adapter.target.layer}.weight", adapter.target.rows
        to_load[str(i)] = key if rows is None else (key, (0, rows[0], rows[1] - rows[0]))
    return comfy.lora.load_lora(tensors, to_load, log_missing=False)


class ZImageLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageLoraLoader",
            display_name="Z-Image LoRA Loader",
            category="Z-Image/loaders",
            description="Applies a Z-Image LoRA from models/loras to a Z-Image MODEL (this pack's or ComfyUI's): "
            "diffusers/PEFT, ai-toolkit, kohya/musubi, DiffSynth, dot-named, fused (ComfyUI) LoRAs and LyCORIS LoKr/"
            "LoHa. Chain it for several LoRAs. The console lists every key not applied; a LoRA that matches nothing "
            "fails.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A Z-Image MODEL: from the Z-Image Transformer Loader or "
                    "ComfyUI's own loaders, with or without LoRAs already on it.",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A .safetensors LoRA, LoKr or LoHa in ComfyUI's models/loras folders.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=limits.LORA_STRENGTH.low,
                    max=limits.LORA_STRENGTH.high,
                    step=0.01,
                    tooltip="How strongly it applies (1 = as trained; negative inverts it).",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        """ComfyUI 0.3.64 does not check a V3 combo's value against its options."""
        return check_choices(("lora_name", lora_name, folder_paths.get_filename_list("loras")))

    @classmethod
    def fingerprint_inputs(cls, model, lora_name, strength):
        """Changes when the file does, so ComfyUI applies it again after it is replaced."""
        path = folder_paths.get_full_path("loras", lora_name)
        return (stamp(path) if path else lora_name), strength

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        expect("model", model, comfy.model_patcher.ModelPatcher, "a Z-Image MODEL")
        limits.number("strength", strength, limits.LORA_STRENGTH)
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ValueError(f"lora_name: '{lora_name}' is not in models/loras")
        return io.NodeOutput(apply_lora(model, path, strength))


def apply_lora(model, path: str, strength: float):
    """`model` with the LoRA at `path` patched on (a clone; the same model at strength 0), its report logged."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    lora = read_lora(path, linear_shapes(diffusion_model) if diffusion_model is not None else {})
    (logging.warning if lora.skipped else logging.info)(lora.summary())
    if strength == 0:
        return model
    patched = model.clone()
    patched.add_patches(host_patches(lora), float(strength))
    return patched
