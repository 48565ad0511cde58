"""Run by test_server_native.py in a ComfyUI host's own python, from the host's folder: with ComfyUI's dtype flags
set, our loaders' `default` holds the weights in the dtypes the host picks for its own encoders and VAEs
(`mm.text_encoder_dtype`, `mm.vae_dtype`). Arguments: the pack's folder, the models folder, then the flags set, as
`args` names (`fp16_text_enc`). Prints one JSON line: per component our held dtypes and the host's pick."""

import importlib.util
import json
import sys
from pathlib import Path

pack, models, flags = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.argv = sys.argv[:1]
sys.path.insert(0, ".")

import torch
from comfy.cli_args import args

args.cpu = not torch.cuda.is_available()  # as the servers run with --cpu
for flag in flags:
    setattr(args, flag, True)
import comfy.model_management as mm
import folder_paths

spec = importlib.util.spec_from_file_location(
    "zimage_pack", pack / "__init__.py", submodule_search_locations=[str(pack)]
)
module = importlib.util.module_from_spec(spec)
sys.modules["zimage_pack"] = module
spec.loader.exec_module(module)
from zimage_pack.nodes.loaders import load

for folder in ("text_encoders", "vae"):
    folder_paths.add_model_folder_path(folder, models)
cpu = torch.device("cpu")
host = {"text_encoder": mm.text_encoder_dtype(cpu), "vae": mm.vae_dtype(cpu, [torch.bfloat16, torch.float32])}
result = {}
for component, folder, name in (("text_encoder", "text_encoders", "text_encoder.safetensors"),
                                ("vae", "vae", "vae.safetensors")):  # fmt: skip
    patcher = load(component, folder, name, "default", "default")
    result[component] = {"ours": sorted({str(p.dtype) for p in patcher.model.parameters()}),
                         "host": str(host[component])}  # fmt: skip
print(json.dumps(result))
