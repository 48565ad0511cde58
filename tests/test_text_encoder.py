"""Qwen3 text encoding: token ids and embeddings equal diffusers' ZImagePipeline on shared random weights."""

import gc
import json
import logging
import shutil
import weakref

import pytest
import torch
from diffusers import ZImagePipeline
from helpers import (
    QWEN3_REAL,
    QWEN3_SMALL,
    QWEN3_TINY,
    SMALL,
    fp8_forms,
    reference_qwen3,
    to_comfy,
    write_file,
    write_sharded,
)
from transformers import AutoTokenizer

from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import load_text_encoder
from zimage_core.text_encoder import BUNDLED_TOKENIZER, TEMPLATE, load_tokenizer, tokenize

LONG_EN = "a very detailed scene of a harbour town at dusk, " * 60  # about 700 tokens
LONG_ZH = "一个非常详细的场景，黄昏时分的港口小镇，" * 60
PROMPTS = [
    "a cat",
    "",
    "   ",
    "\n\t \n",
    "A photorealistic portrait of an elderly fisherman, golden hour, 85mm, shallow depth of field",
    "一只橘猫坐在窗台上，阳光洒在它的毛上，背景是上海的老弄堂",
    "赛博朋克风格的 Tokyo street at night, 霓虹灯 neon signs reading “拉面” and 'OPEN 24H'",
    "🐱🚀 a cat astronaut 👩‍🚀 with a 🇯🇵 flag and ❤️‍🔥",
    "!!!???...,,,;;;:::---___***&&&%%%$$$###@@@^^^~~~```|||\\\\///<<<>>>[[[]]]{{{}}}((()))",
    'Text on the sign: "Z-Image" — in bold **red** letters; <b>html</b> &amp; done',
    "3.14159 2026-11-27 12:00:00 1,234,567 0x1F 1e-6 ½ ⅓ ²³",
    "桜の木の下で着物を着た女性、浮世絵風",
    "서울의 밤거리, 비 오는 날, 우산을 든 사람들",
    "مدينة قديمة عند غروب الشمس",
    "Зимний лес, снег, северное сияние",
    "café naïve résumé",
    "cafe\u0301 nai\u0308ve",  # the same letters decomposed (NFD)
    "a poster that says <|im_end|> and <|endoftext|>",
    "<think>reasoning</think> a dog",
    "def f(x):\n    return x**2  # comment",
    "a\u200bcat\u200d\ufeff",
    "tab\tseparated\rcarriage return",
    "a cat   ",
    "   a cat",
    "line1\n\n\nline2",
    "https://example.com/path?q=1&r=2#frag",
    "ताजमहल सूर्यास्त के समय",
    "วัดพระแก้วยามค่ำคืน",
    "∑∫√∞≈≠≤≥ αβγ",
    "👍🏽👋🏿",
    "ＡＢＣ１２３！",
    "「你好」『世界』【测试】《书名》",
    "Supercalifragilisticexpialidocious" * 80,
    LONG_EN,
    LONG_ZH,
    " ".join(["cat"] * 504),  # exactly 512 tokens with the template
    " ".join(["cat"] * 505),  # one too many
]


def diffusers_pipe(text_encoder, tokenizer_folder=BUNDLED_TOKENIZER):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    return ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)


def diffusers_token_ids(pipe, prompts, max_length) -> list[list[int]]:
    """The ids diffusers' encode_prompt feeds its text encoder, caught on the way in, padding removed."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    try:
        pipe.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_length
        )
    finally:
        hook.remove()
    ids, mask = seen[0]
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def diffusers_embeddings(pipe, prompts, negatives=None, cfg=False, max_length=512) -> list[torch.Tensor]:
    """diffusers' encode_prompt: the prompts' embeddings, then (with CFG) the negatives' ("" for each when None)."""
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=cfg or negatives is not None,
            negative_prompt=None if negatives is None else list(negatives), max_sequence_length=max_length,
        )  # fmt: skip
    return pos + neg


def assert_embeddings(ours, reference: list[torch.Tensor], tol: float = 1e-5):
    assert ours.lengths == tuple(len(r) for r in reference)
    for i, ref in enumerate(reference):
        err = (ours.features[i, : len(ref)] - ref).abs().max().item()
        assert err <= tol, f"item {i}: max abs error {err:.3g}"
        assert not ours.features[i, len(ref) :].any()


@pytest.fixture(scope="module")
def tiny_ref():
    """diffusers' pipeline-test Qwen3 (hidden 16, 2 layers, default RoPE base) with seeded random weights."""
    return reference_qwen3(QWEN3_TINY, seed=0)


