"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder: each LoRA file through the
Z-Image LoRA Loader's path (our names, the host's adapters, ModelPatcher) against the same file merged by
`zimage_core.lora` into our own transformer, both predicting in fp32 (on the host's native model: native_parity.py).

Arguments: the pack's folder, the transformer file, the folder of LoRA files. Prints one JSON line.
"""

import json
import sys
from pathlib import Path

from in_host import inputs, setup

pack, weights, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
setup(pack)

import comfy.model_management as mm
import torch
from zimage_pack.nodes.lora import apply_lora
from zimage_pack.nodes.model import Direct, load_model
from zimage_pack.zimage_core.loaders import load_transformer
from zimage_pack.zimage_core.lora import apply_loras, linear_shapes, read_lora

cpu = torch.device("cpu")
base = load_model(weights, torch.float32, cpu, cpu)
cfg = base.model.diffusion_model.cfg
x, cond = inputs(cfg)
t = torch.tensor([0.3])


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def host_predict(patcher):
    mm.unload_all_models()
    mm.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        return Direct(patcher.model.diffusion_model)(x, t, cond, [20]).float()


plain = host_predict(base)
results = {}
for path in sorted(folder.glob("*.safetensors")):
    ours = load_transformer(weights, cpu, torch.float32)
    apply_loras(ours, [(read_lora(path, linear_shapes(ours)), 0.7)])
    with torch.no_grad():
        expected = ours(x, t, cond, [20]).float()
    got = host_predict(apply_lora(base, str(path), 0.7))
    results[path.stem] = {"error": rel(got, expected), "change": rel(expected, plain)}
print(json.dumps({"formats": results}))
