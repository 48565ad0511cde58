"""The speed levers (issue 19): each is switchable, and its output stays within bf16 tolerance of the plain path.

The plain path is the fp32 model on this machine's default attention; a lever in bf16 may err against it no more
than the plain bf16 model does (with a floor of bf16's own rounding), and in fp32 it must agree to fp32 rounding.
The backends are tried on the CPU, where the tests' tensors are: the GPU-only kernels (cuDNN, memory-efficient,
FlashAttention, SageAttention) are tested by their refusals, auto's order per GPU generation and the packaged
kernels' glue with a stand-in; their numbers on a GPU are the bench's.
"""

import pytest
import torch
from conftest import rel_err
from helpers import SMALL, make_inputs

from zimage_core import attention as attn
from zimage_core.loaders import load_transformer
from zimage_core.speed import Speed

BF16_FLOOR = 1e-2  # bf16 keeps 8 bits: 2^-7 relative is its rounding step


def runnable(dtype: torch.dtype) -> list[str]:
    """The attention backends this machine runs in `dtype`."""
    ok = []
    for name in attn.BACKENDS:
        try:
            attn.attention(name, "cpu", dtype)
            ok.append(name)
        except ValueError:
            pass
    return ok


def reference_attention(q, k, v, mask):
    """Softmax(q k^T / sqrt(d)) v in float64, written out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_FLOOR)])
def test_every_attention_backend_this_machine_runs_computes_attention(dtype, tol):
    names = runnable(dtype)
    assert {"auto", "sdpa", "math", "flash"} <= set(names), names  # PyTorch's CPU kernels
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 70, 3, 128, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, 45:] = False  # the second item's caption is shorter
    for name in names:
        kernel = attn.attention(name, "cpu", dtype)
        for m in (None, mask):
            got = kernel(q, k, v, m)
            assert got.shape == (2, 70, 384) and got.dtype == dtype
            assert rel_err(got, reference_attention(q, k, v, m)) <= tol, (name, m is not None)


def test_attention_backends_that_cannot_run_here_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers': use one of auto, sdpa, cudnn"):
        attn.attention("xformers", "cpu", torch.float32)
    with pytest.raises(ValueError, match="attention 'cudnn' cannot run on cpu in torch.float32"):
        attn.attention("cudnn", "cpu", torch.float32)
    for name, package in (("flash-attn", "flash_attn"), ("sage", "sageattention")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(ValueError, match=f"attention '{name}' needs the {package} package"):
                attn.attention(name, "cpu", torch.bfloat16)


def test_auto_prefers_cudnn_on_hopper_and_leaves_the_order_to_pytorch_elsewhere(monkeypatch):
    """gpu-peers.md: on an H100 cuDNN attention is 1.9x flash and 3.6x memory-efficient."""
    assert attn.auto_order(torch.device("cpu")) == ()
    for capability, first in (((9, 0), "CUDNN_ATTENTION"), ((10, 0), "CUDNN_ATTENTION"), ((8, 9), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        order = attn.auto_order(torch.device("cuda"))
        assert (order[0] if order else None) == first, capability


def test_flash_attn_and_sage_get_their_layout_and_masked_batches_go_to_sdpa():
    """FlashAttention's and SageAttention's kernels take (B, S, heads, head_dim) and no key mask: a stand-in kernel
    that is plain attention sees unmasked calls only, and every call gives attention."""
    calls = []

    def kernel(q, k, v, **options):
        calls.append((q.shape, options))
        return reference_attention(q, k, v, None).unflatten(-1, (q.shape[2], -1)).to(q.dtype)

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 2, 64, generator=g) for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 33:] = False
    for m in (None, mask):
        got = attn.packaged(kernel, q, k, v, m, tensor_layout="NHD")
        assert rel_err(got, reference_attention(q, k, v, m)) <= 1e-5
    assert calls == [((2, 40, 2, 64), {"tensor_layout": "NHD"})]


@pytest.fixture(scope="module")
def small(small_folder):
    inputs = make_inputs(SMALL, (32, 48), [20, 45], seed=7)
    plain = load_transformer(small_folder, dtype=torch.float32)
    with torch.no_grad():
        exact = plain(inputs[0], inputs[1], inputs[2], [20, 45])
    return small_folder, inputs, exact


def run(model, inputs, dtype):
    latents, t, padded, _ = inputs
    with torch.no_grad():
        return model(latents.to(dtype), t, padded.to(dtype), [20, 45]).float()


def test_each_attention_backend_in_the_model_stays_within_bf16_tolerance(small):
    folder, inputs, exact = small
    model = load_transformer(folder, dtype=torch.bfloat16)
    plain = rel_err(run(model, inputs, torch.bfloat16), exact)
    for name in runnable(torch.bfloat16):
        attn.use_attention(model, attn.attention(name, "cpu", torch.bfloat16))
        assert rel_err(run(model, inputs, torch.bfloat16), exact) <= max(1.5 * plain, BF16_FLOOR), name
    fp32 = attn.use_attention(
        load_transformer(folder, dtype=torch.float32), attn.attention("math", "cpu", torch.float32)
    )
    assert rel_err(run(fp32, inputs, torch.float32), exact) <= 1e-5


def test_a_bf16_residual_stream_stays_within_bf16_tolerance(small):
    """The residual stream, norms and RoPE in bf16 instead of fp32: half the elementwise traffic, and an error
    against the fp32 model of the same order as the plain bf16 model's (which keeps them in fp32)."""
    folder, inputs, exact = small
    plain = rel_err(run(load_transformer(folder, dtype=torch.bfloat16), inputs, torch.bfloat16), exact)
    model = load_transformer(folder, dtype=torch.bfloat16)
    model.residual_dtype = torch.bfloat16
    seen = []
    model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    err = rel_err(run(model, inputs, torch.bfloat16), exact)
    assert seen == [torch.bfloat16]
    assert err <= max(4 * plain, BF16_FLOOR), (plain, err)


def test_compiled_blocks_match_eager_and_new_sizes_and_caption_lengths_do_not_recompile(small):
    """Regional compilation (one graph per block kind, dynamic shapes): three resolutions and caption lengths,
    the graphs compiled for the first serve the others."""
    from torch._dynamo.utils import counters

    folder, _, _ = small
    model = load_transformer(folder, dtype=torch.float32)
    runs = [make_inputs(SMALL, size, [n], seed=9) for size, n in (((16, 16), 20), ((24, 32), 45), ((32, 16), 77))]
    with torch.no_grad():
        eager = [model(x, t, cap) for x, t, cap, _ in runs]
        torch._dynamo.reset()
        counters.clear()
        Speed(compile=True).apply(model, "cpu", torch.float32)
        graphs = []
        for (x, t, cap, _), expected in zip(runs, eager):
            assert rel_err(model(x, t, cap), expected) <= 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, graphs