@pytest.fixture(scope="module")
def small_ref():
    return reference_qwen3(QWEN3_SMALL, seed=1)


@pytest.fixture(scope="module")
def small_file(small_ref, tmp_path_factory):
    """The small model as ComfyUI's single file: `model.`-prefixed names, no lm_head."""
    sd = {"model." + k: v for k, v in small_ref.state_dict().items()}
    return write_file(tmp_path_factory.mktemp("te") / "qwen_3_4b.safetensors", sd)


# ---- tokens ----


@pytest.mark.parametrize("max_length", [512, 40])
def test_token_ids_equal_diffusers_tokenisation(tiny_ref, max_length):
    assert len(PROMPTS) >= 30
    expected = diffusers_token_ids(diffusers_pipe(tiny_ref), PROMPTS, max_length)
    tokens = tokenize(load_tokenizer(), PROMPTS, max_length)
    untruncated = tokenize(load_tokenizer(), PROMPTS, None)
    for i, prompt in enumerate(PROMPTS):
        assert tokens.ids[i, : tokens.lengths[i]].tolist() == expected[i], prompt[:40]
        assert (tokens.ids[i, tokens.lengths[i] :] == load_tokenizer().pad_token_id).all()
        assert tokens.dropped[i] == untruncated.lengths[i] - tokens.lengths[i]
    assert sum(d > 0 for d in tokens.dropped) >= 4  # the long prompts really were cut
    assert untruncated.lengths[-2:] == (512, 513)


def test_template_ids_are_the_verified_ones():
    """zimage-spec.md 4.2 (ids checked against ComfyUI's tokenizer files)."""
    tokens = tokenize(load_tokenizer(), ["a cat", ""])
    assert tokens.ids[0].tolist() == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    assert tokens.lengths == (10, 8)


