"""Our transformer as a native ComfyUI MODEL: the diffusion model inside the host's own Lumina2/Z-Image model
object, built from the host's layers (`comfy.ops`) and attention, so KSampler, LoRA loaders, partial loading and
the dtype and attention flags all work on it (city96's ComfyUI-GGUF does the same with its own ops)."""

import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.cli_args import args
from comfy.ldm.modules.attention import optimized_attention_masked

from ..zimage_core import gemm
from ..zimage_core.loaders import load_transformer, transformer_facts
from ..zimage_core.ops import Compact, Embedding, Ops
from ..zimage_core.transformer import ZImageTransformer

HOST_ZIMAGE = getattr(comfy.supported_models, "ZImage", None)  # 0.8.0 and later; 0.3.64 has Lumina2 only
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def host_attention(q, k, v, mask):
    """ComfyUI's attention (sage, flash, xformers or PyTorch, as its flags say) over (B, S, heads, head_dim)."""
    mask = None if mask is None else mask[:, None, None, :]
    return optimized_attention_masked(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q.shape[2], mask, skip_reshape=True
    )


class HostCompact(Compact):
    """What the host's layers need to hold a quantized weight compact: it is dequantized where the call runs, then
    the LoRA patches apply to the dense weight, as ComfyUI-GGUF applies them to its GGML weights."""

    def hold_compact(self):
        super().hold_compact()
        self.lora: tuple[str, list] | None = None  # (key, patches) set by `Patcher` while it is patched

    def _load_from_state_dict(self, *args, **kwargs):
        """torch's own: a layer that brings its loader is built eagerly by 0.33.0's Linear and Embedding, which
        with dynamic VRAM (its default on NVIDIA) leave the weight None for the host's own loader to fill."""
        return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

    @property
    def is_patched(self) -> bool:
        return self.lora is not None or bool(self.weight_function)

    def patched_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        weight = self.dense_weight(device, dtype)
        if self.lora is not None:
            weight = comfy.lora.calculate_weight(self.lora[1], weight, self.lora[0], intermediate_dtype=dtype)
        for patch in self.weight_function:  # partial loading's patches
            weight = patch(weight)
        return weight


class HostLinear(HostCompact, comfy.ops.disable_weight_init.Linear):
    """The host's Linear (partial loading, LoRA patches) that can also hold a quantized weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_compact()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.lowp and not self.is_patched and not self.bias_function
        if fast and (out := gemm.linear(self, x)) is not None:
            return out if self.bias is None else out + self.bias.to(x.device, x.dtype)
        if not self.is_compact:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        for patch in self.bias_function if bias is not None else ():
            bias = patch(bias)
        return F.linear(x, self.patched_weight(x.device, x.dtype), bias)


class HostEmbedding(HostCompact, comfy.ops.disable_weight_init.Embedding):
    """The host's Embedding that can also hold a compact table (a GGUF token embedding): unpatched, a lookup
    dequantizes only the rows it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_compact()

    dense_shape = Embedding.dense_shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.is_compact:
            return super().forward(ids)
        if self.is_patched:
            return F.embedding(ids, self.patched_weight(ids.device, self.dense_dtype))
        return self.lookup(ids)


HOST_OPS = Ops(HostLinear, comfy.ops.manual_cast.RMSNorm, host_attention, HostEmbedding)  # norms run on fp32


def cast_per_call(model: torch.nn.Module, compute: torch.dtype) -> torch.nn.Module:
    """Layers holding a plain weight in another dtype than `compute` cast it per call (`comfy.ops.manual_cast`);
    the rest use theirs as held, cast only where partial loading or a LoRA asks: the rule of the host's
    `pick_operations`, which picks per model, applied per layer (an fp8 file may hold some layers in bf16)."""
    for layer in model.modules():
        if isinstance(layer, HostCompact) and not layer.is_compact and layer.weight.dtype != compute:
            layer.comfy_cast_weights = True
    return model


class Patcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher, except that a compact (quantized) weight is never patched in place: its LoRA
    patches are handed to its layer, which applies them per call to the dequantized weight."""

    def compact_layer(self, key: str) -> HostCompact | None:
        owner, _, leaf = key.rpartition(".")
        layer = comfy.utils.get_attr(self.model, owner) if owner and leaf == "weight" else None
        return layer if isinstance(layer, HostCompact) and layer.is_compact else None

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        layer = self.compact_layer(key)
        if layer is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        layer.lora = (key, self.patches[key]) if key in self.patches else None
        if kwargs.get("return_weight"):  # 0.33.0 asks for the patched weight itself when it saves a model
            weight = layer.dense_weight(device_to or layer.weight.device, torch.float32)
            return weight if layer.lora is None else comfy.lora.calculate_weight(layer.lora[1], weight, key)
        return layer.weight

    def unpatch_model(self, *args, **kwargs):
        for layer in self.model.modules():
            if isinstance(layer, HostCompact):
                layer.lora = None
        return super().unpatch_model(*args, **kwargs)


def inference_dtypes(fp16_ok: bool) -> list[torch.dtype]:
    fp16 = fp16_ok and mm.extended_fp16_support()
    return [torch.bfloat16, *([torch.float16] if fp16 else []), torch.float32]


class Config(HOST_ZIMAGE or comfy.supported_models.Lumina2):
    """The host's Z-Image settings (Flux latents, flow with shift 3); fp16 offered only for weights that tolerate
    it, by ComfyUI 0.33.0's test, on every host."""

    sampling_settings = {"multiplier": 1.0, "shift": 3.0}  # noqa: RUF012 (the host's BASE declares it so)
    memory_usage_factor = getattr(HOST_ZIMAGE, "memory_usage_factor", 2.0)

    def __init__(self, unet_config, fp16_ok: bool):
        super().__init__(unet_config)
        self.supported_inference_dtypes = inference_dtypes(fp16_ok)


