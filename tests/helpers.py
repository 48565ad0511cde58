"""Reference models with shared random weights, and checkpoint files in every released layout.

The references are diffusers' classes (a test-only dependency); tensor names and shapes of generated files come
from them, never from our own code. Full-size files are sparse: a real header, and a data region that is a hole.
"""

from __future__ import annotations

import json
import math
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

if TYPE_CHECKING:  # imported where used: the floors run (tests/floors.txt) has no diffusers
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

# The released transformer (zimage-spec.md 1.2; HF Tongyi-MAI/Z-Image-Turbo transformer/config.json).
REAL = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}  # fmt: skip
# diffusers' own tiny test config (tests/models/transformers/test_models_transformer_z_image.py), n_kv_heads=2
# included: diffusers ignores it, and so do we.
TINY = dict(REAL, dim=16, n_layers=1, n_refiner_layers=1, n_heads=1, n_kv_heads=2, cap_feat_dim=16,
            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])  # fmt: skip
# Small but with the real head size and RoPE (loads from a single file without a config).
SMALL = dict(REAL, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64)
# A slice of the real model: real widths, few layers.
SLICE = dict(REAL, n_layers=2, n_refiner_layers=1)

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0", torch.uint8: "U8", torch.int8: "I8",
}  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter seeded random values of a sensible scale (norms around 1, pad tokens too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pad_token" in name:
                p.normal_(0, 1, generator=g)
            elif "norm" in name or name.startswith(("cap_embedder.0", "siglip_embedder.0")):
                p.normal_(1, 0.1, generator=g)
            elif p.dim() >= 2:  # Linear and conv weights: unit gain for unit inputs
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(0, 0.05, generator=g)
    return model


def reference_transformer(config: dict, seed: int = 0) -> ZImageTransformer2DModel:
    """diffusers' ZImageTransformer2DModel with seeded random weights, in fp32."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    return randomize_(model.to_empty(device="cpu"), seed).eval().requires_grad_(False)


def reference_controlnet(places: list[int], in_dim: int, refiner: str | None, seed: int, dim: int = 32,
                         n_heads: int = 2, n_refiner_layers: int = 2):  # fmt: skip
    """diffusers' ZImageControlNetModel with seeded random weights: `places` as its control_layers_places, the
    refiner as its add_control_noise_refiner (None, "control_layers" or "control_noise_refiner")."""
    from diffusers.models.controlnets.controlnet_z_image import ZImageControlNetModel

    with torch.device("meta"):
        model = ZImageControlNetModel(control_layers_places=places, control_refiner_layers_places=list(
            range(n_refiner_layers)), control_in_dim=in_dim, add_control_noise_refiner=refiner, dim=dim,
            n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads)  # fmt: skip
    return randomize_(model.to_empty(device="cpu"), seed).eval().requires_grad_(False)


def reference_forward(model, latents: list[torch.Tensor], t, captions: list[torch.Tensor]) -> list[torch.Tensor]:
    """diffusers' list API: latents (C, H, W) each, returns (C, H, W) each."""
    with torch.no_grad():
        out = model([x[:, None] for x in latents], t, captions, return_dict=False)[0]
    return [o[:, 0] for o in out]


def to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI single-file names (zimage-spec.md 3.2): fused qkv, `x_embedder`, `final_layer`."""
    out = {}
    for name, t in sd.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            k, v = (sd[name.replace(".to_q.", s)] for s in (".to_k.", ".to_v."))
            out[name.replace(".to_q.", ".qkv.")] = torch.cat([t, k, v])
            continue
        for old, new in (
            ("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
            (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."),
        ):  # fmt: skip
            name = name.replace(old, new)
        out[name] = t
    return out


def is_block_linear(name: str) -> bool:
    """A Linear weight inside a block (the tensors fp8 files quantize): Z-Image's or Qwen3's."""
    return (
        name.endswith(".weight")
        and any(f".{n}." in name for n in ("attention", "feed_forward", "self_attn", "mlp"))
        and ("norm" not in name)
    )


def fp8_forms(sd: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[dict, dict]], dict[str, torch.Tensor]]:
    """The three fp8 forms users have, from one state dict, and the dequantized values a reference should load.

    plain: every floating tensor cast to fp8 (as a ComfyUI fp8 save does); scaled: block Linear weights in fp8
    with `scale_weight` and a `scaled_fp8` marker; comfy_quant: the same with `weight_scale`, `comfy_quant` and
    `_quantization_metadata`. The scaled forms share one quantization, so they share the dequantized values.
    """
    e4m3 = torch.float8_e4m3fn
    plain = {k: v.to(e4m3) for k, v in sd.items()}
    plain_deq = {k: v.float() for k, v in plain.items()}
    scaled, quant, deq, layers = {"scaled_fp8": torch.empty(0, dtype=e4m3)}, {}, {}, {}
    for name, w in sd.items():
        if not is_block_linear(name):
            scaled[name] = quant[name] = deq[name] = w
            continue
        scale = w.abs().amax().float() / 448.0
        q = (w / scale).to(e4m3)
        deq[name] = q.float() * scale
        layer = name.removesuffix(".weight")
        scaled[name] = quant[name] = q
        scaled[layer + ".scale_weight"] = quant[layer + ".weight_scale"] = scale.reshape(())
        scaled[layer + ".scale_input"] = quant[layer + ".input_scale"] = torch.ones(())
        quant[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        layers[layer] = {"format": "float8_e4m3fn"}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return {"plain": (plain, {}), "scaled": (scaled, {}), "comfy_quant": (quant, meta)}, {
        "plain": plain_deq,
        "scaled": deq,
    }


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_diffusers_folder(folder: Path, model: ZImageTransformer2DModel, shard_size: str = "10GB") -> Path:
    """A diffusers model folder written by diffusers itself (small `shard_size` gives shards and an index)."""
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder


def write_pipeline_folder(root: Path, model: ZImageTransformer2DModel, shard_size: str = "10GB") -> Path:
    """A pipeline folder as released on the hub: model_index.json and the transformer/ subfolder."""
    write_diffusers_folder(root / "transformer", model, shard_size)
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"]})
    )
    return root


def write_sparse(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file whose listed tensors are (shape, dtype) holes, or real data when given as tensors."""
    header, offset, data = {}, 0, []
    items = sorted(
        tensors.items(), key=lambda kv: -(kv[1].dtype if isinstance(kv[1], torch.Tensor) else kv[1][1]).itemsize
    )
    for name, spec in items:
        shape, dtype = (tuple(spec.shape), spec.dtype) if isinstance(spec, torch.Tensor) else spec
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        if isinstance(spec, torch.Tensor):
            data.append((offset, spec.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for start, blob in data:
            f.seek(8 + len(raw) + start)
            f.write(blob)
        f.truncate(8 + len(raw) + offset)
    return path


def loaded_peak(info: dict) -> int:
    """Peak RSS beyond what the interpreter held before loading (torch alone is 0.3 GB, 0.7 GB as a CUDA build)."""
    return info["peak_rss_bytes"] - info["rss_before_bytes"]


def full_size_specs(config: dict = REAL, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple]:
    """Every tensor name and shape of the diffusers model for `config`, as (shape, dtype) specs."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    return {n: (tuple(t.shape), dtype) for n, t in model.state_dict().items()}


def comfy_specs(config: dict = REAL, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple]:
    """Every tensor of ComfyUI's single file for `config` (`to_comfy` names), as (shape, dtype) specs."""
    comfy = to_comfy({n: torch.empty(s, device="meta") for n, (s, _) in full_size_specs(config).items()})
    return {n: (tuple(t.shape), dtype) for n, t in comfy.items()}


def sparse_layouts(root: Path, config: dict = REAL) -> dict[str, Path]:
    """Full-size sparse checkpoints in every layout users have; returns layout name -> path to load."""
    specs = full_size_specs(config, torch.float32)
    paths = {}
    # diffusers pipeline folder as on the hub: fp32 transformer in 3 shards with an index.
    folder = write_sharded(
        root / "Z-Image-Turbo" / "transformer", specs, 3, "diffusion_pytorch_model",
        {"_class_name": "ZImageTransformer2DModel", **config},
    )  # fmt: skip
    (root / "Z-Image-Turbo" / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    paths["diffusers folder (fp32 shards)"] = folder
    paths["diffusers pipeline folder"] = root / "Z-Image-Turbo"

    bf16 = comfy_specs(config)
    paths["ComfyUI single file bf16"] = write_sparse(root / "z_image_turbo_bf16.safetensors", bf16)
    prefixed = {"model.diffusion_model." + n: s for n, s in bf16.items()}
    paths["ComfyUI single file, model.diffusion_model. prefix"] = write_sparse(
        root / "z_image_turbo_prefixed.safetensors", prefixed
    )
    e4m3 = torch.float8_e4m3fn
    fp8 = {n: (s, e4m3 if is_block_linear(n) else d) for n, (s, d) in bf16.items()}
    paths["fp8 plain"] = write_sparse(root / "z_image_turbo_fp8_e4m3fn.safetensors", fp8)
    scale = torch.tensor(0.01)
    scaled = dict(fp8, scaled_fp8=torch.empty(0, dtype=e4m3))
    scaled.update({n.removesuffix(".weight") + ".scale_weight": scale for n in fp8 if is_block_linear(n)})
    paths["fp8 scaled (scaled_fp8)"] = write_sparse(root / "z_image_turbo_fp8_scaled.safetensors", scaled)
    paths["fp8 ComfyUI quantized (comfy_quant)"] = write_sparse(
        root / "z_image_turbo_fp8_quant.safetensors", *comfy_quant_specs(bf16)
    )
    return paths


def block_linears_in(label: str):
    """The choice most quantized files make: the blocks' Linear weights in `label`, everything else as it is."""
    return lambda name: label if is_block_linear(name) else None


def comfy_quant_specs(specs: dict, fmt=None) -> tuple[dict, dict]:
    """Sparse specs in ComfyUI's quantized form, and the file metadata that goes with them: each weight given a
    format by `fmt(name)` (fp8 or a `ck_formats` label; default: the block Linears in fp8) becomes that format's
    layer tensors with `comfy_quant`. ConvRot layers whose inputs are not whole groups stay as they are, as
    `ck_quantized_file` leaves them."""
    fmt, quant, layers = fmt or block_linears_in("float8_e4m3fn"), {}, {}
    for n, spec in specs.items():
        label = fmt(n)
        if not label or not fits_convrot(label, torch.empty(spec[0], device="meta")):
            quant[n] = spec
            continue
        layer, parts = n.removesuffix(".weight"), ck_layer_specs(tuple(spec[0]), label)
        quant.update({f"{layer}.{k}": v for k, v in parts.items()})
        layers[layer] = json.loads(bytes(parts["comfy_quant"].tolist()))
    return quant, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def quantized_sparse_layouts(root: Path, config: dict = REAL) -> dict[str, Path]:
    """Full-size sparse transformer files in the quantized formats we load: ComfyUI's int8 (ConvRot), mxfp8 and
    nvfp4 saves, and city96's GGUF Q8_0 and Q4_K; returns layout name -> path."""
    bf16, paths = comfy_specs(config), {}
    for label, stem in (("int8_tensorwise + convrot 256", "int8_convrot"), ("mxfp8", "mxfp8"), ("nvfp4", "nvfp4")):
        paths[f"{label} (comfy_quant)"] = write_sparse(
            root / f"z_image_turbo_{stem}.safetensors", *comfy_quant_specs(bf16, block_linears_in(label))
        )
    for kind in ("Q8_0", "Q4_K"):
        kinds = lambda n, kind=kind: kind if is_block_linear(n) else "F16"
        paths[f"GGUF {kind} (city96)"] = write_sparse_gguf(root / f"z_image_turbo-{kind}.gguf", bf16, kinds, "lumina2")
    return paths


def make_inputs(config: dict, size: tuple[int, int], cap_lens: list[int], seed: int = 0):
    """Latents (B, C, H, W), model times (B,), and captions both padded (B, L, D) and as diffusers' list."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(cap_lens), config["in_channels"], *size, generator=g)
    t = torch.rand(len(cap_lens), generator=g)
    captions = [torch.randn(n, config["cap_feat_dim"], generator=g) for n in cap_lens]
    padded = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True)
    return latents, t, padded, captions


# ---- Qwen3 text encoders ----

# Qwen3-4B as released (HF Qwen/Qwen3-4B and Z-Image's text_encoder/config.json).
QWEN3_REAL = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
}  # fmt: skip
# diffusers' pipeline tests (tests/pipelines/z_image/test_z_image.py): Qwen3Config defaults otherwise (RoPE 1e4).
QWEN3_TINY = {
    "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 512,
}  # fmt: skip
# Small, grouped-query like the real one, with the released RoPE base, epsilon and context: what a single file's
# inferred config gives, so single files and folders must agree.
QWEN3_SMALL = dict(QWEN3_REAL, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32)  # fmt: skip


def reference_qwen3(config: dict, seed: int = 0) -> Qwen3Model:
    """transformers' Qwen3Model with seeded random weights (norm weights around 1), fp32."""
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**config))
    model = model.to_empty(device="cpu")
    model.rotary_emb = type(model.rotary_emb)(config=model.config)
    return randomize_(model, seed).eval().requires_grad_(False)


def qwen3_specs(config: dict = QWEN3_REAL, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple]:
    """Every tensor of the released single file (`model.`-prefixed Qwen3 names, no lm_head) as (shape, dtype)."""
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**config))
    return {"model." + n: (tuple(t.shape), dtype) for n, t in model.state_dict().items()}


