"""Every released layout loads to the reference's numbers; every bad input gets an error naming it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from helpers import (
    QWEN3_REAL,
    REAL,
    SMALL,
    fp8_forms,
    full_size_specs,
    loaded_peak,
    make_inputs,
    qwen3_specs,
    reference_forward,
    reference_transformer,
    to_comfy,
    write_diffusers_folder,
    write_file,
    write_pipeline_folder,
    write_sharded,
    write_sparse,
)

from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import load_transformer
from zimage_core.ops import Linear

ROOT = Path(__file__).parents[1]


def reference_output(ref, seed=0):
    latents, t, padded, captions = make_inputs(SMALL, (16, 24), [9, 40], seed)
    return (latents, t, padded), torch.stack(reference_forward(ref, list(latents), t, captions))


def assert_matches(model, ref, tol=1e-5):
    (latents, t, padded), expected = reference_output(ref)
    with torch.no_grad():
        got = model(latents, t, padded, [9, 40])
    assert rel_err(got, expected) <= tol


@pytest.fixture(scope="module")
def sd(small_ref):
    return {k: v.clone() for k, v in small_ref.state_dict().items()}


def test_test_helper_comfy_layout_is_what_diffusers_converts_back(sd):
    """Anchors `to_comfy` to the reference: diffusers' single-file converter undoes it exactly."""
    back = convert_z_image_transformer_checkpoint_to_diffusers(to_comfy(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("shard_size", ["300KB", "10GB"])
def test_diffusers_folder(small_ref, tmp_path, shard_size):
    model = load_transformer(write_diffusers_folder(tmp_path / "t", small_ref, shard_size), dtype=torch.float32)
    assert model.info.layout == "diffusers folder" and model.info.naming == "diffusers"
    assert model.info.variant == "turbo" and model.info.variant_reason.startswith("assumed")
    assert_matches(model, small_ref)


def test_pipeline_folder(small_ref, tmp_path):
    root = write_pipeline_folder(tmp_path / "Z-Image-Turbo", small_ref, "300KB")
    model = load_transformer(root, dtype=torch.float32)
    assert model.info.layout == "diffusers pipeline folder"
    assert model.info.variant == "turbo" and "name" in model.info.variant_reason
    assert_matches(model, small_ref)
    (root / "model_index.json").unlink()  # a folder holding transformer/ is still found
    assert_matches(load_transformer(root, dtype=torch.float32), small_ref)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_comfyui_single_file(small_ref, sd, tmp_path, prefix):
    tensors = {prefix + k: v for k, v in to_comfy(sd).items()}
    model = load_transformer(write_file(tmp_path / "z_image_base_bf16.safetensors", tensors), dtype=torch.float32)
    assert (model.info.layout, model.info.naming, model.info.prefix) == ("single file", "ComfyUI", prefix)
    assert model.info.variant == "base"
    assert_matches(model, small_ref)


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("z_image_bf16.safetensors", "base"),  # Comfy-Org's Base repacks
        ("z_image_int8_convrot.safetensors", "base"),
        ("Z-Image-Q5_K_S.safetensors", "base"),
        ("z_image_turbo_bf16.safetensors", "turbo"),
        ("zimage_turbo_int8_convrot.safetensors", "turbo"),
        ("my_finetune.safetensors", "turbo"),  # nothing says: assumed, and the reason says so
    ],
)
def test_variant_by_released_names_and_its_sampling_defaults(sd, tmp_path, name, variant):
    from zimage_core.loaders import transformer_facts
    from zimage_core.pipeline import variant_settings
    from zimage_core.sampling import VARIANT_SETTINGS

    path = write_file(tmp_path / name, to_comfy(sd))
    assert load_transformer(path, dtype=torch.float32).info.variant == variant
    assert transformer_facts(path).variant == variant
    assert variant_settings(path, None, None) == VARIANT_SETTINGS[variant]
    assert variant_settings(path, 12, None) == (12, VARIANT_SETTINGS[variant][1])  # what is given wins
    assert VARIANT_SETTINGS["base"] == (25, 4.0) and VARIANT_SETTINGS["turbo"] == (8, 1.0)


def test_single_file_config_is_inferred_as_the_folder_config_says(small_folder, sd, tmp_path):
    from_folder = load_transformer(small_folder, dtype=torch.float32).info.config
    from_file = load_transformer(write_file(tmp_path / "m.safetensors", to_comfy(sd)), dtype=torch.float32).info.config
    assert from_file == from_folder


