"""Run by test_server_native.py in ComfyUI 0.33.0's own python, from the host's folder. With dynamic VRAM (0.33.0's
default on NVIDIA GPUs, forced on here on the CPU) the host's Linear and Embedding are built empty for the host's
own loader to fill; ours, built from them, must still load every component and predict as they do without it.
Also which layers cast their weight per call (none where the weights are held in the dtype they compute in, the
Linears where they are held in fp8), and the host's Linear taking the low-precision GEMMs (`zimage_core.gemm`) as
our own does. Arguments: the pack's folder, the models folder. Prints one JSON line."""

import json
import sys
from pathlib import Path

from in_host import inputs, setup

pack, models = Path(sys.argv[1]), Path(sys.argv[2])
setup(pack)

import comfy.memory_management
import torch
from zimage_pack.nodes.model import HOST_OPS, HostCompact, cast_per_call, host_gemms, load_model
from zimage_pack.zimage_core import gemm
from zimage_pack.zimage_core.attention import sdpa, use_attention
from zimage_pack.zimage_core.controlnet import load_controlnet
from zimage_pack.zimage_core.loaders import load_text_encoder, load_transformer
from zimage_pack.zimage_core.transformer import ZImageTransformer

cpu = torch.device("cpu")
torch.set_grad_enabled(False)


def predict(held: torch.dtype) -> tuple[torch.Tensor, int, int]:
    model = load_model(models / "transformer.safetensors", held, cpu, cpu).model
    x, cond = inputs(model.diffusion_model.cfg)
    out = model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond).float()
    linears = [m for m in model.diffusion_model.modules() if isinstance(m, HostCompact)]
    return out, len(linears), sum(bool(m.comfy_cast_weights) for m in linears)


def encode() -> torch.Tensor:
    encoder = load_text_encoder(models / "text_encoder.safetensors", cpu, torch.float32, ops=HOST_OPS)
    return cast_per_call(encoder, torch.float32).encode(["a lighthouse in a storm"]).features


def control() -> int:
    net = cast_per_call(load_controlnet(models / "controlnet.safetensors", cpu, torch.float32, ops=HOST_OPS),
                        torch.float32)  # fmt: skip
    return sum(p.numel() for p in net.parameters())


def lowp() -> tuple[float, int]:
    """The fp8-held model through the host's Linear and through ours, both multiplying by fp8 GEMMs."""
    fp8, path = torch.float8_e4m3fn, models / "transformer.safetensors"
    host = load_model(path, fp8, cpu, cpu).model.diffusion_model
    ours = load_transformer(path, cpu, torch.float32, fp8)
    lowp = gemm.kinds("lowp", cpu, torch.float32)
    taking = gemm.use_gemms(host, lowp)
    assert taking == gemm.use_gemms(ours, lowp)
    x, cond = inputs(ours.cfg)
    t = torch.tensor([0.3])
    use_attention(host, sdpa)  # fp8 activations turn an attention kernel's last-bit differences into steps
    a, b = ZImageTransformer.forward(host, x, t, cond), ours(x, t, cond)
    return float((a - b).abs().max() / b.abs().max()), taking


result = {}
for dynamic in (False, True):
    comfy.memory_management.aimdo_enabled = dynamic
    plain, layers, cast = predict(torch.float32)
    fp8, _, fp8_cast = predict(torch.float8_e4m3fn)
    result[str(dynamic)] = {"plain": plain, "fp8": fp8, "features": encode(), "control_parameters": control(),
                            "layers": layers, "cast": cast, "fp8_cast": fp8_cast}  # fmt: skip
off, on = result["False"], result["True"]
print(json.dumps({
    "layers": on["layers"], "cast": on["cast"], "fp8_cast": on["fp8_cast"],
    "control_parameters": [off["control_parameters"], on["control_parameters"]],
    **{k: float((on[k] - off[k]).abs().max() / off[k].abs().max()) for k in ("plain", "fp8", "features")},
    "fp8_vs_plain": float((on["fp8"] - on["plain"]).abs().max() / on["plain"].abs().max()),
    "lowp_host_vs_ours": lowp(), "host_gemms_on_cpu": sorted(host_gemms(cpu, torch.float32)),
}))  # fmt: skip
