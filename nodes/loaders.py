"""Loader nodes: files from ComfyUI's model folders, handed to the host's model management as ModelPatchers."""

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy.cli_args import args
from comfy_api.v0_0_2 import io

from ..zimage_core.loaders import LOADERS, ModelCache, load_siglip, stamp, transformer_facts
from ..zimage_core.text_encoder import TextEncoder
from ..zimage_core.vae import VAE
from .model import HOST_OPS, Direct, HostTransformer, Patcher, cast_per_call, load_model
from .models import choices, find

ZImageTextEncoder = io.Custom("ZIMAGE_TEXT_ENCODER")
ZImageVAE = io.Custom("ZIMAGE_VAE")
ZImageSigLIP = io.Custom("ZIMAGE_SIGLIP")

CACHE = ModelCache()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DEVICES = {  # (load, offload) per component, as ComfyUI places its own models
    "transformer": (mm.get_torch_device, mm.unet_offload_device),
    "text_encoder": (mm.text_encoder_device, mm.text_encoder_offload_device),
    "vae": (mm.vae_device, mm.vae_offload_device),
    "siglip": (mm.text_encoder_device, mm.text_encoder_offload_device),  # where ComfyUI puts its vision encoders
}
DEVICE_CHOICES = ["default", "cpu"]
TEXT_ENCODER_FLAGS = ("fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc", "fp16_text_enc", "bf16_text_enc", "fp32_text_enc")
VAE_FLAGS = ("fp16_vae", "bf16_vae", "fp32_vae")


