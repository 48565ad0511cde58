"""Our transformer equals diffusers' ZImageTransformer2DModel loaded with the same random weights."""

import pytest
import torch
from conftest import rel_err
from helpers import SLICE, SMALL, TINY, make_inputs, reference_forward, reference_transformer, write_diffusers_folder

from zimage_core.loaders import load_transformer


def both(ref, ours, config, size, cap_lens, seed=0, dtype=torch.float32):
    latents, t, padded, captions = make_inputs(config, size, cap_lens, seed)
    expected = torch.stack(reference_forward(ref, list(latents.to(dtype)), t, [c.to(dtype) for c in captions]))
    with torch.no_grad():
        got = ours(latents.to(dtype), t, padded.to(dtype), cap_lens)
    return got.float(), expected.float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = reference_transformer(TINY, seed=0)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("tiny"), ref, "20KB")
    return ref, load_transformer(folder, dtype=torch.float32)


def test_tiny_config_as_in_diffusers_tests(tiny):
    """diffusers' own test input: one 16x16 latent, a 16-token caption, t = 0."""
    ref, ours = tiny
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    expected = reference_forward(ref, [x[0]], torch.tensor([0.0]), [cap[0]])[0]
    with torch.no_grad():
        got = ours(x, torch.tensor([0.0]), cap)[0]
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("size", [(2, 2), (2, 64), (64, 2), (34, 50), (64, 64)])
@pytest.mark.parametrize("cap_lens", [[1, 32], [31, 33], [224, 7]])
def test_tiny_config_every_size_the_rope_table_covers(tiny, size, cap_lens):
    """TINY's table (256, 32, 32) covers latents up to 64 x 64 and padded captions up to 254 positions."""
    ref, ours = tiny
    got, expected = both(ref, ours, TINY, size, cap_lens)
    assert rel_err(got, expected) <= 1e-5


def test_beyond_the_rope_table_is_a_clear_error(tiny):
    _, ours = tiny
    latents, t, padded, _ = make_inputs(TINY, (66, 8), [5])
    with pytest.raises(ValueError, match="too long for this model's RoPE table.*axis 1"):
        ours(latents, t, padded)
    latents, t, padded, _ = make_inputs(TINY, (8, 8), [225])
    with pytest.raises(ValueError, match="caption is too long"):
        ours(latents, t, padded)


def test_odd_latent_sizes_are_padded_as_comfyuis_nextdit_pads_them(tiny):
    """ComfyUI graphs can make latents of any size (EmptySD3LatentImage fed by GetImageSize); its NextDiT pads them
    circularly to whole patches (`comfy.ldm.common_dit.pad_to_patch_size`: the first row and column repeated after
    the last) and crops the output back."""
    _, ours = tiny
    latents, t, padded, _ = make_inputs(TINY, (9, 7), [5])
    whole = torch.cat([latents, latents[:, :, :1]], 2)
    whole = torch.cat([whole, whole[..., :1]], 3)
    got = ours(latents, t, padded)
    assert got.shape == latents.shape
    assert rel_err(got, ours(whole, t, padded)[..., :9, :7]) <= 1e-6


@pytest.mark.heavy
def test_real_width_slice(tmp_path):
    """dim 3840, 30 heads, FFN 10240, caption width 2560, real RoPE; 2 layers and 1 refiner of each kind."""
    ref = reference_transformer(SLICE, seed=2)
    ours = load_transformer(write_diffusers_folder(tmp_path, ref), dtype=torch.float32)
    got, expected = both(ref, ours, SLICE, (32, 48), [17, 70], seed=3)
    assert rel_err(got, expected) <= 1e-5


def test_batch_of_two_sizes_768x1280_and_1024x1024(small_ref, small_folder):
    """diffusers batches both sizes in one call; ours runs each size as its own batch. Same numbers."""
    ours = load_transformer(small_folder, dtype=torch.float32)
    a, ta, _, cap_a = make_inputs(SMALL, (160, 96), [30], seed=4)  # 1280 x 768 pixels, latent H x W
    b, tb, _, cap_b = make_inputs(SMALL, (128, 128), [77], seed=5)  # 1024 x 1024
    expected = reference_forward(small_ref, [a[0], b[0]], torch.cat([ta, tb]), cap_a + cap_b)
    with torch.no_grad():
        got = [ours(a, ta, cap_a[0][None]), ours(b, tb, cap_b[0][None])]
    assert rel_err(got[0][0], expected[0]) <= 1e-5
    assert rel_err(got[1][0], expected[1]) <= 1e-5


