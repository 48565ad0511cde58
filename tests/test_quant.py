"""ComfyUI's quantized formats (int8 tensorwise with and without ConvRot, mxfp8, nvfp4, fp8), in files written the
way ComfyUI's tooling writes them: weights quantized by comfy-kitchen 0.2.31 (the host's pinned reference), stored
as ComfyUI 0.33.0's `_quantized_weight_state_dict` stores them (`weight`, `weight_scale`, `weight_scale_2`,
`comfy_quant`). Our dequantized weights must equal comfy-kitchen's bit for bit, and models loaded from the files
must compute like the same model holding comfy-kitchen's dequantized weights."""

import dataclasses
import json

import pytest
import torch
from helpers import (
    QWEN3_SMALL,
    SMALL,
    ck_formats,
    ck_layer_specs,
    ck_quantize,
    ck_quantized_file,
    fits_convrot,
    make_inputs,
    qwen3_mixed_format,
    reference_qwen3,
    to_comfy,
    write_file,
)

from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import load_text_encoder, load_transformer
from zimage_core.quant import Format, dequantize

SHAPES = [(768, 256), (682, 512), (256, 682)]  # 682: padded to 16 (nvfp4) and 32 (mxfp8)


@pytest.mark.parametrize(
    ("label", "shape"), [(f, s) for f in ck_formats() for s in SHAPES if fits_convrot(f, torch.empty(s, device="meta"))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_comfy_kitchens_bit_for_bit(label, shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] + shape[1])) * 0.02
    layout, options, conf = ck_formats()[label]
    qdata, params = layout.quantize(w, **options)
    reference = layout.dequantize(qdata, dataclasses.replace(params, orig_dtype=dtype))[: shape[0], : shape[1]]
    fmt = Format.parse(conf, "test")
    tensors = layout.state_dict_tensors(qdata, params)
    ours = dequantize(
        tensors[""], fmt, fmt.prepare_scale(tensors["_scale"], tuple(qdata.shape)), tensors.get("_scale_2"),
        shape, dtype,
    )  # fmt: skip
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("label", ck_formats())
def test_sparse_layer_specs_have_comfy_kitchens_padded_blocked_shapes(label):
    for shape in [s for s in SHAPES if fits_convrot(label, torch.empty(s, device="meta"))]:
        parts, _ = ck_quantize(torch.ones(shape), label)
        specs = ck_layer_specs(shape, label)
        assert specs.keys() == parts.keys()
        assert all(specs[k] == (tuple(v.shape), v.dtype) for k, v in parts.items() if k != "comfy_quant"), specs


@pytest.fixture(scope="module")
def small_sd(small_ref):
    return to_comfy(small_ref.state_dict())