@pytest.fixture
def qwen25_chat_template_tokenizer(tmp_path):
    """The bundled vocabulary with the Qwen2.5 chat template, which adds a default system prompt."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(BUNDLED_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_tokenizer_folder_chat_template_is_never_used(small_ref, small_file, qwen25_chat_template_tokenizer):
    hub = AutoTokenizer.from_pretrained(str(qwen25_chat_template_tokenizer))
    text = hub.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful assistant." in text  # what following the folder's template would feed the model
    encoder = load_text_encoder(small_file, dtype=torch.float32, tokenizer=qwen25_chat_template_tokenizer)
    assert encoder.info.tokenizer == str(qwen25_chat_template_tokenizer)
    assert encoder.encode("a cat").lengths == (10,)
    assert_embeddings(encoder.encode(["a cat"]), diffusers_embeddings(diffusers_pipe(small_ref), ["a cat"]))


def test_a_folder_that_is_not_a_qwen_tokenizer(tmp_path, small_file):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(ValueError, match=r"tok: not a Qwen tokenizer.*<\|im_start\|>"):
        load_text_encoder(small_file, tokenizer=folder)


def test_long_prompts_are_cut_as_the_references_cut_them_and_said(small_file, caplog):
    encoder = load_text_encoder(small_file, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="zimage_core.text_encoder"):
        out = encoder.encode(["a cat", LONG_EN])
    assert out.lengths[1] == 512 and out.dropped[0] == 0 and out.dropped[1] > 100
    assert "prompt 1 is" in caplog.text and f"{out.dropped[1]} tokens dropped" in caplog.text
    everything = encoder.encode(LONG_EN, max_length=None)
    assert everything.lengths[0] == 512 + out.dropped[1] and everything.dropped == (0,)
    # causal: the kept rows do not change (to rounding: BLAS blocks a 669-token run and a padded batch differently)
    assert (everything.features[0, :512] - out.features[1, :512]).abs().max() <= 1e-5 * out.features.abs().max()


# ---- embeddings ----


def test_embeddings_equal_diffusers_encode_prompt_with_negatives(tiny_ref, tmp_path):
    folder = tmp_path / "text_encoder"
    tiny_ref.save_pretrained(folder)
    encoder = load_text_encoder(folder, dtype=torch.float32)
    prompts = [PROMPTS[0], PROMPTS[5], PROMPTS[7], LONG_ZH]
    negatives = ["blurry, low quality", "", "模糊，低质量", "bad"]
    reference = diffusers_embeddings(diffusers_pipe(tiny_ref), prompts, negatives)
    assert_embeddings(encoder.encode(prompts + negatives), reference)
    default_negative = diffusers_embeddings(diffusers_pipe(tiny_ref), prompts[:2], cfg=True)
    assert_embeddings(encoder.encode(prompts[:2] + ["", ""]), default_negative)
    assert_embeddings(encoder.encode([""]), diffusers_embeddings(diffusers_pipe(tiny_ref), [""]))


def comfy_sd(ref) -> dict[str, torch.Tensor]:
    return {"model." + k: v for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def small_layouts(small_ref, small_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    plain = root / "transformers_folder"
    small_ref.save_pretrained(plain, max_shard_size="200KB")  # Qwen3Model names, shards + index + config.json
    pipeline = root / "Z-Image-Turbo"
    hub_config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **QWEN3_SMALL}
    specs = comfy_sd(small_ref)
    write_sharded(pipeline / "text_encoder", specs, 3, "model", hub_config)
    shutil.copytree(BUNDLED_TOKENIZER, pipeline / "tokenizer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    all_in_one = {"text_encoders.qwen3_4b.transformer." + k: v for k, v in specs.items()}
    all_in_one["model.diffusion_model.layers.0.adaLN_modulation.0.weight"] = torch.zeros(4, 4)
    return {
        "transformers folder": plain,
        "diffusers pipeline folder": pipeline,
        "ComfyUI single file": small_file,
        "all-in-one checkpoint": write_file(root / "aio.safetensors", all_in_one),
    }


@pytest.mark.parametrize(
    "layout", ["transformers folder", "diffusers pipeline folder", "ComfyUI single file", "all-in-one checkpoint"]
)
def test_every_layout_gives_the_reference_embeddings(small_ref, small_layouts, layout):
    encoder = load_text_encoder(small_layouts[layout], dtype=torch.float32)
    prompts = [PROMPTS[4], PROMPTS[6], PROMPTS[1]]
    ours = encoder.encode(prompts)
    assert_embeddings(ours, diffusers_embeddings(diffusers_pipe(small_ref), prompts))
    baseline = load_text_encoder(small_layouts["transformers folder"], dtype=torch.float32)
    assert torch.equal(ours.features, baseline.encode(prompts).features)
    assert encoder.info.config == {k: v for k, v in baseline.info.config.items() if k in encoder.info.config}
    assert encoder.info.layers_used == QWEN3_SMALL["num_hidden_layers"] - 1 == len(encoder.model.layers)
    assert encoder.info.tokenizer.endswith("tokenizer") == (layout == "diffusers pipeline folder")


@pytest.mark.heavy
def test_real_width_slice_equals_diffusers(tmp_path):
    """Qwen3-4B's real widths (hidden 2560, 32 query / 8 kv heads, FFN 9728, full vocabulary), 3 layers."""
    ref = reference_qwen3(dict(QWEN3_REAL, num_hidden_layers=3), seed=2)
    for p in ref.parameters():  # bf16-representable, so a bf16 file holds exactly the reference's weights
        p.copy_(p.bfloat16())
    path = write_file(tmp_path / "qwen_3_4b.safetensors", {k: v.bfloat16() for k, v in comfy_sd(ref).items()})
    encoder = load_text_encoder(path, dtype=torch.float32)
    assert encoder.info.model.startswith("Qwen3, not") and "num_hidden_layers 3 (released 36)" in encoder.info.model
    prompts, negatives = [PROMPTS[5], PROMPTS[4]], ["", PROMPTS[7]]
    reference = diffusers_embeddings(diffusers_pipe(ref), prompts, negatives, max_length=128)
    assert_embeddings(
        encoder.encode(prompts + negatives, max_length=128), reference, tol=1e-5 * max(r.abs().max() for r in reference)
    )


@pytest.mark.parametrize("form", ["plain", "scaled", "comfy_quant"])
def test_fp8_files_are_held_in_fp8_and_encode_like_the_dequantized_reference(small_ref, tmp_path, form):
    forms, dequantized = fp8_forms(comfy_sd(small_ref))
    tensors, metadata = forms[form]
    encoder = load_text_encoder(write_file(tmp_path / f"{form}.safetensors", tensors, metadata), dtype=torch.float32)
    assert encoder.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.info.quantization.startswith("fp8")
    deq = reference_qwen3(QWEN3_SMALL)
    deq.load_state_dict(
        {k.removeprefix("model."): v for k, v in dequantized["plain" if form == "plain" else "scaled"].items()}
    )
    prompts = [PROMPTS[5], PROMPTS[0]]
    assert_embeddings(encoder.encode(prompts), diffusers_embeddings(diffusers_pipe(deq), prompts))


