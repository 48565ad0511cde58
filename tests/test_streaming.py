"""Blocks streamed from host memory within a VRAM budget (zimage_core/streaming.py): the same outputs as the
resident model, never more than the budget held, each block's copy started while the one before it computes.

On this CPU the "device" copies are plain copies, so what is tested is the bookkeeping (which blocks stay, which
stream, when each copy starts and ends, the bytes held); the side stream and pinned memory are the GPU's part,
and the time streaming costs there is unmeasured here.
"""

import pytest
import torch
from conftest import rel_err
from helpers import QWEN3_SMALL, SMALL, make_inputs, reference_qwen3, reference_transformer, to_comfy, write_file

from zimage_core import pipeline, streaming
from zimage_core.loaders import load_text_encoder, load_transformer
from zimage_core.speed import Speed

DEEP = dict(SMALL, n_layers=10, cap_feat_dim=32)  # more blocks than a budget holds; the tiny text encoder's width


def budget_for(model, resident_blocks: int, ahead: int = 1) -> tuple[int, list[int], int]:
    """A budget that leaves room for the first `resident_blocks` blocks beside the `ahead` + 1 in flight (room for
    the largest each); the block sizes in run order, and what the rest of the model holds."""
    sizes = [streaming.nbytes((*b.parameters(), *b.buffers())) for b in streaming.block_lists(model)]
    fixed = streaming.nbytes((*model.parameters(), *model.buffers())) - sum(sizes)
    return fixed + (ahead + 1) * max(sizes) + sum(sizes[:resident_blocks]), sizes, fixed


@pytest.fixture(scope="module")
def deep_file(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("deep") / "z_image_turbo_deep.safetensors",
                      to_comfy(reference_transformer(DEEP, seed=4).state_dict()))  # fmt: skip


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_streamed_transformer_predicts_as_the_resident_one_within_its_budget(deep_file, ahead):
    inputs = make_inputs(DEEP, (16, 24), [20, 13], seed=2)
    resident = load_transformer(deep_file, dtype=torch.float32)
    model = load_transformer(deep_file, dtype=torch.float32)
    budget, sizes, fixed = budget_for(model, resident_blocks=2, ahead=ahead)
    streaming.stream(model, "cpu", budget / streaming.GB, ahead)
    streamer = model.streamer
    n = len(streaming.block_lists(model))
    assert len(streamer.streamed) == n - 2  # two kept on the device, the rest streamed
    with torch.no_grad():
        for step in range(2):  # a second step reuses what the first left in flight
            x, t, cap, _ = inputs
            t = t * (step + 1) / 2
            assert rel_err(model(x, t, cap, [20, 13]), resident(x, t, cap, [20, 13])) <= 1e-6, step
    in_flight = sizes[2 : 2 + ahead]  # the next step's first blocks, fetched as the last one ran
    assert streamer.peak <= budget and streamer.held == fixed + sum(sizes[:2]) + sum(in_flight)
    runs = [i for what, i in streamer.log if what == "run"]
    assert runs == list(range(len(streamer.streamed))) * 2
    for k, (what, i) in enumerate(streamer.log):
        if what == "run":  # the next `ahead` blocks' copies are started before this one is dropped
            dropped = streamer.log.index(("drop", i), k)
            started = {j for w, j in streamer.log[:dropped] if w == "copy"}
            assert {(i + d) % len(streamer.streamed) for d in range(1, ahead + 1)} <= started, (i, streamer.log)
    # one copy per run of each block: the first on demand, the others fetched ahead (the last, for the next step)
    assert streamer.log[0] == ("copy", 0) and streamer.log.count(("copy", 0)) == 3
    assert all(streamer.log.count(("copy", i)) == 2 for i in range(ahead, len(streamer.streamed)))


def test_a_budget_too_small_to_stream_is_refused_with_the_sizes(deep_file):
    model = load_transformer(deep_file, dtype=torch.float32)
    budget = budget_for(model, resident_blocks=0)[0]
    with pytest.raises(ValueError, match=r"a VRAM budget of .* GB is below what streaming this model needs: .* GB for "
                                         r"its other parts and .* GB for 2 blocks in flight"):  # fmt: skip
        streaming.stream(model, "cpu", (budget - 1) / streaming.GB)
    with pytest.raises(ValueError, match="VRAM budget -1 GB: give a positive number"):
        Speed(vram=-1)


def test_a_streamed_text_encoder_encodes_as_the_resident_one(tmp_path):
    config = dict(QWEN3_SMALL, num_hidden_layers=6)
    sd = {"model." + k: v for k, v in reference_qwen3(config).state_dict().items()}
    path = write_file(tmp_path / "qwen_3_4b.safetensors", sd)
    prompts = ["a lighthouse in a storm", "一只猫"]
    expected = load_text_encoder(path, "cpu", torch.float32).encode(prompts).features
    encoder = load_text_encoder(path, "cpu", torch.float32)
    budget = budget_for(encoder, resident_blocks=0)[0]
    streaming.stream(encoder, "cpu", budget / streaming.GB)
    assert len(encoder.streamer.streamed) == 5  # of 6: the last layer is never read
    assert rel_err(encoder.encode(prompts).features, expected) <= 1e-6
    assert encoder.streamer.peak <= budget


def test_generate_with_a_vram_budget_gives_the_resident_image(deep_file, monkeypatch):
    """The pipeline loads into host memory and streams the transformer (the tiny text encoder fits whole), and
    gives the image it gives with everything resident; prompts and negatives encode in one pass."""
    streamers = []
    init = streaming.Streamer.__init__
    monkeypatch.setattr(
        streaming.Streamer, "__init__", lambda self, *a, **k: streamers.append(self) or init(self, *a, **k)
    )
    models = pipeline.Models(deep_file, pipeline.TINY_RANDOM, pipeline.TINY_RANDOM)
    args = {"prompts": ["a cat"], "negatives": ["blurry"], "width": 64, "height": 48, "steps": 2, "cfg": 3.0,
            "seeds": [1], "dtype": torch.float32}  # fmt: skip
    plain = pipeline.generate(models, **args)
    probe = load_transformer(deep_file, dtype=torch.float32)
    encoder = pipeline.tiny_random("text_encoder", "cpu", torch.float32)
    budget = max(budget_for(probe, 1)[0], streaming.nbytes((*encoder.parameters(), *encoder.buffers())))
    assert budget < streaming.nbytes((*probe.parameters(), *probe.buffers())) // 2
    streamed = pipeline.generate(models, **args, speed=Speed(vram=budget / streaming.GB))
    assert len(streamers) == 1 and streamers[0].peak <= budget
    assert rel_err(streamed.latents, plain.latents) <= 1e-5
