"""LoRA files in every trainer's naming, on tiny random weights.

Each format's file is written here with that trainer's exact key names on diffusers' layer names (the reference's
own module names; fused names where the format is ComfyUI's). The expected result is built by hand: each update's
product added to the reference's weights (a fused qkv update split into q, k and v rows), the reference saved, and
our transformer loaded from it. Where diffusers loads the format (`ZImagePipeline.lora_state_dict` and
`load_lora_into_transformer`, with peft), its output is the second reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from helpers import TINY, fp8_forms, make_inputs, reference_transformer, to_comfy, write_diffusers_folder, write_file

from zimage_core.loaders import load_transformer
from zimage_core.lora import LoraError, apply_loras, linear_shapes, read_lora

RANK, STRENGTH = 2, 0.7


@pytest.fixture(scope="module")
def ref():
    return reference_transformer(TINY, seed=3)


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("base"), ref)


def linears(model) -> dict[str, tuple[int, int]]:
    """diffusers' Linear layers and their (out, in)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def native(name: str) -> str:
    """A diffusers layer name in ComfyUI's (fused) naming; q/k/v all name the fused qkv."""
    for old, new in (("all_x_embedder.2-1", "x_embedder"), ("all_final_layer.2-1", "final_layer"),
                     ("attention.to_out.0", "attention.out"), ("attention.to_q", "attention.qkv")):  # fmt: skip
        name = name.replace(old, new)
    return name


def gain(shape) -> float:
    """Keeps an update near the size of the weight it changes (unit-gain weights: 1 / sqrt(in))."""
    return (16 / shape[1]) ** 0.5


def factors(g, shape, rank=RANK):
    return torch.randn(shape[0], rank, generator=g) * 0.3, torch.randn(rank, shape[1], generator=g) * 0.3 * gain(shape)