def test_batch_of_two_caption_lengths_non_square(small_ref, small_folder):
    ours = load_transformer(small_folder, dtype=torch.float32)
    got, expected = both(small_ref, ours, SMALL, (96, 160), [12, 75], seed=6)
    assert rel_err(got, expected) <= 1e-5


def test_bf16_error_no_larger_than_diffusers_bf16(small_ref, small_folder):
    """Against the fp32 reference: our bf16 model errs no more than diffusers' own bf16 model."""
    latents, t, padded, captions = make_inputs(SMALL, (32, 48), [20, 45], seed=7)
    exact = torch.stack(reference_forward(small_ref, list(latents), t, captions))
    ref_bf16 = reference_transformer(SMALL, seed=1).to(torch.bfloat16)
    theirs = torch.stack(reference_forward(ref_bf16, list(latents.bfloat16()), t, [c.bfloat16() for c in captions]))
    ours_bf16 = load_transformer(small_folder, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = ours_bf16(latents.bfloat16(), t, padded.bfloat16(), [20, 45])
    assert ours.dtype == torch.bfloat16
    for metric in (rel_err, lambda a, b: ((a.float() - b).norm() / b.norm()).item()):
        assert metric(ours, exact) <= metric(theirs, exact)


def test_fp16_overflow_is_clamped_where_comfyui_clamps_it(small_folder, monkeypatch):
    """An attention output channel beyond fp16's range (as Base's activations get): with ComfyUI's clamp the fp16
    model stays finite and near fp32; without it the overflow becomes NaN."""
    from zimage_core import transformer

    latents, t, padded, _ = make_inputs(SMALL, (16, 16), [20], seed=3)
    models = {dtype: load_transformer(small_folder, dtype=dtype) for dtype in (torch.float32, torch.float16)}
    seen = []
    hook = models[torch.float32].layers[0].attention.out.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        models[torch.float32](latents, t, padded)
    hook.remove()
    widest = int(seen[0].abs().amax((0, 1)).argmax())  # one product per output: no fp16 accumulation in the way
    for model in models.values():
        model.layers[0].attention.out.weight.data[5] = 0
        model.layers[0].attention.out.weight.data[5, widest] = 60000.0  # representable; some outputs overflow
    with torch.no_grad():
        exact = models[torch.float32](latents, t, padded)
        clamped = models[torch.float16](latents.half(), t, padded.half()).float()
        monkeypatch.setattr(transformer, "clamp_fp16", lambda x: x)
        unclamped = models[torch.float16](latents.half(), t, padded.half()).float()
    assert exact.abs().max() < 1e4  # the outlier is normalized away in fp32: only fp16's range is the problem
    assert not unclamped.isfinite().all()
    assert clamped.isfinite().all() and rel_err(clamped, exact) <= 0.02, rel_err(clamped, exact)


@pytest.mark.parametrize("std, ok", [(0.1, True), (0.5, False)])
def test_fp16_is_offered_only_for_weights_that_pass_comfyuis_test(tmp_path, std, ok):
    """ComfyUI 0.33.0 (`model_detection.py`) allows fp16 when the second-to-last block's ffn_norm1 weight has a
    population std below 0.42 (Turbo's does, Base's does not)."""
    from helpers import to_comfy
    from safetensors.torch import save_file

    from zimage_core.loaders import transformer_facts

    sd = to_comfy(reference_transformer(SMALL, seed=0).state_dict())
    norm = f"layers.{SMALL['n_layers'] - 2}.ffn_norm1.weight"
    sd[norm] = 1 + std * torch.linspace(-1, 1, sd[norm].numel()) / torch.linspace(-1, 1, sd[norm].numel()).std(
        unbiased=False
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "t.safetensors")
    facts = transformer_facts(tmp_path / "t.safetensors")
    assert facts.fp16_ok is ok and facts.file_dtype == torch.float32
    assert facts.parameters == sum(v.numel() for v in sd.values())