def write_sharded(folder: Path, specs: dict, n_shards: int, stem: str, config: dict) -> Path:
    """A hub-style folder: `{stem}-0000i-of-0000n.safetensors` shards, index, config.json (specs as `write_sparse`)."""
    names = list(specs)
    weight_map = {}
    for i in range(n_shards):
        file = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        write_sparse(folder / file, {n: specs[n] for n in names[i::n_shards]})
        weight_map.update(dict.fromkeys(names[i::n_shards], file))
    total = sum(
        s.nbytes if isinstance(s, torch.Tensor) else torch.Size(s[0]).numel() * s[1].itemsize for s in specs.values()
    )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def qwen3_sparse_layouts(root: Path, config: dict = QWEN3_REAL) -> dict[str, Path]:
    """Full-size sparse Qwen3-4B files: Z-Image's text_encoder/ folder and ComfyUI's single files."""
    specs = qwen3_specs(config)
    hub_config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **config}
    paths = {
        "text encoder: diffusers folder (bf16 shards)": write_sharded(
            root / "Z-Image-Turbo" / "text_encoder", specs, 3, "model", hub_config
        ),
        "text encoder: ComfyUI qwen_3_4b.safetensors": write_sparse(root / "qwen_3_4b.safetensors", specs),
    }
    paths["text encoder: ComfyUI fp8 (comfy_quant)"] = write_sparse(
        root / "qwen_3_4b_fp8_quant.safetensors", *comfy_quant_specs(specs)
    )
    return paths


