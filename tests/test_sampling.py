"""Sampling equals diffusers' ZImagePipeline on the same tiny random components and seeds."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from helpers import QWEN3_TINY, REAL, VAE_TINY, reference_qwen3, reference_transformer, reference_vae
from transformers import AutoTokenizer

from zimage_core import limits
from zimage_core.loaders import load_text_encoder, load_transformer, load_vae
from zimage_core.pipeline import find_models, generate
from zimage_core.sampling import encode_with_noise, noise, noised, sample, sigmas, start_index, vary
from zimage_core.text_encoder import BUNDLED_TOKENIZER

# diffusers' pipeline-test transformer (tests/pipelines/z_image/test_z_image.py)
PIPELINE_TRANSFORMER = dict(REAL, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])  # fmt: skip


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_sigmas_equal_diffusers_for_1_to_50_steps(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    for steps in range(1, 51):
        for side in (512, 1024, 2048):  # the pipeline's resolution-dependent mu, which this static schedule ignores
            mu = calculate_shift((side // 16) ** 2, 256, 4096, 0.5, 1.15)
            scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
            # a few float32 ulps: linspace and the shift may round differently on another CPU's vector unit
            torch.testing.assert_close(sigmas(steps, shift), scheduler.sigmas, rtol=0, atol=1e-6)
            torch.testing.assert_close(sigmas(steps, shift)[:-1] * 1000, scheduler.timesteps, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """The same random components for diffusers' pipeline (objects) and for us (saved, then loaded)."""
    root = tmp_path_factory.mktemp("pipeline")
    transformer = reference_transformer(PIPELINE_TRANSFORMER, seed=0)
    text_encoder = reference_qwen3(QWEN3_TINY, seed=1)
    vae = reference_vae(VAE_TINY, seed=2)
    for name, model in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        model.save_pretrained(root / name)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)),
        transformer=transformer,
    )
    ours = (
        load_transformer(root / "transformer", dtype=torch.float32),
        load_text_encoder(root / "text_encoder", dtype=torch.float32),
        load_vae(root / "vae"),
    )
    return pipe, ours, root


@pytest.mark.parametrize(
    "steps,scale,negative,truncation,normalization",
    [
        (8, 0.0, None, 1.0, 0.0),  # Turbo: 8 evaluations, no guidance
        (4, 3.0, "bad quality", 1.0, 0.0),  # Base with a negative prompt
        (5, 4.0, None, 0.6, 1.2),  # guidance off for late steps, norms capped; negative "" by default
    ],
)
def test_text_to_image_equals_diffusers_pipeline(components, steps, scale, negative, truncation, normalization):
    pipe, (transformer, encoder, vae), _ = components
    prompts, seeds = ["dance monkey", "一只猫"], [0, 1]
    negatives = None if negative is None else [negative] * 2

    def reference(output_type):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            list(prompts),
            negative_prompt=negatives and list(negatives),
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=scale,
            cfg_truncation=truncation,
            cfg_normalization=normalization,
            generator=generators,
            output_type=output_type,
        ).images  # fmt: skip (lists are copied: diffusers rewrites the prompt lists it is given)

    expected, expected_image = reference("latent"), torch.from_numpy(reference("np"))

    cond = encoder.encode(prompts)
    uncond = encoder.encode(negatives or ["", ""]) if scale > 0 else None
    start = noise((16, 16, 16), seeds)
    latents = sample(transformer, start, cond, uncond, sigmas(steps), scale, truncation, normalization)
    assert (latents - expected).abs().max() <= 1e-4
    image = vae.decode(vae.cfg.denormalize(latents))
    assert (image - expected_image).abs().max() <= 2 / 255


@pytest.mark.parametrize("kind,strength,steps", [("img2img", 0.6, 5), ("img2img", 0.3, 8), ("img2img", 1.0, 3),
                                                 ("inpaint", 1.0, 4), ("inpaint", 0.75, 4)])  # fmt: skip
def test_img2img_and_inpaint_equal_diffusers_pipelines(components, kind, strength, steps):
    pipe, (transformer, encoder, vae), _ = components
    prompts, negatives, seeds = ["dance monkey", "a red fox"], ["bad quality", ""], [5, 6]
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(7))
    mask = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(8))  # grey levels: binarized at 0.5
    reference_pipe = (ZImageImg2ImgPipeline if kind == "img2img" else ZImageInpaintPipeline)(**pipe.components)
    extra = {"mask_image": mask[:, None]} if kind == "inpaint" else {}

    def reference(output_type):
        return reference_pipe(
            list(prompts), image=images.movedim(-1, 1), strength=strength, negative_prompt=list(negatives), height=32,
            width=32, num_inference_steps=steps, guidance_scale=2.0, output_type=output_type,
            generator=[torch.Generator().manual_seed(s) for s in seeds], **extra,
        ).images  # fmt: skip

    expected, expected_image = reference("latent"), torch.from_numpy(reference("np"))
    schedule = sigmas(steps)[start_index(steps, strength) :]
    clean, start = encode_with_noise(vae, images, seeds)
    inpaint = None
    if kind == "inpaint":
        inpaint = (clean, start, F.interpolate((mask[:, None] >= 0.5).float(), size=clean.shape[2:], mode="nearest"))
    cond, uncond = encoder.encode(prompts), encoder.encode(negatives)
    latents = sample(transformer, noised(clean, start, schedule[0]), cond, uncond, schedule, 2.0, inpaint=inpaint)
    assert (latents - expected).abs().max() <= 1e-4
    assert (vae.decode(vae.cfg.denormalize(latents)) - expected_image).abs().max() <= 2 / 255