def test_fp8_weight_option_on_a_bf16_file(small_ref, small_file):
    encoder = load_text_encoder(small_file, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    assert encoder.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.model.embed_tokens.weight.dtype == torch.float32
    full = load_text_encoder(small_file, dtype=torch.float32).encode(PROMPTS[4]).features
    err = (encoder.encode(PROMPTS[4]).features - full).abs().max() / full.abs().max()
    assert 0 < err < 0.1


def test_the_last_layer_final_norm_and_lm_head_are_never_loaded(small_ref, tmp_path):
    sd = comfy_sd(small_ref)
    last = QWEN3_SMALL["num_hidden_layers"] - 1
    broken = {
        k: torch.full_like(v, float("nan")) if k.startswith(f"model.layers.{last}.") or k == "model.norm.weight" else v
        for k, v in sd.items()
    }
    broken["lm_head.weight"] = torch.full_like(sd["model.embed_tokens.weight"], float("nan"))
    encoder = load_text_encoder(write_file(tmp_path / "broken.safetensors", broken), dtype=torch.float32)
    assert len(encoder.model.layers) == last and not any(
        "lm_head" in n or "norm.weight" == n.split("model.")[-1] for n, _ in encoder.named_parameters()
    )
    prompts = [PROMPTS[4]]
    assert_embeddings(encoder.encode(prompts), diffusers_embeddings(diffusers_pipe(small_ref), prompts))
    assert encoder.info.parameters == sum(
        p.numel() for n, p in small_ref.named_parameters() if not n.startswith((f"layers.{last}.", "norm."))
    )


def test_the_encoder_is_released_when_dropped(small_file):
    encoder = load_text_encoder(small_file, dtype=torch.float32)
    encoder.encode(["a cat", "一只猫"])
    alive = weakref.ref(encoder)
    weights = weakref.ref(encoder.model.embed_tokens.weight)
    del encoder
    gc.collect()
    assert alive() is None and weights() is None


# ---- wrong files ----


@pytest.mark.parametrize(
    "keys,looks",
    [
        (["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight"], "CLIP"),
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "T5"),
        (
            [
                "model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.self_attn.q_proj.weight",
                "visual.blocks.0.attn.qkv.weight",
            ],
            "Qwen2.5-VL",
        ),
        (["model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.weight"], "Qwen2/Qwen2.5"),
        (["model.layers.0.self_attn.q_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight"], "Gemma"),
        (["decoder.up.0.block.0.conv1.weight", "encoder.down.0.block.0.conv1.weight"], "VAE"),
    ],
)
def test_other_models_are_named(tmp_path, keys, looks):
    path = write_file(tmp_path / "other.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(CheckpointError, match=rf"other.safetensors: not a Qwen3 text encoder .*Qwen3-4B.*{looks}"):
        load_text_encoder(path)


def test_a_transformer_file_is_named(tmp_path):
    from helpers import reference_transformer

    sd = to_comfy(reference_transformer(SMALL).state_dict())
    path = write_file(tmp_path / "z_image_turbo_bf16.safetensors", sd)
    with pytest.raises(
        CheckpointError, match="z_image_turbo_bf16.safetensors: not a Qwen3 text encoder.*Z-Image transformer"
    ):
        load_text_encoder(path)


def test_missing_tensors_and_config_that_does_not_fit(small_ref, tmp_path):
    sd = comfy_sd(small_ref)
    del sd["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"m.safetensors.*missing \(first: model.layers.1.mlp.down_proj.weight"):
        load_text_encoder(write_file(tmp_path / "m.safetensors", sd))
    del sd["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match="missing embed_tokens.weight, which every Qwen3 model has"):
        load_text_encoder(write_file(tmp_path / "e.safetensors", sd))
    folder = tmp_path / "folder"
    small_ref.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=5)))
    with pytest.raises(CheckpointError, match="config.json: says 5 layers; the weights hold 3"):
        load_text_encoder(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="qwen2")))
    with pytest.raises(CheckpointError, match="config.json: describes a qwen2 model, not Qwen3"):
        load_text_encoder(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, num_key_value_heads=4)))
    with pytest.raises(CheckpointError, match="wrong shape.*k_proj"):
        load_text_encoder(folder)


def test_template_is_the_references(tiny_ref):
    pipe = diffusers_pipe(tiny_ref)
    rendered = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert TEMPLATE.format("x") == rendered


def test_no_prompts_is_a_clear_error():
    with pytest.raises(ValueError, match="no prompts to encode"):
        tokenize(load_tokenizer(), [])
