"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder: our MODEL from quantized
files (written by the reference quantizers: comfy-kitchen for int8 ConvRot, MXFP8 and NVFP4, gguf-py for GGUF)
holds its block weights compact inside the host, predicts what the same model on the reference-dequantized
weights predicts, takes a LoRA as that model does (applied per call to the dequantized weight, never in place),
and loads partially to the same result.

Arguments: the pack's folder, the test models' folder (transformer.safetensors, lora.safetensors), a work folder.
Prints one JSON line: format -> figures."""

import json
import sys
from pathlib import Path

from in_host import inputs, setup

pack, models, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
setup(pack)

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch
from helpers import ck_quantized_file, is_block_linear, write_file, write_gguf
from safetensors.torch import load_file
from zimage_pack.nodes.model import HostLinear, load_model

cpu = torch.device("cpu")
sd = {k: v.float() for k, v in load_file(models / "transformer.safetensors").items()}
lora = comfy.utils.load_torch_file(str(models / "lora.safetensors"))
FORMATS = {
    "int8_tensorwise + convrot 256": lambda path: ck_quantized_file(sd, "int8_tensorwise + convrot 256", path),
    "mxfp8": lambda path: ck_quantized_file(sd, "mxfp8", path),
    "nvfp4": lambda path: ck_quantized_file(sd, "nvfp4", path),
    "GGUF Q8_0": lambda path: write_gguf(path, sd, lambda n: "Q8_0" if is_block_linear(n) else "F16", "lumina2"),
    "GGUF Q4_K": lambda path: write_gguf(path, sd, lambda n: "Q4_K" if is_block_linear(n) else "F16", "lumina2"),
}


def predict(patcher, budget: int | None = None) -> torch.Tensor:
    """The prediction after a full load, or after a partial one of `budget` bytes (the rest cast per call)."""
    cfg = patcher.model.diffusion_model.cfg
    x, cond = inputs(cfg)
    mm.unload_all_models()
    if budget is None:
        mm.load_models_gpu([patcher], force_full_load=True)
    else:
        patcher.load(cpu, lowvram_model_memory=budget)
    with torch.no_grad():
        out = patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond).float()
    mm.unload_all_models()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


result = {}
for label, write in FORMATS.items():
    suffix = ".gguf" if label.startswith("GGUF") else ".safetensors"
    path, dequantized = write(work / f"quantized{suffix}")
    reference_file = write_file(work / "dequantized.safetensors", dequantized)
    ours = load_model(str(path), torch.float32, cpu, cpu)
    reference = load_model(str(reference_file), torch.float32, cpu, cpu)
    blocks = [m for n, m in ours.model.diffusion_model.named_modules() if isinstance(m, HostLinear) and "layers." in n]
    plain, plain_reference = predict(ours), predict(reference)
    ours_lora = comfy.sd.load_lora_for_models(ours, None, lora, 1.0, 0)[0]
    reference_lora = comfy.sd.load_lora_for_models(reference, None, lora, 1.0, 0)[0]
    with_lora, with_lora_reference = predict(ours_lora), predict(reference_lora)
    stored = {m.weight.dtype for m in blocks if m.is_compact}
    partial = predict(ours_lora, budget=ours_lora.model_size() // 3)
    again = predict(ours)  # the LoRA leaves with its patcher: the plain model predicts as before
    result[label] = {
        "compact_layers": sum(m.is_compact for m in blocks),
        "block_layers": len(blocks),
        "held_bytes": ours.model_size(),
        "dense_bytes": reference.model_size(),
        "forward": rel(plain, plain_reference),
        "lora": rel(with_lora, with_lora_reference),
        "lora_change": rel(with_lora_reference, plain_reference),
        "stored_dtypes_after_lora": sorted(map(str, stored)),
        "partial_lora": rel(partial, with_lora),
        "after_unpatch": rel(again, plain),
    }
    del ours, reference, ours_lora, reference_lora
print(json.dumps(result))
