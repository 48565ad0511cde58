"""The speed levers (issue 19): each is switchable, and its output stays within bf16 tolerance of the plain path.

The plain path is the fp32 model on this machine's default attention; a lever in bf16 may err against it no more
than the plain bf16 model does (with a floor of bf16's own rounding), and in fp32 it must agree to fp32 rounding.
The backends are tried on the CPU, where the tests' tensors are: the GPU-only kernels (cuDNN, memory-efficient,
FlashAttention, SageAttention) are tested by their refusals, auto's order per GPU generation and the packaged
kernels' glue with a stand-in; their numbers on a GPU are the bench's.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import SMALL, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from zimage_core import attention as attn
from zimage_core import gemm
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


# ---- low-precision GEMMs (zimage_core/gemm.py) ----


def int8_weight(rows: int, cols: int, per_row: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    scale = (torch.rand(rows, 1, generator=g) + 0.5) / 127 / cols**0.5
    return w, scale if per_row else scale[0, 0]


@pytest.mark.parametrize("convrot", [0, 256])
@pytest.mark.parametrize("per_row", [False, True], ids=["tensorwise", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_is_comfy_kitchens_int8_linear(convrot, per_row, dtype):
    """ComfyUI 0.33.0 runs its int8 files through comfy-kitchen's `int8_linear` (activations per row, ConvRot
    rotating them): ours gives its numbers, from one `torch._int_mm`."""
    import comfy_kitchen as ck

    w, scale = int8_weight(96, 512, per_row, seed=convrot + per_row)
    x = (torch.randn(70, 512, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    x[3] *= 40  # an outlier token: its own scale, the others keep theirs
    ours = gemm.int8_linear(x, w, scale, convrot)
    theirs = ck.int8_linear(x, w, scale, None, dtype, convrot=bool(convrot), convrot_groupsize=convrot or 256)
    assert ours.dtype == dtype
    assert rel_err(ours, theirs) <= (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_quantizes_each_row_as_comfy_kitchen_and_multiplies_exactly(dtype):
    """Each row of activations quantized by comfy-kitchen's `quantize_per_tensor_fp8` arithmetic with its own
    scale (amax / 448), then one `_scaled_mm` against the e4m3 weight and its per-row scales: the float64 product
    of exactly those quantized values."""
    import comfy_kitchen as ck

    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=g).to(dtype)
    x[5] *= 50
    w = (torch.randn(48, 256, generator=g) * 100).to(torch.float8_e4m3fn)
    w_scale = torch.rand(48, 1, generator=g) / 100
    x_scale = x.abs().amax(-1, keepdim=True).float() / 448
    xq = ck.quantize_per_tensor_fp8(x, x_scale)
    expected = (xq.double() * x_scale.double()) @ (w.double() * w_scale.double()).T
    got = gemm.fp8_linear(x, w, w_scale)
    assert got.dtype == dtype
    assert rel_err(got, expected) <= (1e-5 if dtype == torch.float32 else 8e-3)
    assert rel_err(gemm.fp8_linear(x, w, None), (xq.double() * x_scale.double()) @ w.double().T) <= 8e-3


def test_e2m1_rounds_as_comfy_kitchen():
    """nvfp4's 4-bit values: nearest, ties to the even code, at every midpoint and one step either side of it."""
    from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    spread = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 6
    edges = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, spread])
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)]).clamp(0, 6)
    values = torch.cat([near, -near])
    assert torch.equal(gemm.e2m1_codes(values), _f32_to_floatx_unpacked(values, 2, 1))


def emulated_scaled_mm(a, b, *, scale_a, scale_b, output_dtype, bias=None, **recipe):
    """torch's block-scaled GEMM as the formats define it, for the CPU (which has no such kernel): both operands
    dequantized by comfy-kitchen's own readers of its tiled scales, multiplied in float64."""
    from comfy_kitchen.backends.eager import quantization as q

    def dense(m, scale):
        if m.dtype == torch.float4_e2m1fn_x2:
            return q.dequantize_nvfp4(m.view(torch.uint8), scale[1], scale[0], torch.float64)
        return q.dequantize_mxfp8(m, scale, torch.float64)

    out = dense(a, scale_a) @ dense(b.t(), scale_b).T
    return (out if bias is None else out + bias).to(output_dtype)