@pytest.mark.parametrize("label", ck_formats())
def test_transformer_holds_the_compact_weights_and_computes_like_the_dequantized_reference(small_sd, tmp_path, label):
    path, dequantized = ck_quantized_file(small_sd, label, tmp_path / "q.safetensors")
    ours = load_transformer(path, dtype=torch.float32)
    reference = load_transformer(write_file(tmp_path / "deq.safetensors", dequantized), dtype=torch.float32)
    held = ours.layers[0].attention.qkv
    assert held.weight.dtype == {"mxfp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}.get(label, torch.int8)
    assert held.quant.label == label
    assert label in ours.info.quantization and "not quantized" in ours.info.quantization
    assert ours.info.held_bytes < 0.8 * reference.info.held_bytes
    latents, t, captions, _ = make_inputs(SMALL, (16, 16), [7, 12], seed=3)
    with torch.no_grad():
        got, want = ours(latents, t, captions, [7, 12]), reference(latents, t, captions, [7, 12])
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_quantization_metadata_table_and_a_mix_of_formats(small_sd, tmp_path):
    """One file, several formats (as ComfyUI's mixed files), declared by the header table alone."""
    mix = {"qkv": "nvfp4", "out": "mxfp8", "w1": "int8_tensorwise", "w2": "int8_tensorwise", "w3": "nvfp4"}
    path, dequantized = ck_quantized_file(
        small_sd, lambda n: mix.get(n.rsplit(".", 2)[-2] if "." in n else ""), tmp_path / "mix.safetensors"
    )
    from zimage_core.checkpoint import open_checkpoint

    with open_checkpoint(path) as ckpt:
        tensors = {n: ckpt.read(n).clone() for n in ckpt.names if not n.endswith(".comfy_quant")}
        layers = {n.removesuffix(".comfy_quant"): json.loads(bytes(ckpt.read(n).tolist()))
                  for n in ckpt.names if n.endswith(".comfy_quant")}  # fmt: skip
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    ours = load_transformer(write_file(tmp_path / "table.safetensors", tensors, meta), dtype=torch.float32)
    reference = load_transformer(write_file(tmp_path / "deq.safetensors", dequantized), dtype=torch.float32)
    assert {ours.layers[0].attention.qkv.quant.name, ours.layers[0].feed_forward.w1.quant.name} == {
        "nvfp4",
        "int8_tensorwise",
    }
    latents, t, captions, _ = make_inputs(SMALL, (16, 16), [9], seed=4)
    with torch.no_grad():
        got, want = ours(latents, t, captions, [9]), reference(latents, t, captions, [9])
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize(
    "mix",
    [
        "fp8_mixed",  # qwen_3_4b_fp8_mixed: fp8 Linears; the first layer and the down projections kept in full
        "fp4_mixed",  # qwen_3_4b_fp4_mixed: nvfp4 MLPs, fp8 attention, the first layer kept in full precision
    ],
)
def test_mixed_precision_text_encoders_encode_like_the_dequantized_reference(tmp_path, mix):
    ref = reference_qwen3(QWEN3_SMALL, seed=1)
    sd = {"model." + k: v for k, v in ref.state_dict().items()}
    path = tmp_path / f"qwen_3_4b_{mix}.safetensors"
    path, dequantized = ck_quantized_file(sd, lambda n: qwen3_mixed_format(n, mix), path, select=lambda n: True)
    ours = load_text_encoder(path, dtype=torch.float32)
    reference = load_text_encoder(write_file(tmp_path / "deq.safetensors", dequantized), dtype=torch.float32)
    layer = ours.model.layers[QWEN3_SMALL["num_hidden_layers"] - 2]
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.up_proj.weight.dtype == (torch.uint8 if mix == "fp4_mixed" else torch.float8_e4m3fn)
    assert layer.mlp.down_proj.weight.dtype == (torch.uint8 if mix == "fp4_mixed" else torch.float32)
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    got, want = ours.encode("a red fox in the snow").features, reference.encode("a red fox in the snow").features
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_formats_we_do_not_load_and_incomplete_layers_are_named(small_sd, tmp_path):
    name = "layers.0.attention.qkv"
    for conf, fragments in (
        ({"format": "convrot_w4a4"}, [name, "'convrot_w4a4'", "no Z-Image file we know", "nvfp4"]),
        ({"format": "float4_tricks"}, [name, "'float4_tricks'", "int8_tensorwise"]),
    ):
        tensors = dict(small_sd)
        tensors[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        path = write_file(tmp_path / "q.safetensors", tensors)
        with pytest.raises(CheckpointError) as e:
            load_transformer(path)
        assert all(f in str(e.value) for f in [str(path), *fragments]), str(e.value)
    parts, _ = ck_quantize(small_sd[f"{name}.weight"], "nvfp4")
    tensors = {**small_sd, **{f"{name}.{k}": v for k, v in parts.items() if k != "weight_scale_2"}}
    with pytest.raises(CheckpointError, match=rf"{name} \(nvfp4\) lacks {name}.weight_scale_2"):
        load_transformer(write_file(tmp_path / "incomplete.safetensors", tensors))
    tensors = {**small_sd, **{f"{name}.{k}": v for k, v in parts.items()}}
    tensors[f"{name}.weight_scale"] = parts["weight_scale"][:64]
    with pytest.raises(CheckpointError, match=r"weight_scale .* does not fit"):
        load_transformer(write_file(tmp_path / "scale.safetensors", tensors))