def factorization(dimension: int) -> tuple[int, int]:
    """LyCORIS' `factorization(dimension, factor=-1)` (lycoris/functional/general.py): the most balanced m <= n
    with m * n = dimension; LoKr's first factor takes m."""
    m, n = 1, dimension
    while m < n:
        new_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if new_m + dimension // new_m > m + n:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def lora_file(fmt: str, layers: dict[str, tuple[int, int]], seed: int = 0, deltas: bool = True):
    """(the file's tensors, the hand-made update of each diffusers layer at strength 1 (unless not `deltas`), the
    keys that must be reported as not applied)."""
    g = torch.Generator().manual_seed(seed)
    file, hand, skipped = {}, {}, set()
    for name, shape in layers.items():
        if fmt == "fused":  # ComfyUI's names: one update of the fused qkv
            if name.endswith(("to_k", "to_v")):
                continue
            fused = native(name)
            qkv = fused.endswith(".qkv")
            up, down = factors(g, (3 * shape[0] if qkv else shape[0], shape[1]))
            key = f"diffusion_model.{fused}"
            file |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(4.0)}
            delta = up @ down * (4.0 / RANK)
            if qkv:
                hand |= {name.replace("to_q", f"to_{p}"): part for p, part in zip("qkv", delta.chunk(3))}
            else:
                hand[name] = delta
            continue
        if fmt in ("lokr", "lokr factorised"):
            a, b = factorization(shape[0])[0], factorization(shape[1])[0]
            w1 = torch.randn(a, b, generator=g) * 0.5 * gain(shape)
            if fmt == "lokr":  # ai-toolkit: diffusers' names, full factors (alpha does not scale them)
                w2 = torch.randn(shape[0] // a, shape[1] // b, generator=g) * 0.3
                file |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(8.0)}
                hand[name] = torch.kron(w1, w2)
            else:  # LyCORIS: SimpleTuner's `lycoris_` names, the second factor low-rank
                w2a, w2b = factors(g, (shape[0] // a, shape[1] // b))
                key = "lycoris_" + name.replace(".", "_")
                file |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                         f"{key}.alpha": torch.tensor(1.0)}  # fmt: skip
                hand[name] = torch.kron(w1, w2a @ w2b) * (1.0 / RANK)
            continue
        if fmt == "loha":
            (w1a, w1b), (w2a, w2b) = factors(g, shape), factors(g, shape)
            key = "lycoris_" + name.replace(".", "_")
            file |= {f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a,
                     f"{key}.hada_w2_b": w2b, f"{key}.alpha": torch.tensor(3.0)}  # fmt: skip
            hand[name] = (w1a @ w1b) * (w2a @ w2b) * (3.0 / RANK)
            continue
        up, down = factors(g, shape)
        alpha = {"diffusers": None, "peft": 1.0, "DiffSynth": None, "kohya": 8.0, "dot": 1.0}[fmt]
        key, down_name, up_name = {
            "diffusers": (f"diffusion_model.{name}", "lora_A.weight", "lora_B.weight"),
            "peft": (f"transformer.{name}", "lora_A.weight", "lora_B.weight"),
            "DiffSynth": (name, "lora_A.default.weight", "lora_B.default.weight"),
            "kohya": ("lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"),
            "dot": (name.replace("attention.to_", "attention.to.").replace("to.out.", "to_out."), "lora.down.weight",
                    "lora.up.weight"),
        }[fmt]  # fmt: skip
        file |= {f"{key}.{down_name}": down, f"{key}.{up_name}": up}
        if alpha is not None:
            file[f"{name if fmt == 'dot' else key}.alpha"] = torch.tensor(alpha)  # Anime-Z: alpha under `to_q`
        hand[name] = up @ down * (1.0 if alpha is None else alpha / RANK) if deltas else None
        if fmt == "dot" and name.endswith(("to_q", "to_out.0")):  # Anime-Z's fused copies beside the split keys
            fused = native(name)
            rows = 3 * shape[0] if name.endswith("to_q") else shape[0]
            cup, cdown = factors(g, (rows, shape[1]))
            extra = {f"{fused}.lora.down.weight": cdown, f"{fused}.lora.up.weight": cup}
            if name.endswith("to_q"):
                extra[f"{fused}.alpha"] = torch.tensor(1.0)
            file |= extra
            skipped |= set(extra)
    if fmt == "kohya":  # keys that exist in users' files but not in this model: reported, never applied
        for key in ("lora_unet_t_embedder_2_mlp_0", "lora_te_model_layers_0_self_attn_q_proj"):
            up, down = factors(g, (8, 8))
            extra = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
            file |= extra
            skipped |= set(extra)
    return file, hand, skipped


def by_hand(ref, hand: dict[str, torch.Tensor], strength: float, tmp_path):
    """Our transformer loaded from the reference with each update added to its weights."""
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for name, delta in hand.items():
            model.get_submodule(name).weight += strength * delta
    return load_transformer(write_diffusers_folder(tmp_path / "by_hand", model), dtype=torch.float32)


def forward(model, seed=0):
    latents, t, padded, _ = make_inputs(TINY, (8, 8), [7, 5], seed)
    with torch.no_grad():
        return model(latents, t, padded, [7, 5])


FORMATS = ["diffusers", "peft", "DiffSynth", "kohya", "dot", "fused", "lokr", "lokr factorised", "loha"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_hand_made_update(fmt, ref, folder, tmp_path):
    file, hand, skipped = lora_file(fmt, linears(ref))
    path = write_file(tmp_path / f"{fmt}.safetensors", file)
    ours = load_transformer(folder, dtype=torch.float32)
    lora = read_lora(path, linear_shapes(ours))
    assert set(lora.skipped) == skipped, lora.summary()
    assert lora.matched == len(file) - len(skipped) and lora.total == len(file)
    apply_loras(ours, [(lora, STRENGTH)])
    expected = by_hand(ref, hand, STRENGTH, tmp_path)
    err = rel_err(forward(ours), forward(expected))
    assert err <= 1e-5, (fmt, err)
    assert rel_err(forward(expected), forward(load_transformer(folder, dtype=torch.float32))) > 1e-2  # it matters


DIFFUSERS_FORMATS = ["diffusers", "peft", "DiffSynth", "kohya", "dot", "lokr"]


@pytest.mark.parametrize("fmt", DIFFUSERS_FORMATS)
def test_each_format_diffusers_loads_gives_diffusers_output(fmt, ref, folder, tmp_path):
    pytest.importorskip("peft")
    from diffusers import ZImagePipeline
    from helpers import reference_forward

    layers = linears(ref)
    file, _, _ = lora_file(fmt, layers)
    if fmt == "kohya":  # diffusers has no way to report keys it cannot use: give it the applicable ones
        file = {k: v for k, v in file.items() if "t_embedder_2" not in k and "lora_te_" not in k}
    if fmt == "peft":  # with `.alpha` diffusers 0.42.1 converts and prefixes `transformer.` twice, then fails
        file = {k: v for k, v in file.items() if not k.endswith(".alpha")}
    path = write_file(tmp_path / f"{fmt}.safetensors", file)
    theirs = copy.deepcopy(ref)
    ZImagePipeline.load_lora_into_transformer(ZImagePipeline.lora_state_dict(dict(file)), transformer=theirs,
                                              adapter_name="a")  # fmt: skip
    ours = load_transformer(folder, dtype=torch.float32)
    apply_loras(ours, [(read_lora(path, linear_shapes(ours)), 1.0)])
    latents, t, padded, captions = make_inputs(TINY, (8, 8), [7, 5], 0)
    expected = torch.stack(reference_forward(theirs, list(latents), t, captions))
    with torch.no_grad():
        got = ours(latents, t, padded, [7, 5])
    assert rel_err(got, expected) <= 1e-5, (fmt, rel_err(got, expected))


def test_two_stacked_loras_merged_then_restored_give_the_weights_back_exactly(ref, tmp_path):
    layers = linears(ref)
    first = write_file(tmp_path / "a.safetensors", lora_file("kohya", layers, seed=1)[0])
    second = write_file(tmp_path / "b.safetensors", lora_file("lokr", layers, seed=2)[0])
    bf16 = load_transformer(write_diffusers_folder(tmp_path / "base", ref), dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    shapes = linear_shapes(bf16)
    applied = apply_loras(bf16, [(read_lora(first, shapes), 0.8), (read_lora(second, shapes), -0.5)])
    assert applied.merged == len(shapes) and applied.compact == 0
    changed = [k for k, v in bf16.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(shapes)  # every Linear weight moved
    applied.restore()
    assert all(torch.equal(v, before[k]) for k, v in bf16.state_dict().items())


def test_stacked_loras_are_summed_before_one_rounding(ref, tmp_path):
    """Two LoRAs on a bf16 model: each layer gets round(w + 0.8 a - 0.5 b), not two roundings."""
    layers = linears(ref)
    (a, hand_a, _), (b, hand_b, _) = lora_file("diffusers", layers, seed=1), lora_file("DiffSynth", layers, seed=2)
    pa, pb = write_file(tmp_path / "a.safetensors", a), write_file(tmp_path / "b.safetensors", b)
    bf16 = load_transformer(write_diffusers_folder(tmp_path / "base", ref), dtype=torch.bfloat16)
    apply_loras(bf16, [(read_lora(pa, linear_shapes(bf16)), 0.8), (read_lora(pb, linear_shapes(bf16)), -0.5)])
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for name in hand_a:
            layer = model.get_submodule(name)
            layer.weight.copy_(layer.weight.bfloat16().float() + 0.8 * hand_a[name] - 0.5 * hand_b[name])
    expected = to_comfy(model.bfloat16().state_dict())
    got = bf16.state_dict()
    for name, weight in expected.items():
        if name.endswith(".weight") and name in got and weight.dim() == 2:
            assert torch.equal(got[name], weight), name


@pytest.mark.parametrize("form", ["plain", "scaled", "comfy_quant"])
def test_compact_weights_stay_compact_and_take_the_update_per_call(form, ref, tmp_path):
    """fp8 weights (with a scale: compact) stay fp8: the update is added per call to the dequantized weight, so the output is
    the model on the dequantized weights plus the update, and removing the LoRA leaves the stored bytes as they
    were (nothing to round back)."""
    forms, deq = fp8_forms(to_comfy(ref.state_dict()))
    tensors, meta = forms[form]
    path = write_file(tmp_path / f"{form}.safetensors", tensors, meta)
    ours = load_transformer(path, dtype=torch.float32, config=TINY)
    stored = {k: v.clone() for k, v in ours.state_dict().items()}
    file, hand, _ = lora_file("kohya", linears(ref), seed=4)
    lora = read_lora(write_file(tmp_path / "l.safetensors", file), linear_shapes(ours))
    applied = apply_loras(ours, [(lora, STRENGTH)])
    assert applied.compact > 0 and ours.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    dense = load_transformer(write_file(tmp_path / "dense.safetensors", deq["plain" if form == "plain" else "scaled"]), dtype=torch.float32,
                             config=TINY)  # fmt: skip
    expected_sd = dense.state_dict()
    with torch.no_grad():
        for name, delta in hand.items():
            target = native(name.replace("to_k", "to_q").replace("to_v", "to_q"))
            rows = {"to_q": 0, "to_k": 1, "to_v": 2}.get(name.rsplit(".", 1)[-1])
            w = expected_sd[target + ".weight"]
            if rows is None:
                w += STRENGTH * delta
            else:
                w[rows * delta.shape[0] : (rows + 1) * delta.shape[0]] += STRENGTH * delta
    dense.load_state_dict(expected_sd)
    err = rel_err(forward(ours), forward(dense))
    assert err <= 1e-5, err
    applied.restore()
    assert all(torch.equal(v, stored[k]) for k, v in ours.state_dict().items())
    assert not any(getattr(m, "weight_function", None) for m in ours.modules())


def test_a_lora_that_matches_nothing_is_an_error_naming_the_file(ref, tmp_path):
    flux = {f"lora_unet_double_blocks_0_img_attn_qkv.lora_{s}.weight": torch.zeros(4, 4) for s in ("up", "down")}
    path = write_file(tmp_path / "flux_style.safetensors", flux)
    with pytest.raises(LoraError, match=r"flux_style\.safetensors: none of its 2 keys") as e:
        read_lora(path, linear_shapes(load_transformer(write_diffusers_folder(tmp_path / "m", ref))))
    assert "no such layer" in str(e.value) and "lora_unet_double_blocks_0_img_attn_qkv" in str(e.value)


def test_a_lora_of_the_wrong_width_is_an_error_not_a_crash(ref, folder, tmp_path):
    file, _, _ = lora_file("diffusers", {k: (v[0] * 2, v[1] * 2) for k, v in linears(ref).items()})
    path = write_file(tmp_path / "wide.safetensors", file)
    with pytest.raises(LoraError, match="does not fit"):
        read_lora(path, linear_shapes(load_transformer(folder, dtype=torch.float32)))


@pytest.mark.parametrize("name", ["notes.txt", "lora.ckpt", "missing.safetensors"])
def test_files_that_are_no_safetensors_lora_are_clear_errors(name, tmp_path):
    path = tmp_path / name
    if name != "missing.safetensors":
        path.write_bytes(b"not a lora")
    with pytest.raises(LoraError, match=name.replace(".", r"\.")):
        read_lora(path, {"layers.0.attention.qkv": (48, 16)})


def test_a_kohya_lora_on_the_real_model_applies_every_layer_and_lists_the_rest(tmp_path):
    """The released 6B model's layer names and widths (diffusers' model and ours on the meta device): a kohya/musubi
    LoRA on every Linear of diffusers' model, plus text-encoder and TwinFlow keys users' files carry."""
    from diffusers import ZImageTransformer2DModel
    from helpers import REAL

    from zimage_core.transformer import TransformerConfig, ZImageTransformer

    with torch.device("meta"):
        layers = linears(ZImageTransformer2DModel(**REAL))
        shapes = linear_shapes(ZImageTransformer(TransformerConfig()))
    file, _, skipped = lora_file("kohya", layers, deltas=False)
    lora = read_lora(write_file(tmp_path / "style.safetensors", file), shapes)
    assert set(lora.skipped) == skipped and lora.matched == 3 * len(layers)
    assert {a.target.layer for a in lora.adapters} == set(shapes)  # every Linear of ours, q/k/v on qkv
    head = (
        f"LoRA style.safetensors (kohya/musubi): {3 * len(layers)} of {len(file)} keys applied to {len(shapes)} layers"
    )
    assert lora.summary().startswith(head + "; NOT applied:"), lora.summary()
