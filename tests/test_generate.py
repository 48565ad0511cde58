"""`python -m zimage_core generate`: the README command on tiny random weights, model discovery, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from zimage_core.checkpoint import CheckpointError
from zimage_core.pipeline import find_models

ROOT = Path(__file__).parents[1]


def generate(*args):
    return subprocess.run(
        [sys.executable, "-m", "zimage_core", "generate", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_readme_command_on_tiny_random_weights(tmp_path):
    result = generate(
        "--model", "tiny-random", "--prompt", "一只猫 on a windowsill", "--size", "64x48", "--steps", "3",
        "--seed", "5", "--out", tmp_path / "cat.png", "--save-latent", tmp_path / "cat.latent",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr  # the progress bar reached the end
    image = Image.open(tmp_path / "cat.png")
    assert image.size == (64, 48)
    params = json.loads(image.info["parameters"])
    assert (params["prompt"], params["seed"], params["steps"], params["size"]) == (
        "一只猫 on a windowsill",
        5,
        3,
        "64x48",
    )
    latent = load_file(tmp_path / "cat.latent")  # what ComfyUI's Load Latent reads: no SD rescaling with the marker
    assert set(latent) == {"latent_tensor", "latent_format_version_0"} and latent["latent_tensor"].shape == (
        1,
        16,
        24,
        32,
    )
    again = generate("--model", "tiny-random", "--prompt", "一只猫 on a windowsill", "--size", "64x48",
                     "--steps", "3", "--seed", "5", "--out", tmp_path / "again.png")  # fmt: skip
    assert again.returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(image))  # same seed, same image


def test_img2img_and_inpaint_with_a_batch(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((32, 40), dtype=np.uint8)
    mask[:, 20:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", "tiny-random", "--prompt", "a fox", "--size", "40x32", "--steps", "4", "--batch", "2",
              "--cfg", "2", "--negative", "blurry", "--init-image", tmp_path / "in.png"]  # fmt: skip
    result = generate(*common, "--strength", "0.5", "--out", tmp_path / "i2i.png")
    assert result.returncode == 0, result.stderr
    assert "2/2" in result.stderr  # strength 0.5 of 4 steps runs 2
    result = generate(*common, "--mask", tmp_path / "mask.png", "--out", tmp_path / "inpaint.png")
    assert result.returncode == 0, result.stderr
    assert "4/4" in result.stderr  # inpaint's default strength is diffusers' 1.0: every step runs
    original = np.asarray(Image.open(tmp_path / "in.png")).astype(int)
    for i in range(2):
        out = np.asarray(Image.open(tmp_path / f"inpaint_{i:02d}.png")).astype(int)
        # the kept half comes back through the VAE, the repainted half is new
        assert np.abs(out[:, :16] - original[:, :16]).mean() < np.abs(out[:, 24:] - original[:, 24:]).mean()


def test_a_missing_model_says_what_file_is_expected(tmp_path):
    (tmp_path / "models" / "diffusion_models").mkdir(parents=True)
    result = generate("--model", tmp_path / "models", "--prompt", "x", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no transformer found" in result.stderr and "z_image" in result.stderr and "--transformer" in result.stderr
    result = generate("--prompt", "x", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "pass --model or --transformer" in result.stderr


def test_comfyui_models_folder_is_searched_by_released_names(tmp_path):
    models = tmp_path / "models"
    for folder, name in (("diffusion_models", "z_image_turbo_bf16.safetensors"), ("vae", "ae.safetensors"),
                         ("text_encoders", "qwen_3_4b.safetensors"), ("text_encoders", "clip_l.safetensors"),
                         ("vae", "sdxl_vae.safetensors")):  # fmt: skip
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / name).write_bytes(b"")
    assert find_models(models).vae == models / "vae" / "ae.safetensors"  # not sdxl_vae.safetensors
    found = find_models(models, vae=tmp_path / "other_vae.safetensors")
    assert found.transformer == models / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    assert found.text_encoder == models / "text_encoders" / "qwen_3_4b.safetensors"
    assert found.vae == tmp_path / "other_vae.safetensors"  # given files win
    (models / "diffusion_models" / "z_image_base_bf16.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several candidates.*z_image_base.*--transformer"):
        find_models(models)


def test_bad_sizes_and_strength_are_clear(tmp_path):
    result = generate("--model", "tiny-random", "--prompt", "x", "--size", "30x30", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "multiples of 4" in result.stderr
    result = generate("--model", "tiny-random", "--prompt", "x", "--size", "16x2064", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "beyond this model's position table: at most 2048x2048" in result.stderr
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    result = generate("--model", "tiny-random", "--prompt", "x", "--size", "32x32", "--steps", "4", "--init-image",
                      tmp_path / "in.png", "--strength", "0.0", "--out", tmp_path / "x.png")  # fmt: skip
    assert result.returncode == 1 and "leaves no step to run" in result.stderr


def test_seed_variety_changes_the_image_and_keeps_seeds_reproducible(tmp_path):
    base = ["--model", "tiny-random", "--prompt", "a cat", "--size", "32x32", "--steps", "3", "--seed", "9"]
    outputs = {}
    for name, extra in (("plain", []), ("varied", ["--variety", "0.8"]), ("varied_again", ["--variety", "0.8"])):
        assert generate(*base, *extra, "--out", tmp_path / f"{name}.png").returncode == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(outputs["varied"], outputs["varied_again"])
    assert not np.array_equal(outputs["varied"], outputs["plain"])
    assert json.loads(Image.open(tmp_path / "varied.png").info["parameters"])["variety"] == [0.8, 2]


def test_edit_images_on_tiny_random_weights(tmp_path):
    """`--edit-image` twice: the Omni path end to end; the output takes the last reference's size (cut to 4)."""
    rng = np.random.RandomState(1)
    for name, size in (("a.png", (70, 90)), ("b.png", (66, 75))):
        Image.fromarray(rng.randint(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    result = generate("--model", "tiny-random", "--prompt", "the cat from the first on the second", "--steps", "2",
                      "--cfg", "2", "--edit-image", tmp_path / "a.png", "--edit-image", tmp_path / "b.png",
                      "--out", tmp_path / "edit.png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "edit.png") as image:
        assert image.size == (72, 64)
        params = json.loads(image.text["parameters"])
    assert params["size"] == "72x64" and len(params["edit_images"]) == 2
    result = generate("--model", "tiny-random", "--prompt", "x", "--edit-image", tmp_path / "a.png", "--init-image",
                      tmp_path / "b.png", "--out", tmp_path / "x.png")  # fmt: skip
    assert result.returncode != 0 and "do not combine" in result.stderr


def test_loras_stack_on_the_command_line_and_say_what_they_matched(tmp_path):
    """`--lora FILE[:STRENGTH]`, repeated: the summary of each on stderr, the image changes with the strength, a
    strength of 0 changes nothing, and the PNG records them."""
    import torch
    from safetensors.torch import save_file

    from zimage_core.pipeline import tiny_random

    model = tiny_random("transformer", "cpu", torch.float32)
    g, lora = torch.Generator().manual_seed(0), {}
    for name in ("layers.0.feed_forward.w1", "layers.1.attention.qkv"):  # kohya names on the tiny model's layers
        out, inp = model.get_submodule(name).weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        lora |= {f"{key}.lora_up.weight": torch.randn(out, 2, generator=g),
                 f"{key}.lora_down.weight": torch.randn(2, inp, generator=g), f"{key}.alpha": torch.tensor(2.0)}  # fmt: skip
    save_file(lora, tmp_path / "style.safetensors")
    save_file(
        {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "flux.safetensors"
    )
    base = ["--model", "tiny-random", "--prompt", "a cat", "--size", "32x32", "--steps", "2", "--seed", "3"]
    images = {}
    for label, extra in {"plain": [], "zero": ["--lora", f"{tmp_path / 'style.safetensors'}:0"],
                         "stacked": ["--lora", tmp_path / "style.safetensors", "--lora",
                                     f"{tmp_path / 'style.safetensors'}:-0.5"]}.items():  # fmt: skip
        result = generate(*base, *extra, "--out", tmp_path / f"{label}.png")
        assert result.returncode == 0, result.stderr
        images[label] = np.asarray(Image.open(tmp_path / f"{label}.png")).astype(int)
        if extra:
            assert "LoRA style.safetensors (kohya/musubi): 6 of 6 keys applied to 2 layers" in result.stderr
            assert "merged into 2 layers' weights" in result.stderr
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["stacked"] - images["plain"]).mean() > 1
    params = json.loads(Image.open(tmp_path / "stacked.png").info["parameters"])
    assert params["loras"] == [[str(tmp_path / "style.safetensors"), 1.0], [str(tmp_path / "style.safetensors"), -0.5]]
    failed = generate(*base, "--lora", tmp_path / "flux.safetensors", "--out", tmp_path / "x.png")
    assert failed.returncode != 0 and "flux.safetensors: none of its 1 keys applies" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_speed_levers_on_the_command_line(tmp_path):
    """--attention, --residual and --compile run the same image within bf16 tolerance of the plain one (fp32 on the
    CPU: attention kernels agree closely); an attention kernel the device cannot run is refused by name, and so is
    a VRAM budget (--vram) too small to stream in."""
    base = ["--model", "tiny-random", "--prompt", "a cat", "--size", "32x32", "--steps", "2", "--seed", "3"]
    images = {}
    for name, extra in (("plain", []), ("math", ["--attention", "math"]), ("levers", ["--attention", "flash",
                        "--residual", "compute", "--compile"])):  # fmt: skip
        result = generate(*base, *extra, "--out", tmp_path / f"{name}.png")
        assert result.returncode == 0, result.stderr
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    for name in ("math", "levers"):
        assert np.abs(images[name] - images["plain"]).max() <= 2, name
    result = generate(*base, "--attention", "cudnn", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "attention 'cudnn' cannot run on cpu" in result.stderr
    result = generate(*base, "--vram", "0.001", "--gemm", "lowp", "--out", tmp_path / "x.png")
    assert result.returncode == 1 and "a VRAM budget of 0.001 GB is below what streaming this model" in result.stderr
