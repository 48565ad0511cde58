"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder: our MODEL's prediction, or
our text encoder's features, after a partial load (a third of its size resident, the rest cast per call) against
a full load.

Arguments: the pack's folder, `transformer` or `text_encoder`, the model file, optionally a LoRA file (transformer)
and who applies it: `native` (the host's LoraLoaderModelOnly call) or `ours` (the Z-Image LoRA Loader's).
Prints one JSON line."""

import json
import sys
from pathlib import Path

from in_host import inputs, setup

pack, kind, weights = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lora = sys.argv[4] if len(sys.argv) > 4 else None
by = sys.argv[5] if len(sys.argv) > 5 else "native"
setup(pack)

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import torch
from zimage_pack.nodes.lora import apply_lora
from zimage_pack.nodes.model import HOST_OPS, load_model
from zimage_pack.zimage_core.loaders import load_text_encoder

cpu = torch.device("cpu")


def lowvram_modules(model) -> int:
    return sum(hasattr(m, "prev_comfy_cast_weights") for m in model.modules())


if kind == "text_encoder":  # the host's layers, its norms in fp32: as transformers' own, streamed or not
    prompts = ["a lighthouse in a storm", "一只猫"]
    reference = load_text_encoder(weights, cpu, torch.float32).encode(prompts).features
    encoder = load_text_encoder(weights, cpu, torch.float32, ops=HOST_OPS)
    encoder.load_device = cpu
    patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=cpu, offload_device=cpu)
    mm.load_models_gpu([patcher], force_full_load=True)
    full = encoder.encode(prompts).features
    size, loads = patcher.model_size(), []
    for budget in (size // 3, size * 3 // 2):  # all streamed; the embedding (most of it) streamed, the rest kept
        mm.unload_all_models()
        patcher.load(cpu, lowvram_model_memory=budget)
        partial = encoder.encode(prompts).features
        loads.append({"resident": patcher.model.model_loaded_weight_memory, "lowvram_modules": lowvram_modules(encoder),
                      "max_abs_diff": float((partial - full).abs().max())})  # fmt: skip
    print(json.dumps({"model_bytes": size, "loads": loads, "scale": float(full.abs().max()),
                      "host_vs_own": float((full - reference).abs().max()),
                      "embedding": str(encoder.model.embed_tokens.weight.dtype)}))  # fmt: skip
    sys.exit()
base = load_model(weights, torch.float32, cpu, cpu)
cfg = base.model.diffusion_model.cfg
x, cond = inputs(cfg)
sigma = torch.tensor([0.7])


def predict(patcher):
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond).float()


mm.load_models_gpu([base], force_full_load=True)
plain = predict(base)
if lora and by == "ours":
    patcher = apply_lora(base, lora, 1.0)
elif lora:
    patcher = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(lora), 1.0, 0)[0]
else:
    patcher = base
mm.unload_all_models()
mm.load_models_gpu([patcher], force_full_load=True)
full = predict(patcher)
mm.unload_all_models()
size = patcher.model_size()
patcher.load(cpu, lowvram_model_memory=size // 3)
partial = predict(patcher)
print(
    json.dumps(
        {
            "model_bytes": size,
            "partial_bytes": patcher.model.model_loaded_weight_memory,
            "lowvram_modules": lowvram_modules(patcher.model.diffusion_model),
            "max_abs_diff": float((partial - full).abs().max()),
            "scale": float(full.abs().max()),
            "lora_changed": float((full - plain).abs().max()),
        }
    )
)