class VisionEncoder(torch.nn.Module):
    """SigLIP2 with its image processor, as one module: ComfyUI's ModelPatcher sets `.device` on what it manages,
    which transformers' models refuse."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor


KINDS = {  # input name -> (what it is, the node that makes it)
    "model": ("Z-Image MODEL", "Z-Image Transformer Loader"),
    "text_encoder": ("Z-Image text encoder", "Z-Image Text Encoder Loader"),
    "vae": ("Z-Image VAE", "Z-Image VAE Loader"),
    "siglip": ("SigLIP2 vision encoder", "Z-Image SigLIP2 Loader"),
}
MODULES = {"text_encoder": TextEncoder, "vae": VAE, "siglip": VisionEncoder}


def check_choices(*checks: tuple[str, str, list]) -> str | bool:
    """True, or a message naming the first (input, value, options) whose value is not among its options."""
    for name, value, options in checks:
        if value not in options:
            return f"{name}: '{value}' is not one of: {', '.join(options) or '(none found)'}"
    return True


def expect(name: str, value, types, what: str):
    """`value` when it is one of `types`; else an error naming the input (`/prompt` can put any JSON value into an
    input that the UI only lets a link fill)."""
    if not isinstance(value, types):
        raise ValueError(f"{name}: expected {what}, got {type(value).__name__} {str(value)[:60]!r}")  # noqa: TRY004
    return value


def transformer_of(patcher, name: str = "model") -> HostTransformer:
    """Our transformer inside a MODEL, or an error naming the input (a native model belongs to KSampler)."""
    kind, loader = KINDS["model"]
    expect(name, patcher, comfy.model_patcher.ModelPatcher, f"a {kind} from {loader}")
    inner = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if not isinstance(inner, HostTransformer):
        why = f"this MODEL is not from {loader} ({type(inner).__name__}); sample native models with KSampler"
        raise ValueError(f"{name}: {why}")  # noqa: TRY004 (ComfyUI reports bad inputs as ValueError)
    return inner


def ready(patcher, name: str, memory: tuple[int, int] | None = None):
    """The model behind input `name` on its device, after ComfyUI made room for it (others may be offloaded).

    The MODEL and the text encoder are built from the host's layers, so ComfyUI may load them partially (for the
    MODEL keeping `memory` (wanted, minimum) bytes free for activations) and stream the rest in per layer. The
    VAE and SigLIP2 are small and hold layers the host cannot stream: they load whole."""
    if name == "model":
        transformer = transformer_of(patcher, name)
        wanted, minimum = memory or (0, None)
        extra = patcher.get_additional_models()  # a ControlNet on it, from Z-Image ControlNet Apply
        mm.load_models_gpu([patcher, *extra], memory_required=wanted, minimum_memory_required=minimum)
        return Direct(transformer)
    kind, loader = KINDS[name]
    expect(name, patcher, comfy.model_patcher.ModelPatcher, f"a {kind} from {loader}")
    expect(name, patcher.model, MODULES[name], f"a {kind} from {loader}")
    mm.load_models_gpu([patcher], force_full_load=name != "text_encoder")
    return patcher.model


def compute_dtype(load_device) -> torch.dtype:
    return torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32


def flagged(component: str, load_device) -> torch.dtype | None:
    """The dtype ComfyUI's own flags ask for this component (`--fp16-text-enc`, `--bf16-vae`, ...), if they ask: the
    host picks it as it does for its own encoders and VAEs (the Flux VAE: bf16 or fp32)."""
    if component == "text_encoder" and any(getattr(args, f, False) for f in TEXT_ENCODER_FLAGS):
        return mm.text_encoder_dtype(load_device)
    if component == "vae" and any(getattr(args, f, False) for f in VAE_FLAGS):
        return mm.vae_dtype(load_device, [torch.bfloat16, torch.float32])
    return None


def load(component: str, folder: str, name: str, weight_dtype: str, device: str):
    path = find(folder, component, name)
    cpu = torch.device("cpu")
    load_device, offload_device = (cpu, cpu) if device == "cpu" else (f() for f in DEVICES[component])
    if component == "transformer":
        option = DTYPES.get(weight_dtype) or WEIGHT_DTYPES.get(weight_dtype)
        if option == torch.float16 and not transformer_facts(path).fp16_ok:
            raise ValueError(f"weight_dtype: {name} overflows fp16 (its FFN norms fail ComfyUI's fp16 test, as "
                             "Base's do): choose default, bf16 or fp32")  # fmt: skip
        return CACHE.get(component, path, (weight_dtype, device),
                         lambda: load_model(path, option, load_device, offload_device))  # fmt: skip
    held = WEIGHT_DTYPES.get(weight_dtype)
    if weight_dtype in DTYPES:
        dtype = DTYPES[weight_dtype]
    elif (asked := flagged(component, load_device)) is not None:
        dtype, held = (compute_dtype(load_device), asked) if asked in WEIGHT_DTYPES.values() else (asked, None)
    elif component == "vae":
        dtype = torch.float32  # as the official pipeline runs it
    else:
        dtype = compute_dtype(load_device)
    extra = {"weight_dtype": held, "ops": HOST_OPS} if component == "text_encoder" else {}

    def build():
        if component == "siglip":
            model = VisionEncoder(*load_siglip(path, offload_device, dtype))
        else:
            model = LOADERS[component](path, offload_device, dtype, **extra)
        if component == "text_encoder":
            model.load_device = torch.device(load_device)
            cast_per_call(model, dtype)
        return Patcher(model, load_device=load_device, offload_device=offload_device)

    return CACHE.get(component, path, (weight_dtype, device), build)


def loader(node_id, title, component, folder, output, dtypes, description):
    """A loader node class: a file or diffusers folder from `folder`, a weight dtype and a device."""

    class Loader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id,
                display_name=title,
                category="Z-Image/loaders",
                description=description,
                inputs=[
                    io.Combo.Input(
                        "name",
                        options=list(choices(folder, component)),
                        tooltip=f"A file or diffusers folder in ComfyUI's models/{folder} folders.",
                    ),
                    io.Combo.Input(
                        "weight_dtype",
                        options=dtypes,
                        default="default",
                        tooltip="default: as ComfyUI picks for its own models, its flags first (--fp16-unet, "
                        "--fp8_e4m3fn-text-enc, --bf16-vae, ...); else bf16 where the device has it (the VAE: "
                        "fp32). fp8 holds the weights in 8 bits; fp16 only for weights that tolerate it (Turbo, "
                        "not Base).",
                    ),
                    io.Combo.Input(
                        "device",
                        options=DEVICE_CHOICES,
                        default="default",
                        tooltip="default: ComfyUI's device for this kind of model; cpu keeps it there.",
                    ),
                ],
                outputs=[output.Output()],
            )

        @classmethod
        def validate_inputs(cls, name):
            """ComfyUI 0.3.64 does not check a V3 combo's value against its options, so the file is checked here.
            Only `name`: ComfyUI gives this answer to every input named here. The other two are checked by newer
            hosts and, for 0.3.64, in `execute`."""
            return check_choices(("name", name, list(choices(folder, component))))

        @classmethod
        def fingerprint_inputs(cls, name, weight_dtype, device):
            """Changes when the file does, so ComfyUI runs the loader again after a file is replaced."""
            found = choices(folder, component).get(name)
            return stamp(found) if found else name

        @classmethod
        def execute(cls, name, weight_dtype, device) -> io.NodeOutput:
            checked = check_choices(("weight_dtype", weight_dtype, dtypes), ("device", device, DEVICE_CHOICES))
            if checked is not True:
                raise ValueError(checked)
            return io.NodeOutput(load(component, folder, name, weight_dtype, device))

    Loader.__name__ = Loader.__qualname__ = node_id
    return Loader


MODEL_DTYPES = ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]
ZImageTransformerLoader = loader(
    "ZImageTransformerLoader", "Z-Image Transformer Loader", "transformer", "diffusion_models", io.Model,
    MODEL_DTYPES, "Loads a Z-Image transformer (Turbo, Base, Omni/Edit): z_image_turbo_bf16.safetensors, fp8, int8 "
    "(ConvRot), MXFP8, NVFP4 and GGUF files (quantized ones stay compact), or a diffusers transformer/ or pipeline "
    "folder.",
)  # fmt: skip
ZImageTextEncoderLoader = loader(
    "ZImageTextEncoderLoader", "Z-Image Text Encoder Loader", "text_encoder", "text_encoders", ZImageTextEncoder,
    MODEL_DTYPES, "Loads Z-Image's Qwen3-4B text encoder: qwen_3_4b.safetensors (bf16, fp8 or mixed-precision), a "
    "GGUF file, or a diffusers text_encoder/ or pipeline folder.",
)  # fmt: skip
ZImageVAELoader = loader(
    "ZImageVAELoader", "Z-Image VAE Loader", "vae", "vae", ZImageVAE, ["default", "bf16", "fp32"],
    "Loads the Flux VAE Z-Image uses: ae.safetensors or a diffusers vae/ or pipeline folder.",
)  # fmt: skip
ZImageSigLIPLoader = loader(
    "ZImageSigLIPLoader", "Z-Image SigLIP2 Loader", "siglip", "clip_vision", ZImageSigLIP, ["default", "bf16", "fp32"],
    "Loads the SigLIP2 vision encoder Z-Image Omni/Edit reads reference images with: a safetensors file or a "
    "transformers folder in models/clip_vision (or a pipeline folder with siglip/).",
)  # fmt: skip
