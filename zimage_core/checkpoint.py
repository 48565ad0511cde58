"""Weight files and folders to tensors, and tensors into a model built on the meta device.

Models are built on the meta device and filled tensor by tensor from the files (`files.py`), cast on the way, each
tensor's pages handed back right after its copy. Files and folders: a single safetensors or GGUF file, a diffusers
folder (`config.json`, one file or shards with an index), a whole diffusers pipeline folder (`model_index.json`);
fp8 weights plain, in the older scaled form (`scaled_fp8`, `*.scale_weight`) or in ComfyUI's quantized form
(`*.weight_scale`, `*.comfy_quant`, `_quantization_metadata`, `quant.py`), GGML blocks in GGUF files (`ggml.py`).
What each component's tensors are called in each release is `loaders.py`'s business.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import PICKLE_SUFFIXES, CheckpointError, GGUFFile, MappedFile, SafetensorsFile
from .ops import Compact
from .quant import FP8, Format, dequantize

SHARD = re.compile(r"-\d{5}-of-(\d{5})\.safetensors$")


@dataclass
class Checkpoint:
    """The tensors of one model component, gathered from one file or a folder of shards."""

    path: Path
    layout: str
    files: list[MappedFile]
    config: dict | None = None
    names: dict[str, MappedFile] = field(default_factory=dict)

    def __post_init__(self):
        for f in self.files:
            for name in f.entries:
                if name in self.names:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is also in {self.names[name].path}.")
                self.names[name] = f

    @property
    def metadata(self) -> dict:
        return {k: v for f in self.files for k, v in f.metadata.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.names[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.names[name].entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        return self.names[name].read(name)

    def release(self, name: str):
        self.names[name].release(name)

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str | Path, component: str = "transformer") -> Checkpoint:
    """Find the safetensors files of `component` at `path`: a file, a diffusers folder or a pipeline folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path}: {suffix} files are Python pickles, which can run code when loaded; they are never "
                "loaded here. Use the .safetensors release of this model."
            )
        if suffix == ".gguf":
            return Checkpoint(path, "GGUF file", [GGUFFile(path)])
        if path.name.endswith(".safetensors.index.json"):
            return open_checkpoint(path.parent, component)
        return Checkpoint(path, "single file", [SafetensorsFile(path)])
    if (path / "model_index.json").is_file() or (not (path / "config.json").exists() and (path / component).is_dir()):
        sub = path / component
        if not sub.is_dir():
            raise CheckpointError(f"{path}: this diffusers pipeline folder has no {component}/ subfolder.")
        ckpt = open_checkpoint(sub, component)
        ckpt.path, ckpt.layout = path, "diffusers pipeline folder"
        return ckpt
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e}).") from None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = next((i for i in indexes if i.name.startswith("diffusion_pytorch_model")), indexes[0])
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}). Re-download it.") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} of the {len(shards)} shards listed in {index.name} are missing: "
                f"{', '.join(missing)}. Download them into this folder."
            )
        ckpt = Checkpoint(path, "diffusers folder", [SafetensorsFile(path / s) for s in shards], config)
        absent = [n for n, s in weight_map.items() if n not in ckpt.names or ckpt.names[n].path.name != s]
        if absent:
            raise CheckpointError(f"{index}: lists tensors its shards do not hold, first: {', '.join(absent[:5])}.")
        return ckpt
    files = sorted(path.glob("*.safetensors"))
    if len(files) > 1 and all(SHARD.search(f.name) for f in files):
        raise CheckpointError(
            f"{path}: holds {len(files)} weight shards but no *.safetensors.index.json, which says what each "
            "shard holds. Download the index file from the same repository into this folder."
        )
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        pickles = [f.name for f in path.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
        hint = f" (pickle files {', '.join(pickles)} are never loaded)" if pickles else ""
        raise CheckpointError(
            f"{path}: expected one .safetensors file or shards with an index, found {found}{hint}. "
            "Point at a single file or at a diffusers model folder."
        )
    return Checkpoint(path, "diffusers folder", [SafetensorsFile(files[0])], config)


# What a file is when it is not what was asked for: the first marker found among its tensor names wins.
LOOKALIKES = (
    ("double_blocks.", "a Flux transformer"),
    ("single_transformer_blocks.", "a Flux transformer (diffusers layout)"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer"),
    ("conditioner.embedders.", "a Stable Diffusion XL checkpoint"),
    ("input_blocks.", "a Stable Diffusion 1.x/2.x UNet checkpoint"),
    ("transformer_blocks.0.img_mod.", "a Qwen-Image transformer"),
    ("head.modulation", "a Wan video transformer"),
    ("layers.0.adaLN_modulation.1.", "a Lumina 2 transformer"),
    ("layers.0.adaLN_modulation.0.", "a Z-Image transformer"),
    ("control_layers.", "a Z-Image ControlNet patch"),
    ("lora_", "a LoRA"),
    ("visual.blocks.", "a Qwen2.5-VL text encoder"),
    ("layers.0.pre_feedforward_layernorm.", "a Gemma text encoder"),
    ("layers.0.self_attn.q_norm.", "a Qwen3 text encoder"),
    ("layers.0.self_attn.q_proj.bias", "a Qwen2/Qwen2.5 language model (text encoder)"),
    ("layers.0.self_attn.q_proj.", "a language-model text encoder"),
    ("text_model.encoder.layers.", "a CLIP text encoder"),
    ("encoder.block.0.layer.0.SelfAttention.", "a T5 text encoder"),
    ("decoder.upsamples.", "a Wan / Qwen-Image video VAE"),
    ("decoder.up", "a VAE (autoencoder)"),
    ("down_blocks.0.resnets.", "a diffusers UNet"),
)


def looks_like(names) -> str:
    """Say what a set of tensor names looks like, for error messages."""
    for marker, what in LOOKALIKES:
        if any(marker in n for n in names):
            return what
    return "an unknown model"


# Tensors that say how quantized weights are stored: read with their weights, never parameters themselves.
QUANT_AUX = re.compile(
    r"(\.(weight_scale|weight_scale_2|scale_weight|input_scale|scale_input|pre_quant_scale|comfy_quant)"
    r"|(^|\.)scaled_fp8)$"
)


# ---- building a model from a checkpoint ----


@dataclass(frozen=True)
class Stored:
    """How one quantized weight is stored: its format (None: fp8 times `scale`) and its scale tensors' names."""

    fmt: Format | None
    label: str
    scale: str | None
    scale_2: str | None = None


def quant_layers(ckpt: Checkpoint) -> dict[str, dict]:
    """layer -> its `comfy_quant` entry, from the header's `_quantization_metadata` and per-layer tensors."""
    layers = {}
    meta = ckpt.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = dict(json.loads(meta)["layers"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: unreadable _quantization_metadata ({e!r}).") from None
    for name in ckpt.names:
        if name.endswith(".comfy_quant"):
            conf = bytes(ckpt.read(name).view(torch.uint8).tolist()).decode("utf-8", "replace")
            ckpt.release(name)
            try:
                layers[name.removesuffix(".comfy_quant")] = json.loads(conf)
            except json.JSONDecodeError:
                raise CheckpointError(f"{ckpt.path}: {name} is not valid JSON: {conf!r}.") from None
    return layers


def stored_weights(ckpt: Checkpoint) -> dict[str, Stored]:
    """weight name -> how it is stored, for every quantized weight, after checking each is complete."""
    names, stored = set(ckpt.names), {}
    for layer, conf in quant_layers(ckpt).items():
        try:
            fmt = Format.parse(conf, f"layer {layer}")
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        weight, scale = f"{layer}.weight", f"{layer}.weight_scale"
        scale_2 = f"{layer}.weight_scale_2" if fmt.name == "nvfp4" else None
        needed = [n for n in (weight, scale, scale_2) if n and n not in names]
        if needed:
            raise CheckpointError(
                f"{ckpt.path}: layer {layer} ({fmt.label}) lacks {', '.join(needed)}. Re-download it."
            )
        if f"{layer}.pre_quant_scale" in names:
            raise CheckpointError(f"{ckpt.path}: layer {layer} has an AWQ pre_quant_scale, which we do not apply.")
        if ckpt.dtype(weight).itemsize != fmt.storage.itemsize:
            raise CheckpointError(f"{ckpt.path}: {weight} is {ckpt.dtype(weight)}, not {fmt.label} ({fmt.storage}).")
        if fmt.name.startswith("float8"):
            stored[weight] = Stored(None, f"fp8 ({fmt.name}), ComfyUI quantized", scale)
        else:
            stored[weight] = Stored(fmt, fmt.label, scale, scale_2)
    for f in ckpt.files:
        stored.update({name: Stored(Format(kind), f"GGUF {kind}", None) for name, kind in f.kinds.items()})
    for name in names:
        for suffix, label in ((".scale_weight", "fp8, scaled (scaled_fp8)"), (".weight_scale", "fp8, scaled")):
            weight = name.removesuffix(suffix) + ".weight"
            if name.endswith(suffix) and weight not in stored:
                stored[weight] = Stored(None, label, name)
    return stored


def dtype_summary(ckpt: Checkpoint) -> dict[str, int]:
    return dict(Counter(f.kinds.get(n) or str(ckpt.dtype(n)).removeprefix("torch.") for n, f in ckpt.names.items()))


def quantization(ckpt: Checkpoint) -> str:
    """Each storage form and the groups of layers in it (`layers.N.` as `layers.*.`), for `inspect`."""
    stored = stored_weights(ckpt)
    groups: dict[str, set] = {}
    for name in ckpt.names:
        if name.endswith(".weight") and len(ckpt.shape(name)) >= 2:
            label = stored[name].label if name in stored else ("fp8" if ckpt.dtype(name) in FP8 else "")
            groups.setdefault(label, set()).add(re.sub(r"\.\d+\.", ".*.", name.removesuffix(".weight")))
    if set(groups) <= {""}:
        return "none"
    order = sorted(groups, key=lambda g: (g == "", -len(groups[g])))
    return "; ".join(f"{g or 'not quantized'}: {', '.join(sorted(groups[g]))}" for g in order)


def squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def fill(model: nn.Module, ckpt: Checkpoint, sources, device, dtype, weight_dtype=None, expected_as=""):
    """Replace every meta parameter by real memory on `device` holding the checkpoint's values.

    Quantized Linear weights stay compact with their scales in a Linear that dequantizes per call
    (`ops.Compact`); for any other layer they are dequantized here. With `weight_dtype` fp8, other Linear weights
    are cast to it; everything else becomes `dtype`. Sources listed together are stacked along dim 0.
    """
    stored = stored_weights(ckpt)
    expected = dict(model.named_parameters())
    missing = [n for n in expected if n not in sources]
    unexpected = [src for n, srcs in sources.items() if n not in expected for src in srcs]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})"] if unexpected else []
        raise CheckpointError(f"{ckpt.path}: tensors do not match {expected_as}: {'; '.join(parts)}.")
    wrong = []
    for name, p in expected.items():
        srcs = sources[name]
        packed = [stored[s].fmt for s in srcs if s in stored and stored[s].fmt]
        if packed:
            fits = len(srcs) == 1 and packed[0].fits(ckpt.shape(srcs[0]), tuple(p.shape))
            if not fits:
                wrong.append(f"{' + '.join(srcs)} ({packed[0].label}) is {' + '.join(str(ckpt.shape(s)) for s in srcs)}, "
                             f"expected {tuple(p.shape)}")  # fmt: skip
            continue
        shapes = [ckpt.shape(s) for s in srcs]
        got = (sum(s[0] for s in shapes), *shapes[0][1:]) if all(s[1:] == shapes[0][1:] for s in shapes) else None
        if got is None or squeezed(got) != squeezed(p.shape):  # (C, C, 1, 1) 1x1-conv weights fill (C, C) Linears
            wrong.append(f"{' + '.join(srcs)} is {' + '.join(map(str, shapes))}, expected {tuple(p.shape)}")
    if wrong:
        raise CheckpointError(
            f"{ckpt.path}: {len(wrong)} tensors have the wrong shape for {expected_as}, first: {'; '.join(wrong[:3])}."
        )

    modules = dict(model.named_modules())
    for name, p in expected.items():
        owner, leaf = name.rpartition(".")[::2]
        module = modules[owner]
        srcs = sources[name]
        compact = leaf == "weight" and isinstance(module, Compact)
        if srcs[0] in stored and stored[srcs[0]].fmt:
            fill_packed(module, leaf, tuple(p.shape), ckpt, srcs[0], stored[srcs[0]], device, dtype, compact)
            continue
        is_linear_weight = isinstance(module, nn.Linear) and leaf == "weight"
        src_dtypes = {ckpt.dtype(s) for s in srcs}
        if is_linear_weight and len(src_dtypes) == 1 and src_dtypes <= set(FP8):
            held = src_dtypes.pop()
        elif is_linear_weight and weight_dtype in FP8:
            held = weight_dtype
        else:
            held = dtype
        scaled = held in FP8 and any(s in stored for s in srcs)
        if scaled and not compact:
            held, scaled = dtype, False  # a layer that knows no per-row scale holds the weight dequantized
        out = torch.empty(p.shape, dtype=held, device=device)
        row_scale = torch.ones(p.shape[0], 1) if scaled else None
        row = 0
        for src in srcs:
            t = ckpt.read(src)
            scale = stored.get(src) and ckpt.read(stored[src].scale).float().reshape(-1, *[1] * (t.dim() - 1))
            if row_scale is not None and scale is not None:  # kept in fp8: the scale is applied per call
                row_scale[row : row + len(t)] = scale.reshape(-1, 1)
            elif scale is not None:
                t = t.float() * scale
            out[row : row + len(t)].copy_(t.reshape(-1, *out.shape[1:]))
            ckpt.release(src)
            row += len(t)
        module._parameters[leaf] = nn.Parameter(out, requires_grad=False)
        if row_scale is not None:
            module.weight_scale = row_scale.to(device)


def fill_packed(module, leaf, shape, ckpt: Checkpoint, src: str, how: Stored, device, dtype, compact: bool):
    """One int8, mxfp8 or nvfp4 weight: kept as stored with its scales (`compact`), or dequantized to `dtype`."""
    fmt = how.fmt
    data = ckpt.read(src).view(fmt.storage)
    try:
        scale = how.scale and fmt.prepare_scale(ckpt.read(how.scale), tuple(data.shape))
    except RuntimeError:
        raise CheckpointError(
            f"{ckpt.path}: {how.scale} {ckpt.shape(how.scale)} does not fit {src} {tuple(data.shape)} ({fmt.label})."
        ) from None
    scale_2 = ckpt.read(how.scale_2).float().reshape(()).clone() if how.scale_2 else None
    if compact:
        module._parameters[leaf] = nn.Parameter(torch.empty_like(data, device=device).copy_(data), requires_grad=False)
        module.quant, module.weight_scale = fmt, None if scale is None else scale.to(device)
        module.dense_dtype = dtype
        module.weight_scale_2 = None if scale_2 is None else scale_2.to(device)
    else:
        weight = dequantize(data, fmt, scale, scale_2, shape, dtype)
        module._parameters[leaf] = nn.Parameter(weight.to(device), requires_grad=False)
    for name in (src, how.scale, how.scale_2):
        if name:
            ckpt.release(name)


@dataclass
class ModelInfo:
    """What a loader found: shown by `inspect` and kept on the model as `model.info`."""

    kind: str
    path: str
    layout: str
    prefix: str
    file_dtypes: dict
    quantization: str
    config: dict
    parameters: int
    held_bytes: int
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def describe(kind: str, model: nn.Module, ckpt: Checkpoint, prefix: str, config: dict, device, dtype) -> dict:
    """The fields every `ModelInfo` has, for a model just filled from `ckpt`."""
    return {
        "kind": kind,
        "path": str(ckpt.path),
        "layout": ckpt.layout,
        "prefix": prefix,
        "file_dtypes": dtype_summary(ckpt),
        "quantization": quantization(ckpt),
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_bytes": sum(t.nbytes for t in [*model.parameters(), *model.buffers()]),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
