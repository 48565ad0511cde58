"""`python -m zimage_core inspect` on every layout and every bad input; the smoke command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    QWEN3_SMALL,
    SMALL,
    VAE_TINY,
    fp8_forms,
    reference_qwen3,
    reference_vae,
    to_bfl,
    to_comfy,
    write_diffusers_folder,
    write_file,
    write_pipeline_folder,
)

ROOT = Path(__file__).parents[1]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "zimage_core", *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False
    )


def in_process(*args, capsys) -> subprocess.CompletedProcess:
    """`python -m zimage_core ARGS` through its main() in this process: its exit code and what it printed."""
    from zimage_core.__main__ import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(scope="module")
def layouts(small_ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    sd = small_ref.state_dict()
    comfy = to_comfy(sd)
    forms, _ = fp8_forms(comfy)
    paths = {
        "diffusers folder": write_diffusers_folder(root / "folder", small_ref, "300KB"),
        "diffusers pipeline folder": write_pipeline_folder(root / "Z-Image-Turbo", small_ref),
        "ComfyUI single file": write_file(
            root / "z_image_turbo_bf16.safetensors", {k: v.bfloat16() for k, v in comfy.items()}
        ),
        "prefixed single file": write_file(
            root / "prefixed.safetensors", {"model.diffusion_model." + k: v for k, v in comfy.items()}
        ),
    }
    for form, (tensors, metadata) in forms.items():
        paths[f"fp8 {form}"] = write_file(root / f"fp8_{form}.safetensors", tensors, metadata)
    return paths


@pytest.mark.parametrize(
    "name",
    [
        "diffusers folder",
        "diffusers pipeline folder",
        "ComfyUI single file",
        "prefixed single file",
        "fp8 plain",
        "fp8 scaled",
        "fp8 comfy_quant",
    ],
)
def test_inspect_json_on_every_layout(layouts, small_ref, name):
    result = cli("inspect", "--json", layouts[name])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "Z-Image transformer"
    assert info["parameters"] == sum(p.numel() for p in small_ref.parameters())
    assert info["config"]["dim"] == SMALL["dim"] and info["config"]["n_layers"] == SMALL["n_layers"]
    assert info["layout"] == ("single file" if "file" in name or "fp8" in name else name)
    assert info["quantization"].startswith("fp8") == name.startswith("fp8")
    assert info["load_seconds"] > 0 and info["peak_rss_bytes"] > info["held_bytes"]


def test_inspect_text_output(layouts):
    result = cli("inspect", layouts["diffusers pipeline folder"])
    assert result.returncode == 0, result.stderr
    for row in ("kind ", "variant ", "turbo", "layout ", "diffusers pipeline folder", "parameters ", "peak RSS "):
        assert row in result.stdout


def test_inspect_with_fp8_weights_and_fp32_compute(layouts):
    info = json.loads(
        cli(
            "inspect", "--json", "--dtype", "fp32", "--weight-dtype", "fp8_e4m3fn", layouts["ComfyUI single file"]
        ).stdout
    )
    assert info["dtype"] == "float32" and info["held_bytes"] < 4 * info["parameters"] / 2


def test_inspect_fails_clearly_on_bad_input(tmp_path, small_ref, capsys):
    cases = {}
    cases["missing"] = (tmp_path / "absent.safetensors", "no such file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    cases["corrupt"] = (garbage, "not a safetensors file")
    cut = write_file(tmp_path / "cut.safetensors", to_comfy(small_ref.state_dict()))
    cut.write_bytes(cut.read_bytes()[:-10])
    cases["truncated"] = (cut, "truncated")
    folder = write_diffusers_folder(tmp_path / "noindex", small_ref, "300KB")
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    cases["no index"] = (folder, "no *.safetensors.index.json")
    cases["flux"] = (
        write_file(tmp_path / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}),
        "Flux",
    )
    comfy = to_comfy(small_ref.state_dict())
    cases["missing keys"] = (write_file(tmp_path / "partial.safetensors", dict(list(comfy.items())[:-3])), "missing")
    cases["unexpected keys"] = (
        write_file(tmp_path / "extra.safetensors", dict(comfy, extra_head=torch.zeros(3))),
        "unexpected",
    )
    cases["wrong shape"] = (
        write_file(tmp_path / "shape.safetensors", dict(comfy, x_pad_token=torch.zeros(1, 8))),
        "wrong shape",
    )
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    cases["pickle"] = (pickle, "never loaded")
    for i, (what, (path, fragment)) in enumerate(cases.items()):
        # the first as a user runs it; the rest in this process (the same main(), without 10 s of imports each)
        result = cli("inspect", path) if i == 0 else in_process("inspect", path, capsys=capsys)
        assert result.returncode == 1, what
        assert result.stderr.startswith("error: ") and str(path) in result.stderr and fragment in result.stderr, (
            what,
            result.stderr,
        )
        assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A small Qwen3: its reference, as ComfyUI's single file, and in a pipeline folder next to a transformer."""
    ref = reference_qwen3(QWEN3_SMALL, seed=3)
    root = tmp_path_factory.mktemp("qwen3")
    single = write_file(
        root / "qwen_3_4b.safetensors", {"model." + k: v.bfloat16() for k, v in ref.state_dict().items()}
    )
    return ref, single, root


