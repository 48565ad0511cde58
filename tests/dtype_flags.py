"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder: with ComfyUI's dtype flags
set, our loaders' `default` holds the weights in the dtypes the host picks for its own encoders and VAEs
(`mm.text_encoder_dtype`, `mm.vae_dtype`). Arguments: the pack's folder, the models folder, then the flags set, as
`args` names (`fp16_text_enc`). Prints one JSON line: per component our held dtypes and the host's pick."""

import json
import sys
from pathlib import Path

from in_host import setup

pack, models, flags = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
setup(pack, tuple(flags))

import comfy.model_management as mm
import folder_paths
import torch
from zimage_pack.nodes.loaders import load

for folder in ("text_encoders", "vae"):
    folder_paths.add_model_folder_path(folder, models)
cpu = torch.device("cpu")
host = {"text_encoder": mm.text_encoder_dtype(cpu), "vae": mm.vae_dtype(cpu, [torch.bfloat16, torch.float32])}
result = {}
for component, folder, name in (("text_encoder", "text_encoders", "text_encoder.safetensors"),
                                ("vae", "vae", "vae.safetensors")):  # fmt: skip
    patcher = load(component, folder, name, "default", "cpu")  # the host's picks above are the CPU's too
    result[component] = {"ours": sorted({str(p.dtype) for p in patcher.model.parameters()}),
                         "host": str(host[component])}  # fmt: skip
print(json.dumps(result))