def test_a_mask_of_another_size_is_resized_to_the_image():
    """As ComfyUI's samplers resize masks: LoadImage's 64 x 64 empty mask (an image without alpha) keeps everything."""
    empty = limits.mask(torch.zeros(1, 64, 64), 2, 16, 16, 8)
    assert empty.shape == (1, 128, 128) and not empty.any()
    right = torch.zeros(1, 96, 96)
    right[..., 48:] = 1
    resized = limits.mask(right, 2, 16, 24, 8)
    assert resized.shape == (1, 128, 192) and resized[..., 96:].all() and not resized[..., :96].any()
    with pytest.raises(ValueError, match=r"mask has shape \(3, 96, 96\)"):
        limits.mask(right.expand(3, -1, -1), 2, 16, 16, 8)


def test_strength_that_leaves_no_step_is_refused():
    assert start_index(8, 1.0) == 0 and start_index(8, 0.5) == 4 and start_index(4, 0.1) == 3
    with pytest.raises(ValueError, match="leaves no step to run"):
        start_index(4, 0.0)
    with pytest.raises(ValueError, match="within"):
        start_index(4, 1.5)


def test_callback_sees_every_step_and_cancel_stops(components):
    _, (transformer, encoder, _), _ = components
    cond, seen = encoder.encode(["a cat"]), []
    start = noise((16, 8, 8), [3])
    out = sample(transformer, start, cond, schedule=sigmas(3), callback=lambda i, n, x0: seen.append((i, n, x0)))
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert torch.allclose(seen[-1][2], out, atol=1e-6)  # at sigma 0 the prediction is the result
    calls = []
    with pytest.raises(InterruptedError, match="before step 2 of 3"):
        sample(transformer, start, cond, schedule=sigmas(3), cancelled=lambda: calls.append(1) or len(calls) > 1)


def test_generate_from_a_pipeline_folder_equals_diffusers(components):
    """The whole path: models found in the folder, loaded one at a time, cfg in ComfyUI's convention (g + 1)."""
    pipe, _, root = components
    prompts, seeds = ["dance monkey", "a red fox"], [3, 4]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = pipe(list(prompts), negative_prompt=["bad quality"] * 2, height=32, width=48, num_inference_steps=4,
                    guidance_scale=2.5, generator=generators, output_type="np").images  # fmt: skip
    result = generate(find_models(root), prompts, ["bad quality"] * 2, width=48, height=32, steps=4, cfg=3.5,
                      seeds=seeds, dtype=torch.float32)  # fmt: skip
    assert result.images.shape == (2, 32, 48, 3) and result.latents.shape == (2, 16, 16, 24)
    assert (result.images - torch.from_numpy(expected)).abs().max() <= 2 / 255


class Spy:
    """A transformer stand-in that records the captions of every evaluation, and can refuse 2B batches."""

    def __init__(self, model, refuse_batch: int | None = None):
        self.model, self.refuse_batch, self.captions = model, refuse_batch, []
        self.cfg, self.device, self.dtype = model.cfg, model.device, model.dtype

    def __call__(self, x, t, captions, lengths):
        if x.shape[0] == self.refuse_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.captions.append(captions)
        return self.model(x, t, captions, lengths)


def test_seed_variety_perturbs_only_the_first_evaluations_deterministically(components):
    _, (transformer, encoder, _), _ = components
    cond, seeds = encoder.encode(["dance monkey", "dance monkey"]), [11, 12]
    varied = vary(cond, seeds, 0.5)
    assert torch.equal(varied.features, vary(cond, seeds, 0.5).features)  # a seed always gives the same noise
    assert not torch.equal(varied.features[0], varied.features[1])  # and different seeds different noise
    rms = cond.features[0, : cond.lengths[0]].square().mean().sqrt()
    jitter = (varied.features[0, : cond.lengths[0]] - cond.features[0, : cond.lengths[0]]).square().mean().sqrt()
    assert 0.4 < jitter / rms < 0.6 and not varied.features[0, cond.lengths[0] :].any()
    spy = Spy(transformer)
    start = noise((16, 8, 8), seeds)
    out = sample(spy, start, cond, schedule=sigmas(4), variety=(varied, 2))
    assert [torch.equal(c, varied.features) for c in spy.captions] == [True, True, False, False]
    assert not torch.allclose(out, sample(transformer, start, cond, schedule=sigmas(4)))
    assert torch.equal(sample(transformer, start, cond, schedule=sigmas(4), variety=(vary(cond, seeds, 0.0), 2)),
                       sample(transformer, start, cond, schedule=sigmas(4)))  # fmt: skip


def test_guidance_runs_cond_and_uncond_apart_when_the_batch_does_not_fit(components):
    _, (transformer, encoder, _), _ = components
    cond, uncond = encoder.encode(["dance monkey"]), encoder.encode(["bad quality, blurry and dark"])
    start = noise((16, 8, 8), [2])
    together = sample(transformer, start, cond, uncond, sigmas(3), 2.0)
    apart = sample(Spy(transformer, refuse_batch=2), start, cond, uncond, sigmas(3), 2.0)
    assert (apart - together).abs().max() <= 1e-4