def test_inspect_text_encoder_single_file(qwen3):
    ref, single, _ = qwen3
    result = cli("inspect", "--json", single)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    last = QWEN3_SMALL["num_hidden_layers"] - 1
    assert (info["kind"], info["layout"], info["prefix"]) == ("Qwen3 text encoder", "single file", "model.")
    assert {
        k: info["config"][k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    } == {k: QWEN3_SMALL[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
    assert info["config"]["num_hidden_layers"] == QWEN3_SMALL["num_hidden_layers"] and info["layers_used"] == last
    assert info["parameters"] == sum(
        p.numel() for n, p in ref.named_parameters() if not n.startswith((f"layers.{last}.", "norm."))
    )
    assert info["model"].startswith("Qwen3, not Z-Image's Qwen3-4B") and info["tokenizer"] == "bundled Qwen2 BPE"
    text = cli("inspect", single).stdout
    for row in ("kind          Qwen3 text encoder", "layers used   2 of 3", "tokenizer ", "peak RSS "):
        assert row in text


def test_inspect_pipeline_folder_reports_each_component(qwen3, small_ref):
    ref, _, root = qwen3
    pipeline = write_pipeline_folder(root / "Z-Image-Turbo", small_ref)
    ref.save_pretrained(pipeline / "text_encoder")
    result = cli("inspect", "--json", pipeline)
    assert result.returncode == 0, result.stderr
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines()]
    assert kinds == ["Z-Image transformer", "Qwen3 text encoder"]
    only = cli("inspect", "--json", "--component", "text_encoder", pipeline)
    assert [json.loads(line)["layout"] for line in only.stdout.splitlines()] == ["diffusers pipeline folder"]
    config = cli("inspect", "--config", pipeline / "text_encoder" / "config.json", pipeline)
    assert config.returncode == 1 and "--component" in config.stderr


def test_inspect_names_a_wrong_text_encoder(tmp_path, capsys):
    path = write_file(tmp_path / "clip_l.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2)})
    result = in_process("inspect", path, capsys=capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "Qwen3 text encoder" in result.stderr and "CLIP" in result.stderr
    result = in_process("inspect", "--component", "text_encoder", path, capsys=capsys)
    assert result.returncode == 1 and "not a Qwen3 text encoder (Z-Image's is Qwen3-4B" in result.stderr


def test_inspect_vae_layouts(tmp_path, capsys):
    ref = reference_vae(VAE_TINY)
    ae = write_file(tmp_path / "ae.safetensors", to_bfl(ref.state_dict()))
    ref.save_pretrained(tmp_path / "Z-Image-Turbo" / "vae")
    (tmp_path / "Z-Image-Turbo" / "model_index.json").write_text("{}")
    for path, naming in ((ae, "BFL/ComfyUI"), (tmp_path / "Z-Image-Turbo", "diffusers")):
        result = in_process("inspect", "--json", path, capsys=capsys)  # the command line: test_inspect_json_*
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert (info["kind"], info["naming"], info["factor"]) == ("Flux VAE", naming, 2)
        assert info["config"]["block_out_channels"] == VAE_TINY["block_out_channels"]
        assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    assert "downscale     2x" in in_process("inspect", ae, capsys=capsys).stdout
    sd_vae = write_file(tmp_path / "sdxl_vae.safetensors", {"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)})
    result = in_process("inspect", sd_vae, capsys=capsys)
    assert result.returncode == 1 and "sdxl_vae.safetensors: a VAE with 4 latent channels" in result.stderr


def test_smoke_command():
    result = cli("smoke", "--size", "256")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ") and "finite: True" in result.stdout