def qwen3_mixed_format(name: str, mix: str) -> str | None:
    """The format Comfy-Org's `qwen_3_4b_{mix}` files give a weight, None where they keep it in high precision:
    the first layer always, and in fp8_mixed the down projections; fp4_mixed has nvfp4 MLPs, fp8 attention."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    if not is_block_linear(name) or layer == 0 or (mix == "fp8_mixed" and "down_proj" in name):
        return None
    return "nvfp4" if mix == "fp4_mixed" and ".mlp." in name else "float8_e4m3fn"


def qwen3_quantized_sparse_layouts(root: Path, config: dict = QWEN3_REAL) -> dict[str, Path]:
    """Full-size sparse Qwen3-4B files in the quantized forms shipped: Comfy-Org's fp8 and fp4 "mixed" files and
    a llama.cpp Q8_0 GGUF; returns layout name -> path."""
    specs, paths = qwen3_specs(config), {}
    for mix in ("fp8_mixed", "fp4_mixed"):
        paths[f"text encoder: ComfyUI qwen_3_4b_{mix}"] = write_sparse(
            root / f"qwen_3_4b_{mix}.safetensors",
            *comfy_quant_specs(specs, lambda n, mix=mix: qwen3_mixed_format(n, mix)),
        )
    names = llama_cpp_names(specs, config["num_hidden_layers"])
    paths["text encoder: GGUF Q8_0 (llama.cpp names)"] = write_sparse_gguf(
        root / "Qwen3-4B-Q8_0.gguf", names, lambda n: "Q8_0", "qwen3"
    )
    return paths


# ---- Flux VAE ----

# The released VAE (Z-Image-Turbo vae/config.json = FLUX.1's).
VAE_REAL = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}  # fmt: skip
# The released layout (4 levels of 2 blocks, mid attention, factor 8) at a quarter of the widths or less: the servers'
# `ae.safetensors`. A decode costs 25-30x less on CPU than at the real widths (0.03 s against 0.5-1.9 s at 64-128 px),
# and the server tests run hundreds; the real widths are kept for ComfyUI's own VAELoader, which builds only those.
VAE_NARROW = dict(VAE_REAL, block_out_channels=[32, 32, 64, 64])
# diffusers' pipeline tests (tests/pipelines/z_image/test_z_image.py): factor 2, and quant convs (the default).
VAE_TINY = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [32, 64], "layers_per_block": 1,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159,
}  # fmt: skip


def reference_vae(config: dict, seed: int = 0) -> AutoencoderKL:
    """diffusers' AutoencoderKL with seeded random weights, fp32."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return randomize_(model.to_empty(device="cpu"), seed).eval().requires_grad_(False)


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VAE names -> Black Forest Labs' `ae.safetensors` names (zimage-spec.md 3.4): decoder levels
    numbered from full resolution up, `mid.attn_1` with 1x1-conv q/k/v/proj_out."""
    levels = 1 + max(int(n.split(".")[2]) for n in sd if n.startswith("decoder.up_blocks."))
    out = {}
    for name, t in sd.items():
        for old, new in (
            (".mid_block.resnets.0.", ".mid.block_1."), (".mid_block.resnets.1.", ".mid.block_2."),
            (".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm."), (".conv_shortcut.", ".nin_shortcut."),
            (".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out."), (".conv_norm_out.", ".norm_out."),
            (".mid_block.attentions.0.to_", ".mid.attn_1."), (".downsamplers.0.", ".downsample."),
            (".upsamplers.0.", ".upsample."), (".resnets.", ".block."), ("encoder.down_blocks.", "encoder.down."),
        ):  # fmt: skip
            name = name.replace(old, new)
        if name.startswith("decoder.up_blocks."):
            i, rest = name.removeprefix("decoder.up_blocks.").split(".", 1)
            name = f"decoder.up.{levels - 1 - int(i)}.{rest}"
        if ".mid.attn_1." in name and name.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]
        out[name] = t
    return out


# ---- GGUF files, written with the `gguf` package (llama.cpp's gguf-py) ----

# Where each K/IQ block keeps its fp16 scales, and a scale that gives weights of about 0.05 at most: gguf-py has no
# quantizer for these types, so their blocks are random codes with sane scales, decoded by gguf-py's dequantizer.
RANDOM_BLOCKS = {
    "Q2_K": ((80, 82), 1e-3), "Q3_K": ((108,), 4e-4), "Q4_K": ((0, 2), 5e-5), "Q5_K": ((0, 2), 2.5e-5),
    "Q6_K": ((208,), 1e-5), "IQ4_NL": ((0,), 4e-4), "IQ4_XS": ((0,), 1e-5),
}  # fmt: skip


def gguf_quantize(w: torch.Tensor, kind: str, seed: int = 0):
    """(the bytes or values gguf-py writes for `w` as GGML `kind`, gguf-py's dequantization of them in fp32)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in RANDOM_BLOCKS:
        data = gguf.quants.quantize(w.float().numpy(), qtype)
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, size=(w.numel() // block, size), dtype=np.uint8)
        offsets, scale = RANDOM_BLOCKS[kind]
        for at in offsets:
            data[:, at : at + 2] = (rng.uniform(0.5, 1.0, (len(data), 1)) * scale).astype(np.float16).view(np.uint8)
        data = data.reshape(*w.shape[:-1], -1)
    values = data if kind in ("F32", "F16") else gguf.quants.dequantize(data, qtype)
    return data, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(w.shape)


def write_gguf(path: Path, sd: dict[str, torch.Tensor], kind_of, arch: str, shape_fix: bool = False):
    """A GGUF file as city96's ComfyUI-GGUF tools make one: 1-D and small tensors in F32, the rest as `kind_of(name)`
    gives (F16 where rows are not whole blocks, or, with `shape_fix`, reshaped to rows of 256 with the original
    shape in `comfy.gguf.orig_shape.*`). Returns the file and the state dict of gguf-py's dequantized values."""
    import gguf

    writer, dequantized = gguf.GGUFWriter(str(path), arch), {}
    for i, (name, w) in enumerate(sd.items()):
        kind, stored = gguf_layout(writer, name, tuple(w.shape), kind_of, shape_fix)
        data, dequantized[name] = gguf_quantize(w.reshape(stored), kind, seed=i)
        dequantized[name] = dequantized[name].reshape(w.shape)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, dequantized


def gguf_layout(writer, name: str, shape: tuple, kind_of, shape_fix: bool) -> tuple[str, tuple]:
    """(GGML type, stored shape) `write_gguf` gives a tensor, its original shape added to `writer` if reshaped."""
    import gguf

    kind = kind_of(name) if len(shape) >= 2 and math.prod(shape) > 1024 else "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if shape[-1] % block and shape_fix and math.prod(shape) % 256 == 0:
        writer.add_array(f"comfy.gguf.orig_shape.{name}", shape)
        return kind, (math.prod(shape) // 256, 256)
    return ("F16" if shape[-1] % block else kind), shape


def write_sparse_gguf(path: Path, specs: dict, kind_of, arch: str, shape_fix: bool = False) -> Path:
    """`write_gguf`'s file for (shape, dtype) specs with the data region a hole: gguf-py writes the header and
    tensor table, and the file is then extended to the size they give, so no full-size tensor is ever built."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for name, (shape, _) in specs.items():
        kind, stored = gguf_layout(writer, name, tuple(shape), kind_of, shape_fix)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        nbytes = math.prod(stored) // block * size
        writer.add_tensor_info(name, stored, np.float32, nbytes, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    align = writer.data_alignment
    size = writer.ggml_pad(writer.fout[0].tell(), align)
    size += sum(writer.ggml_pad(t.nbytes, align) for t in writer.tensors[0].values())
    writer.close()
    os.truncate(path, size)
    return path


def llama_cpp_names(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """A transformers Qwen3 state dict under llama.cpp's GGUF names, from gguf-py's own tensor name map (what
    llama.cpp's convert_hf_to_gguf.py writes)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n_layers)
    return {names.get_name(n, try_suffixes=(".weight", ".bias")): w for n, w in sd.items()}


# ---- ComfyUI's quantized safetensors, written with comfy-kitchen 0.2.31 (the quantizers ComfyUI 0.33.0 pins) ----


def ck_formats() -> dict:
    """format label -> (comfy-kitchen layout, its quantize options, the layer's comfy_quant entry)."""
    from comfy_kitchen.tensor import TensorCoreMXFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout

    return {
        "int8_tensorwise": (TensorWiseINT8Layout, {}, {"format": "int8_tensorwise"}),
        "int8_tensorwise + convrot 256": (
            TensorWiseINT8Layout,
            {"per_channel": True, "convrot": True, "convrot_groupsize": 256},
            {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
        ),
        "mxfp8": (TensorCoreMXFP8Layout, {}, {"format": "mxfp8"}),
        "nvfp4": (TensorCoreNVFP4Layout, {}, {"format": "nvfp4"}),
    }


CK_SUFFIXES = {"": "weight", "_scale": "weight_scale", "_scale_2": "weight_scale_2"}
FP8_CONF = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)


def ck_quantize(w: torch.Tensor, label: str):
    """(the layer's file tensors, the reference's dequantized weight in fp32) for one weight, as ComfyUI 0.33.0's
    `_quantized_weight_state_dict` stores them; fp8 with one scale per tensor, as ComfyUI's fp8 files."""
    if label == "float8_e4m3fn":
        import comfy_kitchen as ck

        scale = (w.abs().amax() / torch.finfo(torch.float8_e4m3fn).max).float()
        weight = ck.quantize_per_tensor_fp8(w.float(), scale)
        tensors = {"weight": weight, "weight_scale": scale, "comfy_quant": FP8_CONF.clone()}
        return tensors, ck.dequantize_per_tensor_fp8(weight, scale, torch.float32)
    layout, options, conf = ck_formats()[label]
    qdata, params = layout.quantize(w.float(), **options)
    tensors = {CK_SUFFIXES[k]: v for k, v in layout.state_dict_tensors(qdata, params).items()}
    tensors["comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    return tensors, layout.dequantize(qdata, params)[: w.shape[0], : w.shape[1]]


def fits_convrot(label: str, w: torch.Tensor) -> bool:
    """ConvRot rotates groups of 256 input features: a quantizer leaves other layers in full precision."""
    return "convrot" not in label or w.shape[1] % 256 == 0


def ck_quantized_file(sd: dict, label, path, select=None):
    """`sd` with the selected weights (default: the blocks' Linears) in `label` (a format, or a function of the
    name giving one or None); returns the file and the state dict of reference-dequantized values."""
    select = select or is_block_linear
    tensors, dequantized = {}, {}
    for name, w in sd.items():
        fmt = label(name) if callable(label) else label
        if select(name) and fmt and fits_convrot(fmt, w):
            layer, (parts, deq) = name.removesuffix(".weight"), ck_quantize(w, fmt)
            tensors.update({f"{layer}.{k}": v for k, v in parts.items()})
            dequantized[name] = deq
        else:
            tensors[name] = dequantized[name] = w
    return write_file(path, tensors), dequantized


@lru_cache
def ck_layer_specs(shape: tuple[int, int], label: str) -> dict:
    """One layer's file tensors in `label` (or fp8 with a scalar scale) as sparse (shape, dtype) specs.

    comfy-kitchen quantizes an (out, 256) and a (256, in) weight: each stored dimension follows one of the weight's
    (padded and tiled on its own), so the two give a full-size layer's padded, blocked layout without quantizing it.
    """
    if label == "float8_e4m3fn":
        return {"weight": (shape, torch.float8_e4m3fn), "weight_scale": torch.tensor(0.01), "comfy_quant": FP8_CONF}
    rows, _ = ck_quantize(torch.ones(shape[0], 256), label)
    cols, _ = ck_quantize(torch.ones(256, shape[1]), label)
    return {k: v if k == "comfy_quant" else ((*v.shape[:1], *cols[k].shape[1:]), v.dtype) for k, v in rows.items()}