def recorded_scaled_mm(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(F, "scaled_mm", lambda *a, **kw: calls.append((a, kw)) or emulated_scaled_mm(*a, **kw))
    return calls


def same_call(ours, theirs) -> bool:
    """Two kernel calls with the same operands (bit for bit), scales, recipes and swizzles."""
    (a, kw), (b, kw2) = ours, theirs
    kw, kw2 = {"bias": None, **kw}, {"bias": None, **kw2}

    def raw(t):  # the bytes, in memory order (an operand is a transposed view; fp4 has no copy)
        return (t if t.is_contiguous() else t.t()).reshape(-1).view(torch.uint8)

    def same(x, y):
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(same, x, y))
        if isinstance(x, torch.Tensor):
            return (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and x.stride() == y.stride() and torch.equal(raw(x), raw(y)))  # fmt: skip
        return x == y

    return same(list(a), list(b)) and kw.keys() == kw2.keys() and all(same(kw[k], kw2[k]) for k in kw)


@pytest.mark.parametrize("quantizer", ["ours", "comfy-kitchen"])
@pytest.mark.parametrize("rows", [32, 40, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label", ["mxfp8", "nvfp4"])
def test_block_scaled_gemms_call_blackwells_kernel_as_comfyui_does(label, dtype, rows, quantizer, monkeypatch):
    """ComfyUI 0.33.0 runs its mxfp8 and nvfp4 files on Blackwell by quantizing the activations with
    comfy-kitchen's layout (rows padded to 32 / 16) and one `torch.nn.functional.scaled_mm`: ours makes the same
    call, operand for operand, from the weight as we hold it (its block scales untiled at load), and returns the
    first `rows` rows of what the kernel gives; with our quantizer, and with comfy-kitchen's fused one (taken on a
    GPU where it is installed; here its CPU code)."""
    monkeypatch.setattr(gemm, "fused", lambda x: quantizer == "comfy-kitchen")
    from comfy_kitchen.tensor import QuantizedTensor
    from helpers import ck_quantize

    from zimage_core.quant import Format

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 256, generator=g)
    x = (torch.randn(rows, 256, generator=g) * 3).to(dtype)
    x[3] *= 40
    x[5, :32] = 0  # a zero block
    parts, _ = ck_quantize(w, label)
    fmt = Format(label)
    scale = fmt.prepare_scale(parts["weight_scale"], tuple(parts["weight"].shape))
    calls = recorded_scaled_mm(monkeypatch)
    if label == "nvfp4":
        ours = gemm.nvfp4_linear(x, parts["weight"], scale, parts["weight_scale_2"].float().reshape(()))
    else:
        ours = gemm.mxfp8_linear(x, parts["weight"], scale)
    layout = {"mxfp8": "TensorCoreMXFP8Layout", "nvfp4": "TensorCoreNVFP4Layout"}[label]
    theirs = F.linear(QuantizedTensor.from_float(x, layout), QuantizedTensor.from_float(w, layout))
    assert len(calls) == 2 and same_call(*calls), calls
    assert ours.shape == theirs.shape == (rows, 96) and ours.dtype == theirs.dtype == dtype
    assert rel_err(ours, theirs) <= 1e-6


@pytest.mark.parametrize("label", ["mxfp8", "nvfp4"])
def test_the_trial_that_turns_a_block_scaled_gemm_on_has_every_operand_on_its_device(label, monkeypatch):
    """`auto` turns these on where a trial call runs: an operand left on the CPU would fail the trial on every
    Blackwell GPU and keep the kernel off. On the meta device, every tensor the kernel gets must be there."""
    devices = []

    def kernel(a, b, **kw):
        tensors = [a, b, *(v for value in kw.values() for v in (value if isinstance(value, list) else [value]))]
        devices.extend(t.device.type for t in tensors if isinstance(t, torch.Tensor))
        return torch.empty(len(a), b.shape[1], device=a.device, dtype=kw["output_dtype"])

    monkeypatch.setattr(F, "scaled_mm", kernel)
    assert gemm.runs(label, torch.device("meta"), torch.bfloat16) is None
    assert len(devices) >= 4 and set(devices) == {"meta"}, devices


@pytest.fixture(scope="module")
def quantized_small(small_ref, tmp_path_factory):
    """The SMALL model's block Linears quantized by comfy-kitchen as ComfyUI's files hold them, per format."""
    from helpers import ck_quantized_file, to_comfy

    sd, folder = to_comfy(small_ref.state_dict()), tmp_path_factory.mktemp("lowp")
    labels = ("float8_e4m3fn", "int8_tensorwise", "int8_tensorwise + convrot 256", "mxfp8", "nvfp4")
    return {label: ck_quantized_file(sd, label, folder / f"{i}.safetensors")[0] for i, label in enumerate(labels)}


@pytest.mark.parametrize("label", ["float8_e4m3fn", "int8_tensorwise", "int8_tensorwise + convrot 256"])
def test_low_precision_gemms_in_the_model_stay_near_the_dequantizing_path(quantized_small, label, monkeypatch):
    """The same quantized file, bf16, its block Linears multiplied by fp8 `_scaled_mm` or int8 `_int_mm` (every
    call with 32 rows or more: the modulation's few rows stay dequantized), against the fp32 model on the
    dequantized weights. int8 (ComfyUI 0.33.0's W8A8) stays within twice the plain bf16 model's error. fp8 keeps 3
    mantissa bits, so it cannot stay within bf16's tolerance: it errs no more than ComfyUI's own fp8 GEMMs (one
    scale per tensor) on the same file, and within 4x plain bf16."""
    inputs = make_inputs(SMALL, (16, 24), [20, 45], seed=3)
    exact = run(load_transformer(quantized_small[label], dtype=torch.float32), inputs, torch.float32)
    model = load_transformer(quantized_small[label], dtype=torch.bfloat16)
    plain = rel_err(run(model, inputs, torch.bfloat16), exact)
    kernel = "_scaled_mm" if label.startswith("float8") else "_int_mm"
    calls, real = [], getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda a, *args, **kw: calls.append(len(a)) or real(a, *args, **kw))
    Speed(gemm="lowp").apply(model, "cpu", torch.bfloat16)
    calls.clear()  # the trial run
    in_blocks = sum(getattr(m, "lowp", None) is not None for n, m in model.named_modules() if "layers." in n)
    lowp = rel_err(run(model, inputs, torch.bfloat16), exact)
    assert in_blocks >= 4 and len(calls) >= in_blocks and min(calls) >= gemm.MIN_ROWS, (in_blocks, calls)
    if kernel == "_int_mm":
        assert lowp <= 2 * plain, (plain, lowp)
        return
    per_row = gemm.row_scales
    monkeypatch.setattr(gemm, "row_scales", lambda x, top: per_row(x, top).amax().expand(len(x), 1).contiguous())
    comfyui_like = rel_err(run(model, inputs, torch.bfloat16), exact)
    assert lowp <= comfyui_like and lowp <= 4 * plain, (plain, lowp, comfyui_like)


