"""GGUF files of the transformer (city96's ComfyUI-GGUF layout: ComfyUI's tensor names, arch `lumina2`) and of
Qwen3 (llama.cpp's names, arch `qwen3`), written with the `gguf` package. Our torch dequantization must equal
gguf-py's bit for bit, and models loaded from the files must compute like the same model holding gguf-py's
dequantized weights. gguf-py quantizes the legacy types (Q4_0 to Q8_0) itself; for the K and IQ types it has only
the dequantizer, so those files hold random blocks with sane scales (tests/helpers.py `RANDOM_BLOCKS`)."""

import gguf
import numpy as np
import pytest
import torch
from helpers import (
    QWEN3_SMALL,
    RANDOM_BLOCKS,
    SMALL,
    gguf_quantize,
    is_block_linear,
    llama_cpp_names,
    make_inputs,
    reference_qwen3,
    to_comfy,
    write_file,
    write_gguf,
)

from zimage_core import ggml
from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import components, load_text_encoder, load_transformer


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("kind", list(ggml.BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_gguf_pys_bit_for_bit(kind, dtype):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(len(kind))) * 0.02
    data, reference = gguf_quantize(w, kind, seed=3)
    ours = ggml.dequantize(torch.from_numpy(np.ascontiguousarray(data)), kind, (48, 512), dtype)
    assert ours.dtype == dtype and ours.shape == (48, 512)
    assert torch.equal(ours, reference.to(dtype))
    if kind not in RANDOM_BLOCKS:  # a real quantization of `w`, not random blocks
        assert rel(ours.float(), w) < 0.2


@pytest.fixture(scope="module")
def small_sd(small_ref):
    return to_comfy(small_ref.state_dict())


@pytest.mark.parametrize("kind", list(ggml.BLOCKS))
def test_transformer_holds_the_blocks_and_computes_like_the_dequantized_reference(small_sd, tmp_path, kind):
    path, dequantized = write_gguf(
        tmp_path / f"z_image_turbo-{kind}.gguf", small_sd, lambda n: kind if is_block_linear(n) else "F16",
        "lumina2", shape_fix=kind.endswith("_K"),
    )  # fmt: skip
    ours = load_transformer(path, dtype=torch.float32)
    reference = load_transformer(write_file(tmp_path / "deq.safetensors", dequantized), dtype=torch.float32)
    qkv = ours.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.uint8 and qkv.quant.name == kind  # compact: dequantized per call
    assert ours.info.layout == "GGUF file" and ours.info.file_dtypes.get(kind)
    assert f"GGUF {kind}: " in ours.info.quantization
    assert ours.info.held_bytes < 0.6 * reference.info.held_bytes
    latents, t, captions, _ = make_inputs(SMALL, (16, 16), [7, 12], seed=3)
    with torch.no_grad():
        assert rel(ours(latents, t, captions, [7, 12]), reference(latents, t, captions, [7, 12])) <= 1e-5


# Hidden size 256, so the K types have whole blocks; the real vocabulary, for the bundled tokenizer.
QWEN3_GGUF = dict(QWEN3_SMALL, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "IQ4_XS"])
def test_qwen3_gguf_with_llama_cpp_names_encodes_like_the_dequantized_reference(tmp_path, kind):
    ref = reference_qwen3(QWEN3_GGUF, seed=2)
    sd = {"model." + k: v for k, v in ref.state_dict().items()}
    n_layers = QWEN3_GGUF["num_hidden_layers"]
    path, dequantized = write_gguf(
        tmp_path / f"Qwen3-4B-{kind}.gguf", llama_cpp_names(sd, n_layers), lambda n: kind, "qwen3"
    )
    assert components(path) == ["text_encoder"]
    ours = load_text_encoder(path, dtype=torch.float32)
    hf = dict(zip(llama_cpp_names(sd, n_layers), sd))  # back to transformers' names, for the reference file
    reference = load_text_encoder(
        write_file(tmp_path / "deq.safetensors", {hf[n]: w for n, w in dequantized.items()}), dtype=torch.float32
    )
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    embedding = ours.model.embed_tokens  # the table stays in blocks: a lookup dequantizes the rows it reads
    assert embedding.weight.dtype == torch.uint8
    ids = torch.tensor([[0, 7, 7, QWEN3_GGUF["vocab_size"] - 1], [3, 1, 4, 1]])
    assert torch.equal(embedding(ids), reference.model.embed_tokens(ids))  # the same values, row for row
    got, want = ours.encode("a red fox in the snow").features, reference.encode("a red fox in the snow").features
    assert rel(got, want) <= 1e-5


def test_unsupported_truncated_and_foreign_gguf_files_are_named(small_sd, tmp_path):
    path, _ = write_gguf(tmp_path / "tq.gguf", small_sd, lambda n: "Q8_0", "lumina2")
    raw = bytearray(path.read_bytes())
    code = gguf.GGMLQuantizationType.Q8_0.to_bytes(4, "little")
    name = b"layers.0.attention.qkv.weight"
    at = raw.index(code, raw.index(name) + len(name) + 4 + 8 * 2)  # the tensor's type, after its name and dims
    raw[at : at + 4] = gguf.GGMLQuantizationType.TQ2_0.to_bytes(4, "little")
    (tmp_path / "tq2.gguf").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"tq2\.gguf.*layers\.0\.attention\.qkv\.weight.*GGML TQ2_0.*Q4_K"):
        load_transformer(tmp_path / "tq2.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated: tensor .* fetch the file again"):
        load_transformer(tmp_path / "cut.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        load_transformer(tmp_path / "fake.gguf")
    (tmp_path / "v1.gguf").write_bytes(b"GGUF\x01\x00\x00\x00" + bytes(100))
    with pytest.raises(CheckpointError, match=r"v1\.gguf: GGUF version 1"):
        load_transformer(tmp_path / "v1.gguf")
    (tmp_path / "head.gguf").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"head\.gguf: truncated or corrupt GGUF header"):
        load_transformer(tmp_path / "head.gguf")