def test_diffusers_named_single_file_and_all_in_one_checkpoint(small_ref, sd, tmp_path):
    assert_matches(load_transformer(write_file(tmp_path / "d.safetensors", sd), dtype=torch.float32), small_ref)
    aio = {"model.diffusion_model." + k: v for k, v in to_comfy(sd).items()}
    aio["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # other components are left alone
    aio["model.diffusion_model.norm_final.weight"] = torch.ones(SMALL["dim"])  # Lumina 2 leftover, unused
    assert_matches(load_transformer(write_file(tmp_path / "aio.safetensors", aio), dtype=torch.float32), small_ref)


@pytest.mark.parametrize("form", ["plain", "scaled", "comfy_quant"])
def test_fp8_forms_are_held_in_fp8_and_compute_like_the_dequantized_reference(sd, tmp_path, form):
    forms, dequantized = fp8_forms(to_comfy(sd))
    tensors, metadata = forms[form]
    model = load_transformer(write_file(tmp_path / f"{form}.safetensors", tensors, metadata), dtype=torch.float32)
    qkv = model.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert (qkv.weight_scale is None) == (form == "plain")
    parts = [part for b in model.layers for part in (b.attention, b.feed_forward)]
    block_linears = [m.weight for part in parts for m in part.modules() if isinstance(m, Linear)]
    assert all(w.dtype == torch.float8_e4m3fn for w in block_linears)
    fp8_numel = sum(w.numel() for w in block_linears)  # held once, at one byte each: no second copy
    scale_bytes = sum(b.nbytes for b in model.buffers())
    assert model.info.held_bytes <= fp8_numel + 4 * (model.info.parameters - fp8_numel) + scale_bytes
    assert model.info.quantization.startswith("fp8")
    ref = reference_transformer(SMALL)
    ref.load_state_dict(
        convert_z_image_transformer_checkpoint_to_diffusers(dict(dequantized[form if form == "plain" else "scaled"]))
    )
    assert_matches(model, ref)


def test_fp8_weight_option_on_a_bf16_file(sd, tmp_path):
    comfy = to_comfy(sd)
    model = load_transformer(
        write_file(tmp_path / "m.safetensors", comfy), dtype=torch.float32, weight_dtype=torch.float8_e4m3fn
    )
    assert model.layers[0].feed_forward.w1.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].attention_norm1.weight.dtype == torch.float32
    ref = reference_transformer(SMALL)
    rounded = {
        k: v.to(torch.float8_e4m3fn).float() if v.dim() == 2 and "pad_token" not in k else v for k, v in comfy.items()
    }
    ref.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(rounded))
    assert_matches(model, ref)


def test_omni_weights_load_in_both_layouts(tmp_path):
    ref = reference_transformer(dict(SMALL, siglip_feat_dim=48), seed=3)
    for path in (
        write_diffusers_folder(tmp_path / "omni", ref),
        write_file(tmp_path / "z_image_omni.safetensors", to_comfy(ref.state_dict())),
    ):
        model = load_transformer(path, dtype=torch.float32)
        assert model.info.variant == "omni" and model.info.config["siglip_feat_dim"] == 48
        assert_matches(model, ref)  # the text-to-image path of an Omni model


# ---- bad input ----


def expect_error(path, *fragments, **kwargs):
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, **kwargs)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "nope.safetensors", "no such file")


def test_shards_without_index(small_ref, tmp_path):
    folder = write_diffusers_folder(tmp_path / "t", small_ref, "300KB")
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    expect_error(folder, str(folder), "no *.safetensors.index.json", "Download the index")


def test_index_naming_a_missing_shard(small_ref, tmp_path):
    folder = write_diffusers_folder(tmp_path / "t", small_ref, "300KB")
    shard = next(folder.glob("*-00002-of-*.safetensors"))
    shard.unlink()
    expect_error(folder, shard.name, "missing")


def test_corrupt_header(sd, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 64)
    expect_error(path, str(path), "not a safetensors file")
    good = write_file(tmp_path / "good.safetensors", to_comfy(sd)).read_bytes()
    path.write_bytes(good[:9] + b"#" + good[10:])
    expect_error(path, str(path), "corrupt safetensors header")


def test_truncated_file(sd, tmp_path):
    path = write_file(tmp_path / "cut.safetensors", to_comfy(sd))
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(path, str(path), "truncated", "fetch the file again")


@pytest.mark.parametrize(
    "keys,looks",
    [
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.x"], "Stable Diffusion XL"),
        (["cap_embedder.1.weight", "layers.0.adaLN_modulation.1.weight"], "Lumina 2"),
        (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "VAE"),
        (["model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight"], "Qwen3 text encoder"),
        (["text_model.encoder.layers.0.mlp.fc1.weight"], "CLIP"),
    ],
)
def test_other_models_are_named(tmp_path, keys, looks):
    path = write_file(tmp_path / "other.safetensors", {k: torch.zeros(2) for k in keys})
    expect_error(path, str(path), "not a Z-Image transformer", looks)


