"""LoRA files of every Z-Image trainer, read onto our layer names, and applied to a transformer.

Trainers name the same layer many ways: diffusers/PEFT and ai-toolkit (`diffusion_model.layers.0.attention.to_q.
lora_A.weight`), kohya/musubi (`lora_unet_layers_0_attention_to_q.lora_down.weight`), DiffSynth (`layers.0.
attention.to_q.lora_A.default.weight`), the "dot" trainers (`attention.to.q.lora.down.weight`), ComfyUI's own names
(fused `attention.qkv`), LyCORIS (`lokr_w1`, `hada_w1_a`). Rather than one converter per trainer, every name is
reduced to its words (`_`, `.` and `-` alike) and looked up among the model's layers under their native and their
diffusers names, so `to_q` lands on rows [0, dim) of the fused `qkv`. The tensors are renamed to kohya/LyCORIS
names, which the math here and ComfyUI's adapters (`comfy/weight_adapter`) both read; the math follows ComfyUI
0.33.0's `lora.py`, `lokr.py` and `loha.py`. Every key that is not applied is reported with its reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .files import CheckpointError, SafetensorsFile

log = logging.getLogger(__name__)

# A file's tensor suffix -> the kohya/LyCORIS name (peft's `.default` adapter name is dropped first).
SUFFIXES = {
    "lora_up.weight": "lora_up.weight", "lora_down.weight": "lora_down.weight", "lora_mid.weight": "lora_mid.weight",
    "lora_B.weight": "lora_up.weight", "lora_A.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight", "lora.down.weight": "lora_down.weight",
    "alpha": "alpha", "dora_scale": "dora_scale", "diff": "diff", "diff_b": "diff_b",
    **{f"lokr_{n}": f"lokr_{n}" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    **{f"hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
}  # fmt: skip
# Prefixes trainers put before the transformer's layer names, and those that mark a text-encoder layer.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
            "lora_transformer_", "lycoris_", "unet.")  # fmt: skip
TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?[._]|te\d?[._])|self_attn|(gate|up|down|[qkvo])_proj")
UNSUPPORTED = {"lora_mid.weight": "a convolution LoRA (lora_mid)", "lokr_t2": "a convolution LoKr (lokr_t2)",
               "hada_t1": "a convolution LoHa (hada_t1)", "hada_t2": "a convolution LoHa (hada_t2)",
               "dora_scale": "DoRA (dora_scale)"}  # fmt: skip


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied; the message names the file and what it matched."""


def words(name: str) -> str:
    """A layer name with `_`, `.` and `-` alike, so every trainer's spelling of one layer compares equal."""
    return re.sub(r"[._\-]+", ".", name)


@dataclass(frozen=True)
class Target:
    layer: str  # our Linear, e.g. "layers.0.attention.qkv"
    rows: tuple[int, int] | None  # the rows of its weight this name covers (q/k/v of the fused qkv), None = all
    native: bool  # named as our (ComfyUI's) layer, not by diffusers' split names


