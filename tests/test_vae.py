"""The Flux VAE: encode and decode equal diffusers' AutoencoderKL, both file layouts, bands equal whole images."""

import json
import shutil

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from helpers import (
    QWEN3_SMALL,
    VAE_REAL,
    VAE_TINY,
    randomize_,
    reference_qwen3,
    reference_vae,
    to_bfl,
    write_file,
)

from zimage_core import vae as vae_module
from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import load_vae
from zimage_core.vae import VAE, VAEConfig


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """ComfyUI IMAGE: (B, H, W, 3) in [0, 1]."""
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def latents(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, height, width, generator=torch.Generator().manual_seed(seed))


def as_pixels(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(-1, 1) * 2 - 1


def assert_matches_diffusers(ours: VAE, ref, height: int, width: int):
    """Encode (mean and a seeded sample) and decode against diffusers, fp32, max abs error <= 1e-5."""
    x = images(2, height, width)
    f = ours.cfg.factor
    z = latents(2, height // f, width // f)
    with torch.no_grad():
        posterior = ref.encode(as_pixels(x)).latent_dist
        decoded = ref.decode(z).sample
    assert (ours.encode(x) - posterior.mean).abs().max() <= 1e-5
    drawn = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert (drawn - posterior.sample(torch.Generator().manual_seed(7))).abs().max() <= 1e-5
    assert not torch.equal(drawn, ours.encode(x))
    ours_raw = ours.decoder(ours.post_quant_conv(z) if ours.cfg.quant_conv else z)
    assert (ours_raw - decoded).abs().max() <= 1e-5
    expected_image = (decoded / 2 + 0.5).clamp(0, 1).movedim(1, -1)
    assert (ours.decode(z) - expected_image).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_ref():
    return reference_vae(VAE_TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_layouts(tiny_ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    sd = tiny_ref.state_dict()
    tiny_ref.save_pretrained(root / "Z-Image-Turbo" / "vae")
    (root / "Z-Image-Turbo" / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    return {
        "diffusers folder": root / "Z-Image-Turbo" / "vae",
        "diffusers pipeline folder": root / "Z-Image-Turbo",
        "ae.safetensors (BFL/ComfyUI names)": write_file(root / "ae.safetensors", to_bfl(sd)),
        "checkpoint with first_stage_model.": write_file(
            root / "all_in_one.safetensors",
            {"first_stage_model." + k: v for k, v in to_bfl(sd).items()}
            | {"model.diffusion_model.layers.0.adaLN_modulation.0.weight": torch.zeros(2, 2)},
        ),
        "diffusers-named single file": write_file(root / "vae_diffusers.safetensors", sd),
    }


def test_helper_bfl_layout_is_what_diffusers_converts_back(tiny_ref):
    """Our test helper's ae.safetensors naming is anchored to diffusers' own single-file converter."""
    sd = tiny_ref.state_dict()
    back = convert_ldm_vae_checkpoint(to_bfl(sd), VAE_TINY)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)


def test_diffusers_tiny_test_vae(tiny_ref, tiny_layouts):
    vae = load_vae(tiny_layouts["diffusers folder"])
    assert vae.cfg.factor == 2 and vae.cfg.quant_conv and vae.info.naming == "diffusers"
    assert_matches_diffusers(vae, tiny_ref, 32, 48)


@pytest.mark.heavy
def test_real_channel_widths_at_a_small_size(tmp_path):
    ref = reference_vae(VAE_REAL, seed=1)
    vae = load_vae(write_file(tmp_path / "ae.safetensors", to_bfl(ref.state_dict())))
    assert vae.cfg == VAEConfig() and vae.cfg.factor == 8 and vae.info.naming == "BFL/ComfyUI"
    assert_matches_diffusers(vae, ref, 64, 96)


@pytest.mark.parametrize(
    "layout",
    [
        "diffusers pipeline folder",
        "ae.safetensors (BFL/ComfyUI names)",
        "checkpoint with first_stage_model.",
        "diffusers-named single file",
    ],
)
def test_every_layout_gives_identical_outputs(tiny_layouts, layout):
    baseline = load_vae(tiny_layouts["diffusers folder"])
    vae = load_vae(tiny_layouts[layout])
    assert vae.cfg == baseline.cfg  # from shapes for single files, from config.json for folders
    x, z = images(1, 16, 24), latents(1, 8, 12)
    assert torch.equal(vae.encode(x), baseline.encode(x)) and torch.equal(vae.decode(z), baseline.decode(z))


def test_normalize_is_the_pipelines_scaling(tiny_ref, tiny_layouts):
    vae = load_vae(tiny_layouts["diffusers folder"])
    z = latents(1, 4, 4)
    expected = (z - tiny_ref.config.shift_factor) * tiny_ref.config.scaling_factor  # diffusers' img2img pipeline
    assert torch.allclose(vae.cfg.normalize(z), expected) and torch.allclose(
        vae.cfg.denormalize(expected), z, atol=1e-6
    )


def test_bf16_stays_close_to_fp32(tiny_layouts):
    vae32 = load_vae(tiny_layouts["diffusers folder"])
    vae16 = load_vae(tiny_layouts["diffusers folder"], dtype=torch.bfloat16)
    z = latents(1, 8, 8)
    assert vae16.dtype == torch.bfloat16 and vae16.decode(z).dtype == torch.float32
    assert (vae16.decode(z) - vae32.decode(z)).abs().max() < 0.05


# ---- bands ----


@pytest.fixture(scope="module")
def factor8():
    """Four levels (factor 8, global attention in the middle) at reduced widths, so 1024² runs in seconds."""
    return randomize_(VAE(VAEConfig(block_out_channels=(32, 32, 64, 64))), 3).eval()


@pytest.mark.heavy
def test_banded_decode_of_a_1024_image_equals_the_whole_decode(factor8):
    z = latents(1, 128, 128, seed=4)
    whole_raw = factor8.decoder(z)
    banded_raw = factor8.decoder.banded(z)
    assert (banded_raw - whole_raw).abs().max() / whole_raw.abs().max() < 1e-5
    whole, banded = factor8.decode(z, tiled=False), factor8.decode(z, tiled=True)
    assert whole.shape == (1, 1024, 1024, 3) and (banded - whole).abs().max() <= 2 / 255
    assert 0.2 < ((whole > 0) & (whole < 1)).float().mean()  # not a comparison of saturated pixels


def test_banded_encode_equals_the_whole_encode(factor8):
    x = images(1, 512, 768, seed=5)
    whole, banded = factor8.encode(x, tiled=False), factor8.encode(x, tiled=True)
    assert (banded - whole).abs().max() / whole.abs().max() < 1e-4  # float64 vs fp32 GroupNorm sums, four levels


def test_bands_are_chosen_when_the_whole_image_would_not_fit(factor8, monkeypatch):
    z = latents(1, 24, 40, seed=6)
    calls = []
    original = factor8.decoder.banded
    monkeypatch.setattr(factor8.decoder, "banded", lambda x: calls.append(1) or original(x))
    monkeypatch.setattr(vae_module, "free_bytes", lambda device: 10**12)
    factor8.decode(z)
    assert calls == []
    monkeypatch.setattr(vae_module, "free_bytes", lambda device: 10**6)
    factor8.decode(z)
    assert calls == [1]
    factor8.decode(z, tiled=False)
    assert calls == [1]


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_an_out_of_memory_whole_run_falls_back_to_bands(factor8, monkeypatch, part):
    z, x = latents(1, 24, 40, seed=6), images(1, 64, 96, seed=7)
    module = getattr(factor8, part)
    expected = factor8.decode(z, tiled=True) if part == "decoder" else factor8.encode(x, tiled=True)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vae_module, "free_bytes", lambda device: 10**12)  # the estimate says it fits
    monkeypatch.setattr(module, "forward", out_of_memory)
    got = factor8.decode(z) if part == "decoder" else factor8.encode(x)
    assert torch.equal(got, expected)  # the same banded run, same shapes
    with pytest.raises(torch.OutOfMemoryError):  # asked for a whole-image run: not second-guessed
        factor8.decode(z, tiled=False) if part == "decoder" else factor8.encode(x, tiled=False)


# ---- wrong files ----


@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)},
         "4 latent channels (a Stable Diffusion 1.x/2.x/XL VAE); Z-Image needs the 16-channel Flux VAE"),
        ({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3, 3)}, "a video VAE"),
        ({"decoder.upsamples.0.residual.0.gamma": torch.zeros(2), "encoder.conv1.weight": torch.zeros(2)},
         "Wan / Qwen-Image video VAE"),
        ({"layers.0.adaLN_modulation.0.weight": torch.zeros(2), "cap_embedder.1.weight": torch.zeros(2)},
         "Z-Image transformer"),
    ],
)  # fmt: skip
def test_other_vaes_and_models_are_refused_by_name(tmp_path, tensors, message):
    path = write_file(tmp_path / "wrong_vae.safetensors", tensors)
    with pytest.raises(CheckpointError, match="wrong_vae.safetensors") as error:
        load_vae(path)
    assert message in str(error.value)


def test_a_text_encoder_is_not_a_vae(tmp_path):
    ref = reference_qwen3(QWEN3_SMALL)
    path = write_file(tmp_path / "qwen_3_4b.safetensors", {"model." + k: v for k, v in ref.state_dict().items()})
    with pytest.raises(CheckpointError, match="qwen_3_4b.safetensors: not a VAE.*Flux VAE.*Qwen3 text encoder"):
        load_vae(path)


def test_missing_tensors_and_wrong_config(tiny_ref, tiny_layouts, tmp_path):
    sd = to_bfl(tiny_ref.state_dict())
    del sd["decoder.up.0.block.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(first: decoder.up.0.block.1.conv2.weight"):
        load_vae(write_file(tmp_path / "partial.safetensors", sd))
    folder = shutil.copytree(tiny_layouts["diffusers folder"], tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, _class_name="AutoencoderKLWan")))
    with pytest.raises(CheckpointError, match="config.json: describes a AutoencoderKLWan"):
        load_vae(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, block_out_channels=[32, 32])))
    with pytest.raises(CheckpointError, match="do not match a Flux VAE with widths 32/32: 4 unexpected"):
        load_vae(folder)
