"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder (0.8.0 and later: the hosts
with a native Z-Image). One slice of the real transformer (width 3840, 30 heads, 2 layers and the 2 + 2 refiners,
so ComfyUI detects it as Z-Image) is written as a ComfyUI single file with seeded random weights, then loaded twice:
by ComfyUI's own loader (`comfy.sd.load_diffusion_model`, what UNETLoader calls: its NextDiT) and by ours (our
transformer inside the same host model class). Both run through ComfyUI's KSampler node itself, in fp32, plain and
with one kohya-named LoRA applied by `comfy.sd.load_lora_for_models` (what LoraLoaderModelOnly calls).

ComfyUI's q/k RMSNorms use torch's default eps where the official model (and ours) uses 1e-5; the native model's
are set to 1e-5 first, as in our transformer tests. Then the same slice in each quantized format the host's own
loader knows (its `QUANT_ALGOS`; the first layer's Linears: the other blocks run the same code), written by
comfy-kitchen: ComfyUI's loader and ours load the one file and predict alike. Arguments: the pack's folder, a work folder. Prints one JSON line of relative errors
(max |ours - native| / max |native|)."""

import gc
import importlib
import json
import logging
import sys
from pathlib import Path

from in_host import setup

pack, work = Path(sys.argv[1]), Path(sys.argv[2])
setup(pack)

import comfy.quant_ops
import comfy.sd
import torch
from helpers import ck_quantized_file, is_block_linear
from safetensors.torch import save_file
from zimage_pack.nodes.lora import apply_lora
from zimage_pack.nodes.model import load_model
from zimage_pack.zimage_core.transformer import TransformerConfig, ZImageTransformer

import nodes

CFG = TransformerConfig(n_layers=2, cap_feat_dim=64)
SEED, STEPS, LATENT = 21, 2, (1, 16, 8, 12)  # a 64 x 96 image: rows and columns get different RoPE positions


def random_weights(cfg: TransformerConfig, seed: int) -> dict:
    """Every tensor of the layout at a sensible scale (norms around 1, unit-gain linears), in bf16 as released."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ZImageTransformer(cfg).state_dict().items()}
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, shape in shapes.items():
        if "pad_token" in name:
            w = torch.randn(shape, generator=g)
        elif "norm" in name or name.startswith("cap_embedder.0"):
            w = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            w = torch.randn(shape, generator=g) * shape[1:].numel() ** -0.5
        else:
            w = 0.05 * torch.randn(shape, generator=g)
        sd[name] = w.to(torch.bfloat16)
    return sd


def kohya_lora(sd: dict, rank: int = 4) -> dict:
    """A LoRA in kohya's names on the main layers' fused qkv and first FFN projection."""
    g, lora = torch.Generator().manual_seed(9), {}
    for key, weight in sd.items():
        if key.startswith("layers.") and key.endswith(("attention.qkv.weight", "feed_forward.w1.weight")):
            name = "diffusion_model." + key.removesuffix(".weight")
            lora[name + ".lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.05
            lora[name + ".lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.05
            lora[name + ".alpha"] = torch.tensor(float(rank))
    return lora


def split_kohya(lora: dict) -> dict:
    """The same LoRA as musubi-tuner saves it: diffusers' split `to_q/to_k/to_v` names in kohya's underscores (the
    rows of each fused up matrix, the down matrix shared), which ComfyUI's own loaders do not map."""
    split = {}
    for key, tensor in lora.items():
        layer, _, leaf = key.removeprefix("diffusion_model.").partition(".lora_")
        leaf = "lora_" + leaf if leaf else key.rsplit(".", 1)[1]
        layer = layer.removesuffix(".alpha")
        if layer.endswith(".attention.qkv"):
            parts = tensor.chunk(3) if leaf == "lora_up.weight" else [tensor] * 3
            for p, part in zip("qkv", parts):
                split[f"lora_unet_{layer.replace('qkv', f'to_{p}').replace('.', '_')}.{leaf}"] = part.clone()
        else:
            split[f"lora_unet_{layer.replace('.', '_')}.{leaf}"] = tensor
    return split


class Unmatched(logging.Handler):
    """Counts ComfyUI's "lora key not loaded" warnings."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += "lora key not loaded" in record.getMessage()


weights = random_weights(CFG, seed=1)
path = work / "z_image_slice.safetensors"
save_file(weights, path)
lora = kohya_lora(weights)
cpu = torch.device("cpu")


def load_native(path: Path):
    """ComfyUI's own loader (UNETLoader's call), its q/k norms' eps aligned with the official model's."""
    native, aligned = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32}), 0
    for block in native.model.diffusion_model.modules():
        for norm in (getattr(block, "q_norm", None), getattr(block, "k_norm", None)):
            if hasattr(norm, "eps"):
                norm.eps, aligned = CFG.norm_eps, aligned + 1
    return native, aligned


native, aligned = load_native(path)
ours = load_model(str(path), torch.float32, cpu, cpu)

generator = torch.Generator().manual_seed(5)
cond = torch.randn(1, 20, CFG.cap_feat_dim, generator=generator)
positive = [[cond, {"attention_mask": torch.ones(1, cond.shape[1])}]]
negative = [[torch.zeros_like(cond), {}]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ksampler(patcher, sampler_name: str) -> torch.Tensor:
    latent = {"samples": torch.zeros(LATENT)}
    (out,) = nodes.KSampler().sample(patcher, SEED, STEPS, 1.0, sampler_name, "simple", positive, negative, latent)
    return out["samples"].float()


def predict(patcher) -> torch.Tensor:
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, num_tokens=cond.shape[1]).float()


def with_lora(patcher):
    handler = Unmatched()
    logging.getLogger().addHandler(handler)
    try:
        return comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0], handler.count
    finally:
        logging.getLogger().removeHandler(handler)


native_keys, file_keys = set(native.model.diffusion_model.state_dict()), set(weights)
result = {
    "host": importlib.import_module("comfyui_version").__version__,
    "native_class": type(native.model.diffusion_model).__name__,
    "native_dtype": str(native.model.get_dtype()),
    "keys_only_in_file": len(file_keys - native_keys),
    "keys_only_in_native": len(native_keys - file_keys),
    "eps_aligned": aligned,
    "forward": rel(predict(ours), predict(native)),
}
plain_native, plain_ours = ksampler(native, "euler"), ksampler(ours, "euler")
result |= {"euler": rel(plain_ours, plain_native), "euler_scale": float(plain_native.abs().max())}
(native_lora, native_unmatched), (ours_lora, ours_unmatched) = with_lora(native), with_lora(ours)
lora_native, lora_ours = ksampler(native_lora, "euler"), ksampler(ours_lora, "euler")
result |= {
    "lora_keys": sum(k.endswith(".alpha") for k in lora),
    "lora_unmatched_native": native_unmatched,
    "lora_unmatched_ours": ours_unmatched,
    "lora_change": rel(lora_native, plain_native),
    "lora": rel(lora_ours, lora_native),
    "lora_delta": rel(lora_ours - plain_ours, lora_native - plain_native),
}
save_file(split_kohya(lora), work / "split_lora.safetensors")
by_our_loader = ksampler(apply_lora(native, str(work / "split_lora.safetensors"), 1.0), "euler")
result["our_loader_split_on_native"] = rel(by_our_loader, lora_native)
del native, ours, native_lora, ours_lora  # four fp32 copies of the slice: the quantized ones need the room
gc.collect()
first_layer = lambda name: is_block_linear(name) and name.startswith("layers.0.")  # every kind of Linear it has
QUANTIZED = {"int8_tensorwise": "int8_tensorwise + convrot 256", "mxfp8": "mxfp8", "nvfp4": "nvfp4"}
for fmt, label in QUANTIZED.items():
    if fmt not in comfy.quant_ops.QUANT_ALGOS:
        continue
    quantized = ck_quantized_file(weights, label, work / f"z_image_slice_{fmt}.safetensors", first_layer)[0]
    native_q, ours_q = load_native(quantized)[0], load_model(str(quantized), torch.float32, cpu, cpu)
    result[f"quantized {label}"] = rel(predict(ours_q), predict(native_q))
    del native_q, ours_q
print(json.dumps(result))
