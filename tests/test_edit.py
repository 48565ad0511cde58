"""Edit conditioning equals diffusers' ZImageOmniPipeline on the same tiny random components and seed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline
from helpers import QWEN3_TINY, REAL, VAE_TINY, randomize_, reference_qwen3, reference_transformer, reference_vae
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

from zimage_core.checkpoint import CheckpointError
from zimage_core.edit import (
    EditConditioning,
    encode_prompts,
    prepare_references,
    reference_latents,
    segments,
    siglip_features,
)
from zimage_core.loaders import load_siglip, load_text_encoder, load_transformer, load_vae
from zimage_core.pipeline import Models, generate
from zimage_core.sampling import PATCH, denoise
from zimage_core.text_encoder import BUNDLED_TOKENIZER, Embeddings, load_tokenizer, tokenize

# diffusers' pipeline-test transformer with SigLIP weights; a table that covers SigLIP's rescaled ids
OMNI_TRANSFORMER = dict(REAL, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                        axes_dims=[8, 4, 4], axes_lens=[256, 64, 64], siglip_feat_dim=32)  # fmt: skip
SIGLIP_TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_channels": 3, "patch_size": 8, "num_patches": 16}  # fmt: skip


def test_template_pieces_tokenize_as_the_reference_ids():
    """Ids the reference feeds its text encoder for one image and "a cat" (and its empty negative)."""
    tok = load_tokenizer()
    ids = [tokenize(tok, [piece], None, "{}").ids[0].tolist() for piece in segments("a cat", 1)]
    assert ids == [[151644, 872, 198, 151652], [151653, 64, 8251, 151645, 198, 151644, 77091, 198, 151652],
                   [151653, 151645]]  # fmt: skip
    assert tokenize(tok, [segments("", 2)[2]], None, "{}").ids[0].tolist() == [151653, 151645, 198, 151644, 77091,
                                                                                 198, 151652]  # fmt: skip
    assert segments("x", 0) == ["<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    transformer = reference_transformer(OMNI_TRANSFORMER, seed=0)
    text_encoder = reference_qwen3(QWEN3_TINY, seed=1)
    vae = reference_vae(VAE_TINY, seed=2)
    for name, model in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        model.save_pretrained(root / name)
    with torch.device("meta"):
        siglip = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP_TINY))
    siglip = randomize_(siglip.to_empty(device="cpu"), seed=3).eval()
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    siglip.save_pretrained(root / "siglip")
    processor.save_pretrained(root / "siglip_processor")
    pipe = ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.to(torch.bfloat16),  # the reference encodes references in bf16 and requires a bf16 VAE
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)),
        transformer=transformer,
        siglip=siglip,
        siglip_processor=processor,
    )
    ours = (
        load_transformer(root / "transformer", dtype=torch.float32),
        load_text_encoder(root / "text_encoder", dtype=torch.float32),
        load_vae(root / "vae", dtype=torch.bfloat16),
        siglip,
        processor,
    )
    return pipe, ours, root


def pictures(n):
    rng = np.random.RandomState(0)
    sizes = [(90, 70), (66, 75), (80, 96)]
    return [Image.fromarray(rng.randint(0, 255, (*sizes[i], 3), dtype=np.uint8)) for i in range(n)]


def run_both(components, n_images, scale, captions_from_reference=False):
    """The reference's latents and image, and ours, for the same references, prompt and seed."""
    pipe, (transformer, encoder, vae, siglip, processor), _ = components
    images, prompt, steps, seed = pictures(n_images), "make it a watercolour painting", 3, 7
    seen = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: seen.append(k) or forward(*a, **k)
    try:
        expected = {kind: pipe(image=list(images), prompt=prompt, negative_prompt=None, num_inference_steps=steps,
                               guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
                               output_type=kind, max_sequence_length=512).images for kind in ("latent", "np")}  # fmt: skip
    finally:
        pipe.transformer.forward = forward

    resized, cropped = prepare_references(images, vae.cfg.factor * PATCH)
    refs = reference_latents(vae, cropped)
    features = siglip_features(siglip, processor, resized)
    if captions_from_reference:  # the reference's own caption features (its first call: prompt, then negative)
        items = [[seg.float() for seg in item] for item in seen[0]["cap_feats"]]
        rows = [torch.cat(item) for item in items]
        feats = torch.stack([F.pad(r, (0, 0, 0, max(map(len, rows)) - len(r))) for r in rows])
        both = Embeddings(feats, tuple(tuple(len(seg) for seg in item) for item in items), (0,) * len(items))
        cond = Embeddings(both.features[:1], both.lengths[:1], (0,))
        uncond = Embeddings(both.features[1:], both.lengths[1:], (0,)) if scale > 0 else None
    else:
        cond = encode_prompts(encoder, [prompt], n_images)
        uncond = encode_prompts(encoder, [""], n_images) if scale > 0 else None
    shape = (16, *refs[-1].shape[2:])  # the output takes the last reference's size
    cond = EditConditioning(cond, refs, features)
    latents = denoise(transformer, cond, uncond, [seed], steps, scale + 1, shape=shape, factor=vae.cfg.factor)
    image = vae.decode(vae.cfg.denormalize(latents.to(vae.dtype))).numpy()  # as the reference: in the VAE's dtype
    return (latents, image), (expected["latent"], expected["np"])


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_edit_equals_diffusers_omni_pipeline(components, n_images, scale):
    """End to end. Our caption features differ from the reference's by ~1e-6 (it runs Qwen3 on every piece padded
    to 512 tokens; we do not pad), which flips the bf16 rounding of a few latents before its bf16 VAE decode."""
    (latents, image), (expected_latents, expected_image) = run_both(components, n_images, scale)
    assert (latents - expected_latents).abs().max() <= 1e-4
    difference = np.abs(image - expected_image) * 255  # only where a latent's bf16 rounding flipped: a few /255
    assert difference.max() <= 8 and difference.mean() <= 1, (difference.max(), difference.mean())


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_edit_with_the_references_caption_features_makes_its_image(components, n_images, scale):
    """Everything after text encoding (references, SigLIP, transformer, sampling, decode) against the reference."""
    (latents, image), (expected_latents, expected_image) = run_both(components, n_images, scale, True)
    assert (latents - expected_latents).abs().max() <= 1e-4
    assert np.abs(image - expected_image).max() * 255 <= 2, np.abs(image - expected_image).max() * 255