def targets(shapes: dict[str, tuple[int, int]]) -> dict[str, Target]:
    """Every name a trainer may give each Linear of `shapes` (ours and diffusers'), reduced to its words."""
    found = {}
    for layer, (out, _) in shapes.items():
        found[words(layer)] = Target(layer, None, True)
        aliases = {}
        if layer.endswith(".attention.qkv"):
            base, n = layer.removesuffix(".qkv"), out // 3
            aliases = {f"{base}.to_{p}": (i * n, (i + 1) * n) for i, p in enumerate("qkv")}
        elif layer.endswith(".attention.out"):
            aliases = {layer.replace(".out", ".to_out.0"): None}
        elif layer == "x_embedder" or layer.startswith("final_layer."):
            aliases = {
                layer.replace("x_embedder", "all_x_embedder.2-1").replace("final_layer", "all_final_layer.2-1"): None
            }
        for alias, rows in aliases.items():
            found[words(alias)] = Target(layer, rows, False)
    return found


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear in `model`, whatever form it holds its weight in."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class Adapter:
    """One layer's update: LoRA (`lora_up`/`lora_down`/`alpha`), LoKr, LoHa or a full difference."""

    keys: list[str]  # the file's keys it is read from
    target: Target
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        names = self.tensors.keys()
        return next((k for k in ("lokr", "hada", "diff", "lora") if any(n.startswith(k) for n in names)), "")

    @property
    def alpha(self) -> float | None:
        return float(self.tensors["alpha"]) if "alpha" in self.tensors else None

    def delta(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The weight change at strength 1 for the target's rows: ComfyUI's formulas (alpha / rank for LoRA and
        LoHa; for LoKr only when a factor is itself low-rank)."""
        t = {k: v.to(device, dtype) for k, v in self.tensors.items() if k != "alpha"}
        kind, alpha, scale = self.kind, self.alpha, 1.0
        if kind == "lora":
            up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            delta = up @ down
        elif kind == "lokr":
            w1 = t.get("lokr_w1", None)
            w2 = t.get("lokr_w2", None)
            rank = None
            if w1 is None:
                w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
            if w2 is None:
                w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
            scale = alpha / rank if alpha is not None and rank is not None else 1.0
            delta = torch.kron(w1, w2)
        elif kind == "hada":
            scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            delta = t["diff"]
        return delta * scale

    def shape_error(self, shape: tuple[int, int]) -> str | None:
        """Why this update does not fit a weight of `shape` (its target rows), or None."""
        rows = self.target.rows
        want = (rows[1] - rows[0], shape[1]) if rows else shape
        t, kind = self.tensors, self.kind
        try:
            if kind == "lora":
                up, down = t["lora_up.weight"], t["lora_down.weight"]
                got = (up.shape[0], down[0].numel())
                if up[0].numel() != down.shape[0]:
                    return f"rank {up[0].numel()} of lora_up does not match rank {down.shape[0]} of lora_down"
            elif kind == "lokr":
                w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
                w2 = t["lokr_w2"].shape if "lokr_w2" in t else (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
                got = (w1[0] * w2[0], w1[1] * w2[1])
            elif kind == "hada":
                got = (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
                if got != (t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1]):
                    return "its two Hadamard factors differ in shape"
            else:
                got = tuple(t["diff"].shape)
        except KeyError as e:
            return f"incomplete {kind or 'update'}: no {e.args[0]}"
        return None if tuple(got) == tuple(want) else f"shape {tuple(got)} does not fit {tuple(want)}"


@dataclass
class LoRA:
    """A LoRA file read onto a model's layers: what applies, and every key that does not, with its reason."""

    path: Path
    formats: list[str]
    adapters: list[Adapter]
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not applied
    total: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def matched(self) -> int:
        return self.total - len(self.skipped)

    def summary(self, most: int | None = None) -> str:
        """What applied, and each key that did not under its reason (the first `most` per reason, if given)."""
        head = (f"LoRA {self.name} ({', '.join(self.formats) or 'unknown format'}): {self.matched} of {self.total} "
                f"keys applied to {len({a.target.layer for a in self.adapters})} layers")  # fmt: skip
        if not self.skipped:
            return head
        reasons: dict[str, list[str]] = {}
        for key, why in self.skipped.items():
            reasons.setdefault(why, []).append(key)
        lines = []
        for why, keys in reasons.items():
            more = f", and {len(keys) - most} more" if most is not None and len(keys) > most else ""
            lines.append(f"  not applied, {why}: {len(keys)} keys: {', '.join(keys[:most])}{more}")
        return "\n".join([head + "; NOT applied:", *lines])


def formats_of(keys: Iterable[str]) -> list[str]:
    """The trainers' formats a file's names show, for the report."""
    keys = list(keys)
    seen = {
        "kohya/musubi": any(k.startswith("lora_unet_") for k in keys),
        "diffusers/PEFT": any(".lora_A." in k or ".lora_B." in k for k in keys),
        "DiffSynth (peft .default)": any(".default." in k for k in keys),
        "dot (.lora.down)": any(".lora.down." in k for k in keys),
        "LyCORIS LoKr": any(".lokr_" in k for k in keys),
        "LyCORIS LoHa": any(".hada_" in k for k in keys),
        "full difference": any(k.endswith((".diff", ".diff_b")) for k in keys),
    }
    return [name for name, present in seen.items() if present]


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name, kohya/LyCORIS tensor name) of a file's key, or None when it is no update tensor."""
    plain = key.replace(".default.", ".").removesuffix(".default")
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if plain.endswith("." + suffix):
            return plain[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


def strip_prefixes(name: str) -> str:
    while (prefix := next((p for p in PREFIXES if name.startswith(p)), None)) is not None:
        name = name[len(prefix) :]
    return name


def check_file(path: str | Path) -> Path:
    """`path` when it can be a LoRA file (checked before anything slow), else a `LoraError` naming it."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path}: LoRAs are read from .safetensors files only (pickled files can run code).")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file.")
    return path


def read_lora(path: str | Path, shapes: dict[str, tuple[int, int]]) -> LoRA:
    """Read a LoRA file onto the Linears `shapes` describes (`linear_shapes(model)`). Raises `LoraError` naming
    the file when nothing in it applies."""
    path = check_file(path)
    file = SafetensorsFile(path)
    try:
        tensors = {}
        for key in file.entries:
            tensors[key] = file.read(key).clone()
            file.release(key)
    finally:
        file.close()
    lora = LoRA(path, formats_of(tensors), [], total=len(tensors))
    names = targets(shapes)
    groups: dict[str, dict[str, str]] = {}  # layer words -> {tensor name: file key}
    for key in tensors:
        parts = split_key(key)
        if parts is None:
            lora.skipped[key] = "not a LoRA, LoKr or LoHa tensor"
            continue
        layer, name = parts
        if TEXT_ENCODER.search(layer):
            lora.skipped[key] = "a text-encoder key (this applies to the transformer only)"
            continue
        group = groups.setdefault(words(strip_prefixes(layer)), {})
        if name in group:
            lora.skipped[key] = f"a second copy of {group[name]}"
            continue
        group[name] = key
    for layer, group in groups.items():
        target = names.get(layer)
        adapter = Adapter(list(group.values()), target, {n: tensors[k] for n, k in group.items()})
        why = None if target else "no such layer in this Z-Image transformer"
        why = why or next((v for k, v in UNSUPPORTED.items() if k in group), None)
        why = why or (None if adapter.kind else "alpha without an update") or adapter.shape_error(shapes[target.layer])
        if why:
            lora.skipped.update(dict.fromkeys(adapter.keys, why))
        else:
            lora.adapters.append(adapter)
    drop_duplicates(lora)
    if not lora.adapters:
        raise LoraError(f"{path}: none of its {lora.total} keys applies to this Z-Image transformer.\n"
                        f"{lora.summary(most=10)}\nIs it a LoRA for another model?")  # fmt: skip
    return lora


def drop_duplicates(lora: LoRA):
    """Some trainers (Anime-Z) save each attention update twice: split `to_q/k/v`, `to_out.0` and fused `qkv`,
    `out`. Applying both would double it; as diffusers does, the split names win and the fused copy is reported."""
    split = {a.target.layer for a in lora.adapters if not a.target.native}
    kept = []
    for a in lora.adapters:
        if a.target.native and a.target.layer in split:
            lora.skipped.update(dict.fromkeys(a.keys, "a fused copy of the split q/k/v or to_out.0 keys beside it"))
        else:
            kept.append(a)
    lora.adapters = kept


def add_updates(weight: torch.Tensor, updates: list[tuple[Adapter, float]]) -> torch.Tensor:
    """`weight` plus each update times its strength, summed in fp32 and rounded once to `weight`'s dtype."""
    total = weight.detach().to(torch.float32, copy=True)
    for adapter, strength in updates:
        rows = adapter.target.rows or (0, total.shape[0])
        total[rows[0] : rows[1]] += adapter.delta(torch.float32, weight.device) * strength
    return total.to(weight.dtype)


class Applied:
    """LoRAs applied to a model. `restore()` gives it back bit for bit: merged weights from the copies kept
    (`keep_originals`), compact weights by dropping their per-call updates (they were never changed)."""

    def __init__(self):
        self.originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.per_call: list[tuple[nn.Module, object]] = []
        self.merged = self.compact = 0  # layers

    def restore(self):
        with torch.no_grad():
            for param, original in self.originals:
                param.copy_(original)
        for layer, update in self.per_call:
            layer.weight_function.remove(update)
        self.originals, self.per_call = [], []

    def describe(self) -> str:
        parts = [f"merged into {self.merged} layers' weights"] if self.merged else []
        parts += [f"added per call to {self.compact} compact (quantized) layers"] if self.compact else []
        return " and ".join(parts)


def apply_loras(model: nn.Module, loras: list[tuple[LoRA, float]], keep_originals: bool = True) -> Applied:
    """Apply `loras` (each with its strength) to `model`: merged into dense weights (one fp32 sum per layer,
    rounded once), and as a per-call update of a compact or fp8 weight, which stays as stored (`ops.Linear`)."""
    by_layer: dict[str, list[tuple[Adapter, float]]] = {}
    for lora, strength in loras:
        for adapter in lora.adapters:
            by_layer.setdefault(adapter.target.layer, []).append((adapter, strength))
    applied = Applied()
    with torch.no_grad():
        for name, updates in by_layer.items():
            layer = model.get_submodule(name)
            biases = [(a.tensors["diff_b"], s) for a, s in updates if "diff_b" in a.tensors]
            if biases and layer.bias is not None:
                keep(applied, layer.bias, keep_originals)
                layer.bias.copy_(sum((b.float() * s for b, s in biases), layer.bias.float()).to(layer.bias.dtype))
            if getattr(layer, "is_compact", False) or layer.weight.element_size() == 1:  # fp8 too: never round to it
                update = partial(add_updates, updates=updates)
                layer.weight_function.append(update)
                applied.per_call.append((layer, update))
                applied.compact += 1
            else:
                keep(applied, layer.weight, keep_originals)
                layer.weight.copy_(add_updates(layer.weight, updates))
                applied.merged += 1
    return applied


def keep(applied: Applied, param: torch.Tensor, keep_originals: bool):
    if keep_originals:
        applied.originals.append((param, param.detach().clone()))