@pytest.mark.parametrize("label", ["mxfp8", "nvfp4"])
def test_block_scaled_gemms_in_the_model_stay_near_the_dequantizing_path(quantized_small, label, monkeypatch):
    """The same file in bf16, its unpadded block Linears (q/k/v, out) through Blackwell's block-scaled GEMM (the
    kernel emulated from the formats, as the test above checks ComfyUI calls it; the FFN's 682 features are padded
    by the formats and dequantize), against the fp32 model on the dequantized weights. Quantizing the activations
    costs what it costs: mxfp8 keeps 3 mantissa bits, nvfp4 one."""
    inputs = make_inputs(SMALL, (16, 24), [20, 45], seed=3)
    exact = run(load_transformer(quantized_small[label], dtype=torch.float32), inputs, torch.float32)
    model = load_transformer(quantized_small[label], dtype=torch.bfloat16)
    plain = rel_err(run(model, inputs, torch.bfloat16), exact)
    calls = recorded_scaled_mm(monkeypatch)
    Speed(gemm="lowp").apply(model, "cpu", torch.bfloat16)
    calls.clear()  # the trial run
    taking = {n for n, m in model.named_modules() if getattr(m, "lowp", None) == label}
    lowp = rel_err(run(model, inputs, torch.bfloat16), exact)
    attention = {n for n in taking if n.endswith((".qkv", ".out"))}
    assert len(attention) == 8 and not any("feed_forward" in n for n in taking), taking
    assert len(calls) == len(attention), len(calls)  # once each; the time embedder's two rows dequantize
    assert lowp <= {"mxfp8": 5, "nvfp4": 12}[label] * plain, (plain, lowp)  # measured: 4.0x and 9.8x