def test_siglip_loads_from_a_folder_a_pipeline_folder_and_a_single_file(tmp_path):
    """The same features from transformers' own save, a pipeline's siglip/ + siglip_processor/, and one file with
    a full SigLIP2's `vision_model.` names and pooling head (the head is never loaded)."""
    config = Siglip2VisionConfig(
        **{**SIGLIP_TINY, "num_attention_heads": 2, "hidden_size": 128, "intermediate_size": 64}
    )
    with torch.device("meta"):
        model = Siglip2VisionModel(config)
    model = randomize_(model.to_empty(device="cpu"), seed=5).eval()
    model.save_pretrained(tmp_path / "folder")
    model.save_pretrained(tmp_path / "pipe" / "siglip")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path / "pipe" / "siglip_processor")
    save_file(
        {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "siglip2.safetensors"
    )
    image = pictures(1)[0]
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    (expected,) = siglip_features(model, processor, [image])
    for path in (tmp_path / "folder", tmp_path / "pipe", tmp_path / "siglip2.safetensors"):
        loaded, loaded_processor = load_siglip(path)
        if path.name == "pipe":
            assert loaded_processor.max_num_patches == 16
        (got,) = siglip_features(loaded, processor, [image])
        assert torch.equal(got, expected), path
    assert load_siglip(tmp_path / "siglip2.safetensors")[0].config.num_attention_heads == 2  # 128 / 64


def test_a_file_that_is_not_siglip_is_refused(tmp_path):
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="not a SigLIP2 vision encoder"):
        load_siglip(tmp_path / "ae.safetensors")


def test_generate_edits_as_the_omni_pipeline_from_files(components):
    """`generate(references=...)`: every model loaded from its saved folder, the size from the last reference."""
    pipe, _, root = components
    images, prompt = pictures(2), "put the two together on a beach"
    expected = pipe(image=list(images), prompt=prompt, num_inference_steps=3, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(4), output_type="np").images  # fmt: skip
    models = Models(root / "transformer", root / "text_encoder", root / "vae", siglip=root / "siglip")
    # the reference runs its VAE in bf16; ours defaults to fp32 (as the nodes), so ask for bf16
    result = generate(models, [prompt], steps=3, cfg=3.0, seeds=[4], dtype=torch.float32, references=images,
                      vae_dtype=torch.bfloat16)  # fmt: skip
    assert result.images.shape == expected.shape
    difference = np.abs(result.images.numpy() - expected) * 255
    assert difference.max() <= 8 and difference.mean() <= 1, (difference.max(), difference.mean())


def test_edit_needs_an_omni_transformer_and_siglip(components, tmp_path):
    _, _, root = components
    plain = reference_transformer(dict(OMNI_TRANSFORMER, siglip_feat_dim=None))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not an Omni/Edit transformer"):
        generate(Models(tmp_path / "plain", root / "text_encoder", root / "vae", siglip=root / "siglip"), ["x"],
                 steps=1, dtype=torch.float32, references=pictures(1))  # fmt: skip
    with pytest.raises(CheckpointError, match="no siglip given: pass --siglip"):
        generate(Models(root / "transformer", root / "text_encoder", root / "vae"), ["x"], steps=1,
                 dtype=torch.float32, references=pictures(1))  # fmt: skip
    with pytest.raises(CheckpointError, match="not a SigLIP2 vision encoder"):
        generate(Models(root / "transformer", root / "text_encoder", root / "vae", siglip=root / "vae"), ["x"],
                 steps=1, dtype=torch.float32, references=pictures(1))  # fmt: skip


def test_seed_variety_is_refused_with_edit_conditioning(components):
    _, (transformer, encoder, vae, siglip, processor), _ = components
    resized, cropped = prepare_references(pictures(1), vae.cfg.factor * PATCH)
    edit = EditConditioning(encode_prompts(encoder, ["x"], 1), reference_latents(vae, cropped),
                            siglip_features(siglip, processor, resized))  # fmt: skip
    with pytest.raises(ValueError, match="seed variety"):
        denoise(transformer, edit, None, [0], 2, shape=(16, 8, 8), variety=0.5)