def test_missing_unexpected_and_misshapen_tensors(sd, tmp_path):
    comfy = to_comfy(sd)
    missing = {k: v for k, v in comfy.items() if not k.startswith("layers.1.feed_forward")}
    expect_error(
        write_file(tmp_path / "a.safetensors", missing), "a.safetensors", "missing", "layers.1.feed_forward.w1.weight"
    )
    no_norms = {k: v for k, v in comfy.items() if "q_norm" not in k}
    expect_error(write_file(tmp_path / "n.safetensors", no_norms), "n.safetensors", "missing layers.0.attention.q_norm")
    extra = dict(comfy, **{"layers.0.attention.extra.weight": torch.zeros(2)})
    expect_error(
        write_file(tmp_path / "b.safetensors", extra), "b.safetensors", "unexpected", "layers.0.attention.extra.weight"
    )
    wrong = dict(comfy, **{"layers.1.attention.out.weight": torch.zeros(256, 128)})
    expect_error(
        write_file(tmp_path / "c.safetensors", wrong), "c.safetensors", "wrong shape", "layers.1.attention.out.weight"
    )


def test_config_json_that_does_not_fit_the_weights(small_ref, tmp_path):
    folder = write_diffusers_folder(tmp_path / "t", small_ref)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, n_heads=4, n_kv_heads=4, axes_dims=[16, 24, 24])))
    expect_error(folder, "wrong shape", "4 heads", "config.json", "attention.norm_q.weight is (128,)")
    (folder / "config.json").write_text(json.dumps(dict(config, _class_name="FluxTransformer2DModel")))
    expect_error(folder, "config.json", "FluxTransformer2DModel")


def test_pickles_gguf_and_unsupported_quantization_are_refused(sd, tmp_path):
    for name, fragment in (("m.ckpt", "pickles"), ("m.pth", "pickles"), ("m.gguf", "GGUF")):
        (tmp_path / name).write_bytes(b"whatever")
        expect_error(tmp_path / name, name, fragment)
    tensors = dict(to_comfy(sd))
    tensors["layers.0.attention.qkv.comfy_quant"] = torch.tensor(
        list(b'{"format": "asym_w4a8_int8"}'), dtype=torch.uint8
    )
    expect_error(write_file(tmp_path / "q.safetensors", tensors), "layers.0.attention.qkv", "'asym_w4a8_int8'", "nvfp4")


def test_folder_without_weights(tmp_path):
    expect_error(tmp_path, str(tmp_path), "found none")


# ---- memory ----


def inspect_json(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "zimage_core", "inspect", "--json", str(path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_peak_rss_stays_near_the_weights_held(tmp_path, dtype):
    """A real-width 4-layer model, sparse: peak RSS <= 1.15 x bf16 weights + 0.5 GB, from bf16 or fp32 files."""
    from helpers import to_comfy as convert

    specs = full_size_specs(dict(REAL, n_layers=4), dtype)
    comfy = convert({n: torch.empty(s, device="meta") for n, (s, _) in specs.items()})
    path = write_sparse(tmp_path / "big.safetensors", {n: (tuple(t.shape), dtype) for n, t in comfy.items()})
    info = inspect_json(path)
    assert info["held_bytes"] > 1.5e9 and info["dtype"] == "bfloat16"
    assert loaded_peak(info) <= 1.15 * info["held_bytes"] + 0.15e9


@pytest.mark.heavy
@pytest.mark.parametrize("layout", ["single file", "folder"])
def test_text_encoder_peak_rss_stays_near_the_weights_held(tmp_path, layout):
    """Real-width Qwen3 (full vocabulary), 5 layers of which 4 are loaded, sparse bf16: the same bound."""
    config = dict(QWEN3_REAL, num_hidden_layers=5)
    specs = qwen3_specs(config)
    if layout == "single file":
        path = write_sparse(tmp_path / "qwen_3_4b.safetensors", specs)
    else:
        path = write_sharded(tmp_path / "text_encoder", specs, 2, "model", {"model_type": "qwen3", **config})
    info = inspect_json(path)
    assert info["kind"] == "Qwen3 text encoder" and info["layers_used"] == 4 and info["held_bytes"] > 1.5e9
    assert loaded_peak(info) <= 1.15 * info["held_bytes"] + 0.15e9