def test_a_layer_with_a_lora_or_few_rows_dequantizes_and_modes_are_checked(quantized_small, monkeypatch):
    model = load_transformer(quantized_small["int8_tensorwise"], dtype=torch.float32)
    layer = model.layers[0].attention.qkv
    x = torch.randn(40, layer.in_features)
    dense = F.linear(x, layer.dense_weight(x.device, x.dtype))
    assert gemm.use_gemms(model, frozenset({"fp8"})) == 0 and layer.lowp is None  # no fp8 weights here
    assert gemm.use_gemms(model, gemm.kinds("lowp", "cpu", torch.float32)) >= 10 and layer.lowp == "int8"
    assert 0 < rel_err(layer(x), dense) <= 2e-2
    assert rel_err(layer(x[:4]), dense[:4]) <= 1e-6  # too few rows to pay
    layer.weight_function.append(lambda w: 2 * w)  # a LoRA's per-call update needs the dense weight
    assert rel_err(layer(x), 2 * dense) <= 1e-6
    assert gemm.kinds("auto", "cpu", torch.float32) == gemm.kinds("dequantize", "cpu", torch.float32) == frozenset()
    ran = {k for k in gemm.BLOCK_SCALED if gemm.runs(k, "cpu", torch.float32) is None}
    assert gemm.kinds("lowp", "cpu", torch.float32) == {"fp8", "int8"} | ran  # block-scaled ones where they run
    with pytest.raises(ValueError, match="unknown GEMM mode 'int4'"):
        Speed(gemm="int4")
    monkeypatch.setattr(gemm, "runs", lambda name, device, dtype: "no kernel" if name == "fp8" else None)
    with pytest.raises(ValueError, match="GEMM mode 'lowp' cannot run on cpu in torch.float32: fp8: no kernel"):
        gemm.kinds("lowp", "cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 6))
    assert gemm.kinds("auto", "cuda", torch.bfloat16) == {"int8"}  # Ampere: int8 GEMMs, no fp8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert gemm.kinds("auto", "cuda", torch.bfloat16) == {"int8"}  # fp8 refused by its trial here
    monkeypatch.setattr(gemm, "runs", lambda name, device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    assert gemm.kinds("auto", "cuda", torch.bfloat16) == set(gemm.NEEDS)  # an RTX 50: mxfp8 and nvfp4 too


# ---- CUDA graphs (zimage_core/graphs.py) ----


def traced_capture(fn, inputs):
    """A CUDA graph's semantics where there is none: the call traced once (make_fx), so every Python value and
    every tensor it reads from outside stays as it was at capture, then replayed reading the input buffers and
    writing the output buffer."""
    from torch.fx.experimental.proxy_tensor import make_fx

    buffers = tuple(t.clone() for t in inputs)
    traced = make_fx(fn)(*buffers)
    output = traced(*buffers)
    return buffers, output, lambda: output.copy_(traced(*buffers))


def test_cuda_graphs_replay_each_shape_and_caption_lengths_as_the_eager_model(small_folder):
    """Calls as the step loop makes them (new latents and times each step; new sizes and prompt lengths between
    images): the first of each shape and caption lengths runs eagerly and is captured, the others replay, and every
    result is the eager model's. Replay with stale inputs, or with a time or caption length fixed at capture, would
    give the first call's result again."""
    from zimage_core.graphs import Graphs
    from zimage_core.sampling import sample, sigmas
    from zimage_core.text_encoder import Embeddings

    model = load_transformer(small_folder, dtype=torch.float32)
    calls = []
    for i, (size, lens) in enumerate([((16, 24), [20, 45])] * 3 + [((24, 16), [20, 45]), ((16, 24), [30, 45])] * 2):
        latents, t, caps, _ = make_inputs(SMALL, size, [45, 45], seed=i)
        calls.append((latents, t, caps, lens))
    with torch.no_grad():
        eager = [model(*call) for call in calls]
        captured = []
        model.graphs = Graphs(lambda fn, inputs: captured.append(len(captured)) or traced_capture(fn, inputs))
        graphed = [model(*call) for call in calls]
    assert len(captured) == len(model.graphs.entries) == 3  # two sizes, two caption lengths
    for i, (ours, expected) in enumerate(zip(graphed, eager)):
        assert rel_err(ours, expected) <= 1e-6, i
    assert rel_err(graphed[2], graphed[1]) > 0.1  # each step's own inputs

    captions = Embeddings(calls[0][2], (20, 45), (0, 0))
    model.graphs = None
    with torch.no_grad():
        plain = sample(model, calls[0][0], captions, schedule=sigmas(4))
        model.graphs = Graphs(traced_capture)
        assert rel_err(sample(model, calls[0][0], captions, schedule=sigmas(4)), plain) <= 1e-6


def test_a_forward_that_cannot_be_captured_runs_eagerly_and_graphs_refuse_what_they_cannot_serve(small_folder):
    from zimage_core.graphs import Graphs

    model = load_transformer(small_folder, dtype=torch.float32)
    latents, t, caps, _ = make_inputs(SMALL, (16, 24), [20, 45], seed=1)
    with torch.no_grad():
        expected = model(latents, t, caps, [20, 45])
        tries = []
        model.graphs = Graphs(lambda fn, inputs: tries.append(1) or (_ for _ in ()).throw(RuntimeError("no capture")))
        with pytest.warns(UserWarning, match="cannot be captured, it runs eagerly"):
            first = model(latents, t, caps, [20, 45])
        again = model(latents, t, caps, [20, 45])
    assert len(tries) == 1 and not model.graphs.entries  # tried once
    assert rel_err(first, expected) <= 1e-6 and rel_err(again, expected) <= 1e-6
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        Speed(graphs=True).check("cpu", torch.float32)
    with pytest.raises(ValueError, match="streaming moves them"):
        Speed(graphs=True, vram=6)


def test_cuda_capture_records_on_copies_in_one_shared_pool_and_replays_the_graph(monkeypatch):
    """The CUDA side with torch.cuda's graph API stood in for (no GPU here): the call is captured on copies of its
    inputs, without autograd, in the one pool of its device, and replay is the graph's."""
    from contextlib import contextmanager

    from zimage_core import graphs

    pools, captured = [], []

    class Graph:
        def replay(self):
            captured.append("replay")

    @contextmanager
    def capturing(graph, pool):
        pools.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    graphs.shared_pool.cache_clear()
    x = torch.randn(3, requires_grad=True)
    for _ in range(2):
        buffers, out, replay = graphs.cuda_capture(lambda a: a * 2, (x,))
        assert buffers[0] is not x and torch.equal(buffers[0], x.detach()) and not out.requires_grad
        assert rel_err(out, 2 * x.detach()) == 0
        replay()
    assert len(pools) == 2 and pools[0] is pools[1] and captured == ["replay"] * 2
    graphs.shared_pool.cache_clear()  # the stand-in pool must not outlive this test


# ---- no host syncs in the step loop ----


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to Python (`.item()`, `float()`, `bool()`,
    `nonzero`) and the tensors made from Python data (`torch.tensor(...)`, then copied to the device): on a GPU
    each one waits for the device to finish everything queued, and none can be captured in a CUDA graph."""

    READS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "_assert_async")

    def __init__(self):
        super().__init__()
        self.reads, self.made = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.reads.append(func.overloadpacket.__name__)
        if func.overloadpacket.__name__ in ("lift_fresh", "lift_fresh_copy"):
            self.made.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_the_step_loop_never_reads_a_value_back_from_the_device():
    """Once a shape's layout is built (on the host, cached), sampling with guidance, seed variety and inpainting
    reads nothing back per step, so a GPU's queue never drains between steps."""
    from zimage_core import pipeline, sampling

    model = pipeline.tiny_random("transformer", "cpu", torch.float32)
    encoder = pipeline.tiny_random("text_encoder", "cpu", torch.float32)
    cond, uncond = encoder.encode(["a cat on a windowsill", "blurry"]).split(1)
    g = torch.Generator().manual_seed(4)
    x, clean, noise = (torch.randn(1, 16, 8, 12, generator=g) for _ in range(3))
    mask = (torch.rand(1, 1, 8, 12, generator=g) > 0.5).float()
    options = {"scale": 2.0, "inpaint": (clean, noise, mask), "variety": (sampling.vary(cond, [3], 0.4), 1),
               "callback": lambda *a: None}  # fmt: skip
    expected = sampling.sample(model, x, cond, uncond, sampling.sigmas(4), **options)  # builds the layouts
    with HostReads() as watch:
        got = sampling.sample(model, x, cond, uncond, sampling.sigmas(4), **options)
    assert watch.reads == [] and watch.made == []
    assert rel_err(got, expected) <= 1e-6


def every_compact_weight_and_activation_quantizer():
    """(name, call) for each dequantization (GGML kinds, ComfyUI's formats) and each activation quantizer."""
    import numpy as np
    from helpers import ck_quantize, gguf_quantize

    from zimage_core import ggml
    from zimage_core.quant import Format, dequantize

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 512, generator=g) * 0.02, torch.randn(64, 512, generator=g)
    for kind in ggml.BLOCKS:
        data = torch.from_numpy(np.ascontiguousarray(gguf_quantize(w, kind)[0]))
        yield kind, lambda data=data, kind=kind: ggml.dequantize(data, kind, (48, 512), torch.bfloat16)
    for label in ("int8_tensorwise + convrot 256", "mxfp8", "nvfp4"):
        parts, _ = ck_quantize(w, label)
        fmt = Format(label.split(" + ")[0], 256 if "convrot" in label else 0)
        scale = fmt.prepare_scale(parts["weight_scale"], tuple(parts["weight"].shape))
        args = (parts["weight"], fmt, scale, parts.get("weight_scale_2"), (48, 512), torch.bfloat16)
        yield label, lambda args=args: dequantize(*args)
    yield "nvfp4 activations", lambda: gemm.nvfp4_quantize(x)
    yield "mxfp8 activations", lambda: gemm.mxfp8_quantize(x)
    yield "int8 + convrot activations", lambda: gemm.int8_linear(x, w.to(torch.int8), torch.ones(()), 256)


def test_compact_weights_and_quantized_activations_make_no_tensor_from_host_data_after_their_first_call():
    """Their small tables (shifts, code values, rounding bounds, Hadamard matrices) are made once per device: made
    per call, each Linear of each step would wait for the GPU's queue to drain, and no CUDA graph could hold it."""
    for name, call in every_compact_weight_and_activation_quantizer():
        call()
        with HostReads() as watch:
            call()
        assert watch.made == [] and watch.reads == [], (name, watch.made, watch.reads)