CONTROL = "zimage_control"  # a MODEL's transformer option: the Control that Z-Image ControlNet Apply put on it
NATIVE_CONTROL = "ComfyUI's Apply Z-Image Fun ControlNet (ZImageFunControlnet) patches ComfyUI's own Z-Image model "\
    "block by block, which this pack's MODEL does not run: use Z-Image ControlNet Apply with Z-Image ControlNet "\
    "Loader (the same files, the authors' control math)"  # fmt: skip


def control_of(options: dict, sigmas: torch.Tensor | None = None):
    """The Control on a MODEL's transformer options, if any (and, given the step's `sigmas`, only where it acts);
    native block patches, which this transformer would silently ignore, are refused. The sigma is read back from
    the device only when there is a Control to ask: without one a step waits for nothing."""
    patches = options.get("patches", {})
    if patches.get("noise_refiner") or patches.get("double_block"):
        raise ValueError(NATIVE_CONTROL)
    entry = options.get(CONTROL)
    if entry is None or (sigmas is not None and not entry["control"].active(float(sigmas.flatten()[0]))):
        return None
    return entry["control"]


class HostTransformer(ZImageTransformer):
    """Called as ComfyUI calls NextDiT: sigma-time in, the velocity in ComfyUI's sign (noise - x0) out."""

    load_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        return self.load_device or super().device

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        if self.cfg.siglip_feat_dim is not None:
            raise ValueError("this MODEL is an Omni/Edit transformer: ComfyUI's samplers cannot hand it reference "
                             "images, so sample it with the Z-Image Sampler and Z-Image Edit Conditioning")  # fmt: skip
        lengths = None if attention_mask is None else [int(n) for n in attention_mask.flatten(1).sum(1)]
        control = control_of(kwargs.get("transformer_options", {}), timesteps)
        if control is not None:  # under KSampler: first seen here at the latent's size
            control = control.fitted(x.shape[-2:])
            control.check(self.cfg, x.shape)
        return -ZImageTransformer.forward(self, x, 1 - timesteps, context, lengths, control)


class Direct:
    """The transformer as `zimage_core.sampling` calls it (its own time and sign), for the Z-Image Sampler."""

    def __init__(self, transformer: HostTransformer):
        self.transformer, self.cfg, self.device, self.dtype = (
            transformer,
            transformer.cfg,
            transformer.device,
            transformer.dtype,
        )

    def __call__(self, x, t, captions, lengths, control=None):
        return ZImageTransformer.forward(self.transformer, x, t, captions, lengths, control)

    def forward_omni(self, *args):
        return self.transformer.forward_omni(*args)


def dtypes(facts, option, load_device):
    """(held, compute) as ComfyUI's diffusion model loader picks them: the user's flags and option win."""
    config_dtypes = inference_dtypes(facts.fp16_ok)
    chosen = option or mm.unet_dtype(load_device, facts.parameters, config_dtypes, facts.file_dtype)
    manual = mm.unet_manual_cast(chosen, load_device, config_dtypes)
    return chosen, manual or chosen


def host_gemms(load_device, compute: torch.dtype) -> frozenset[str]:
    """The low-precision GEMMs the host would run its own models' weights with: int8, mxfp8 and nvfp4 where the GPU
    has them (0.33.0 runs its int8 files W8A8, its block-scaled ones on Blackwell), fp8 where it also has them and
    the user asked (`--fast fp8_matrix_mult`)."""
    allowed = gemm.kinds("auto", load_device, compute)
    if not any(getattr(f, "value", f) == "fp8_matrix_mult" for f in getattr(args, "fast", None) or ()):
        allowed -= {"fp8"}
    return allowed


def load_model(path, option: torch.dtype | None, load_device, offload_device):
    """A ModelPatcher holding a host model whose diffusion model is our transformer, read from `path`."""
    facts = transformer_facts(path)
    held, compute = dtypes(facts, option, load_device)
    fp8 = held in FP8
    transformer = load_transformer(path, offload_device, compute if fp8 else held, held if fp8 else None,
                                   ops=HOST_OPS, compute_dtype=compute, model_class=HostTransformer)  # fmt: skip
    cast_per_call(transformer, compute)
    gemm.use_gemms(transformer, host_gemms(load_device, compute))
    transformer.load_device = torch.device(load_device)
    config = Config({"image_model": "lumina2", "dim": facts.config.dim, "disable_unet_model_creation": True},
                    facts.fp16_ok)  # fmt: skip
    config.set_inference_dtype(held, None if compute == held else compute)
    model = comfy.model_base.Lumina2(config, device=offload_device)
    model.diffusion_model = transformer
    return Patcher(model, load_device=load_device, offload_device=offload_device)
