"""From a user's path to a ready model: safetensors files, the layouts Z-Image ships in, fp8 forms, errors.

Models are built on the meta device and filled tensor by tensor from memory maps of the files, cast on the way,
and each tensor's pages are handed back to the kernel right after its copy. (The safetensors library keeps every
page it touched mapped until the file is closed, which doubles peak RSS for a full-size model; the format
itself is a JSON header and raw little-endian data, so reading it here takes a few lines.)

Layouts: a diffusers folder (`config.json`, one file or shards with an index), a whole diffusers pipeline folder
(`model_index.json`), and single files in ComfyUI's naming (with or without `model.diffusion_model.`) or in
diffusers' naming; fp8 weights plain, in the older scaled form (`scaled_fp8`, `*.scale_weight`) or in ComfyUI's
quantized form (`*.weight_scale`, `*.comfy_quant`, `_quantization_metadata`).
"""

from __future__ import annotations

import json
import math
import mmap
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .transformer import Linear, TransformerConfig, ZImageTransformer
from .vae import VAE, VAEConfig

if TYPE_CHECKING:
    from .text_encoder import TextEncoder


class CheckpointError(Exception):
    """A file or folder that cannot be loaded; the message names it and says what to do."""


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
SHARD = re.compile(r"-\d{5}-of-(\d{5})\.safetensors$")


class SafetensorsFile:
    """One safetensors file: its validated header, and tensors read from a private memory map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size or n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length). Re-download it.")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e}). Re-download it.") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header. Re-download it.")
        self.metadata = header.pop("__metadata__", None) or {}
        base, data_size, self.entries = 8 + n, size - 8 - n, {}
        for name, e in header.items():
            try:
                dtype, shape, (start, end) = DTYPES.get(e["dtype"]), [int(d) for d in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}. Re-download it.") from None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which is not supported.")
            if end - start != math.prod(shape) * dtype.itemsize or start < 0:
                raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}. Re-download it.")
            self.entries[name] = (dtype, tuple(shape), base + start, base + end)
        needed = max((e[3] for e in self.entries.values()), default=base) - base
        if needed > data_size:
            raise CheckpointError(
                f"{path}: truncated: its header needs {needed + base:,} bytes but the file has {size:,}. "
                "The download or copy did not finish; fetch the file again."
            )
        self._map = None

    def read(self, name: str) -> torch.Tensor:
        """A CPU tensor viewing the file's bytes; copy it, then call `release(name)`."""
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes back
        if start % dtype.itemsize:
            return torch.frombuffer(bytearray(self._map[start:end]), dtype=dtype).view(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start).view(shape)

    def release(self, name: str):
        """Drop the pages of `name` from this process (they stay in the page cache)."""
        _, _, start, end = self.entries[name]
        if self._map is not None and end > start:
            page = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, page, end - page)

    def close(self):
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map (an error is on its way up): let GC unmap it
                pass
            self._map = None


@dataclass
class Checkpoint:
    """The tensors of one model component, gathered from one file or a folder of shards."""

    path: Path
    layout: str
    files: list[SafetensorsFile]
    config: dict | None = None
    names: dict[str, SafetensorsFile] = field(default_factory=dict)

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
        return self.names[name].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.names[name].entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        return self.names[name].read(name)

    def release(self, name: str):
        self.names[name].release(name)

    def close(self):
        for f in self.files:
            f.close()


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
            raise CheckpointError(f"{path}: GGUF files are not supported; use the bf16 or fp8 .safetensors file.")
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
            config = json.loads((path / "config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e}).") from None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = next((i for i in indexes if i.name.startswith("diffusion_pytorch_model")), indexes[0])
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
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


# The tensor each component always has (after its prefix).
TRANSFORMER_MARKER = "layers.0.adaLN_modulation.0.weight"
TEXT_ENCODER_MARKER = "layers.0.self_attn.q_norm.weight"
VAE_MARKER = "decoder.conv_in.weight"
MARKERS = {"transformer": TRANSFORMER_MARKER, "text_encoder": TEXT_ENCODER_MARKER, "vae": VAE_MARKER}


def components(path: str | Path) -> list[str]:
    """The Z-Image components at `path`: a pipeline folder's subfolders, or what a file's tensor names show."""
    path = Path(path).expanduser()
    if path.is_dir() and ((path / "model_index.json").is_file() or not (path / "config.json").exists()):
        found = [c for c in MARKERS if (path / c).is_dir()]
        if found:
            return found
    ckpt = open_checkpoint(path)
    ckpt.close()
    found = [c for c, marker in MARKERS.items() if any(n.endswith(marker) for n in ckpt.names)]
    if not found:
        raise CheckpointError(
            f"{ckpt.path}: not a Z-Image transformer, Qwen3 text encoder or Flux VAE; it looks like "
            f"{looks_like(ckpt.names)}."
        )
    return found


# ---- the Z-Image transformer layouts ----

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
DIFFUSERS_RENAMES = (
    (re.compile(r"^all_x_embedder\.(\d+)-1\."), "x_embedder."),
    (re.compile(r"^all_final_layer\.(\d+)-1\."), "final_layer."),
    (re.compile(r"\.attention\.to_out\.0\."), ".attention.out."),
    (re.compile(r"\.attention\.norm_q\."), ".attention.q_norm."),
    (re.compile(r"\.attention\.norm_k\."), ".attention.k_norm."),
)
QKV = re.compile(r"\.attention\.to_([qkv])\.weight$")
IGNORED = {"norm_final.weight"}  # a Lumina 2 leftover some single files carry; not a Z-Image parameter
QUANT_AUX = re.compile(r"(\.(weight_scale|scale_weight|input_scale|scale_input|comfy_quant)|(^|\.)scaled_fp8)$")


def transformer_sources(ckpt: Checkpoint) -> tuple[dict[str, list[str]], str]:
    """Map our parameter names to the checkpoint's tensor names (q/k/v sources fused in that order)."""
    names = [n for n in ckpt.names if not QUANT_AUX.search(n)]
    prefix = next((p for p in TRANSFORMER_PREFIXES if p + TRANSFORMER_MARKER in ckpt.names), None)
    if prefix is None:
        raise CheckpointError(
            f"{ckpt.path}: not a Z-Image transformer: it looks like {looks_like(names)} "
            f"(no {TRANSFORMER_MARKER} among its {len(names)} tensors)."
        )
    sources: dict[str, list[str]] = {}
    for name in names:
        if not name.startswith(prefix) or name[len(prefix) :] in IGNORED:
            continue
        ours = name[len(prefix) :]
        for pattern, repl in DIFFUSERS_RENAMES:
            ours = pattern.sub(repl, ours)
        qkv = QKV.search(ours)
        if qkv:
            ours = ours[: qkv.start()] + ".attention.qkv.weight"
        sources.setdefault(ours, []).append(name)
    for srcs in sources.values():  # q, k, v rows in that order whatever order the files list them in
        srcs.sort(key=lambda n: "qkv".find(m.group(1)) if (m := QKV.search(n)) else 0)
    return sources, prefix


def transformer_config(ckpt: Checkpoint, sources: dict[str, list[str]], config: dict | None) -> TransformerConfig:
    """The architecture from a diffusers config.json when there is one, otherwise from the tensors' shapes."""
    config = config if config is not None else ckpt.config
    where = ckpt.path / "config.json" if config is ckpt.config else "the given config"
    if config is not None:
        kind = config.get("_class_name", "ZImageTransformer2DModel")
        if kind != "ZImageTransformer2DModel":
            raise CheckpointError(f"{where}: describes a {kind}, not a ZImageTransformer2DModel.")
        # n_kv_heads is ignored, as diffusers ignores it: k and v always have n_heads heads in released weights
        unsupported = {
            k: config[k] for k, ok in (("all_f_patch_size", [1]), ("qk_norm", True)) if config.get(k, ok) != ok
        }
        if len(config.get("all_patch_size", [2])) != 1 or unsupported:
            raise CheckpointError(f"{where}: unsupported transformer settings {unsupported or config}.")
        keys = {f for f in TransformerConfig.__dataclass_fields__ if f in config and f != "patch_size"}
        values = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in keys}
        return TransformerConfig(patch_size=config.get("all_patch_size", [2])[0], **values)

    def shape(name, required=True):
        if name not in sources:
            if required:
                raise CheckpointError(f"{ckpt.path}: missing {name}, which every Z-Image transformer has.")
            return None
        return ckpt.shape(sources[name][0])

    dim, cap_feat_dim = shape("cap_embedder.1.weight")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    patch = re.search(r"all_x_embedder\.(\d+)-", sources.get("x_embedder.weight", [""])[0])
    patch = int(patch.group(1)) if patch else 2
    if head_dim != 128:
        raise CheckpointError(
            f"{ckpt.path}: head size {head_dim} is not the released 128, so its RoPE split cannot be inferred "
            "from the tensors; pass the model's diffusers config.json."
        )
    siglip = shape("siglip_embedder.1.weight", required=False)
    count = {
        block: len({n.split(".")[1] for n in sources if n.startswith(block + ".")})
        for block in ("layers", "noise_refiner")
    }
    return TransformerConfig(
        in_channels=shape("x_embedder.weight")[1] // patch**2,
        dim=dim,
        n_layers=count["layers"],
        n_refiner_layers=count["noise_refiner"],
        n_heads=dim // head_dim,
        cap_feat_dim=cap_feat_dim,
        siglip_feat_dim=siglip[1] if siglip else None,
        patch_size=patch,
    )


def transformer_variant(ckpt: Checkpoint, sources) -> tuple[str, str]:
    """(variant, why): Omni/Edit by its SigLIP weights; Turbo and Base share every key, so by name or metadata."""
    if "siglip_embedder.1.weight" in sources:
        return "omni", "has SigLIP reference-image weights"
    names = [ckpt.path.name, ckpt.path.parent.name if ckpt.path.name == "transformer" else ""]
    text = " ".join([*names, json.dumps(ckpt.metadata), str((ckpt.config or {}).get("_name_or_path", ""))]).lower()
    for variant in ("turbo", "base"):
        if re.search(rf"(?<![a-z]){variant}(?![a-z])", text):
            return variant, f"'{variant}' in its name or metadata"
    return "turbo", "assumed: Turbo and Base have the same tensors and nothing names either"


# ---- the Qwen3 text encoder layouts ----

# Qwen3-4B as Z-Image ships it (text_encoder/config.json, ComfyUI's Qwen3_4BConfig). What tensor shapes cannot
# tell (RoPE base, norm epsilon, context) is the same across the Qwen3 family.
QWEN3_4B = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
}  # fmt: skip
QWEN3_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960}
QWEN3_CONFIG_KEYS = (*QWEN3_4B, *QWEN3_DEFAULTS, "attention_bias", "hidden_act")


def text_encoder_sources(ckpt: Checkpoint) -> tuple[dict[str, list[str]], str, int]:
    """Map our parameter names to the file's, skipping what is never run: the last layer, the final norm, lm_head.

    Returns (sources, prefix, number of layers in the file). Any prefix is accepted (`model.` in ComfyUI's file,
    none in a diffusers `Qwen3Model` save, `text_encoders.qwen3_4b.transformer.model.` in all-in-one files).
    """
    names = [n for n in ckpt.names if not QUANT_AUX.search(n)]
    prefixes = sorted({n[: -len(TEXT_ENCODER_MARKER)] for n in names if n.endswith(TEXT_ENCODER_MARKER)})
    if len(prefixes) == 1:
        what = looks_like([n for n in names if n.startswith(prefixes[0])])
    else:
        what = looks_like(names) if not prefixes else f"{len(prefixes)} language models ({', '.join(prefixes)})"
    if what != "a Qwen3 text encoder":
        raise CheckpointError(
            f"{ckpt.path}: not a Qwen3 text encoder (Z-Image's is Qwen3-4B, e.g. qwen_3_4b.safetensors): "
            f"it looks like {what}."
        )
    prefix = prefixes[0]
    rest = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    n_layers = 1 + max(int(m.group(1)) for n in rest if (m := re.match(r"layers\.(\d+)\.", n)))
    if n_layers < 2:
        raise CheckpointError(f"{ckpt.path}: a Qwen3 model with 1 layer; Z-Image reads the second-to-last.")
    skipped = (f"layers.{n_layers - 1}.", "norm.weight")
    return {"model." + n: [prefix + n] for n in rest if not n.startswith(skipped)}, prefix, n_layers


def text_encoder_config(ckpt: Checkpoint, sources, n_layers: int, config: dict | None) -> dict:
    """Qwen3Config arguments for the whole language model, from config.json or from the tensors' shapes."""
    config = config if config is not None else ckpt.config
    where = ckpt.path / "config.json" if config is ckpt.config else "the given config"
    if config is not None:
        if config.get("model_type", "qwen3") != "qwen3":
            raise CheckpointError(f"{where}: describes a {config['model_type']} model, not Qwen3.")
        if config.get("rope_scaling") or config.get("use_sliding_window"):
            raise CheckpointError(f"{where}: RoPE scaling and sliding-window attention are not supported.")
        out = {k: config[k] for k in QWEN3_CONFIG_KEYS if config.get(k) is not None}
        out.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
        if out.get("num_hidden_layers", n_layers) != n_layers:
            raise CheckpointError(f"{where}: says {out['num_hidden_layers']} layers; the weights hold {n_layers}.")
        return {k: v for k, v in out.items() if v is not None}

    def shape(name):
        if name not in sources:
            raise CheckpointError(f"{ckpt.path}: missing {name.removeprefix('model.')}, which every Qwen3 model has.")
        return ckpt.shape(sources[name][0])

    vocab, hidden = shape("model.embed_tokens.weight")
    head_dim = shape("model.layers.0.self_attn.q_norm.weight")[0]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shape("model.layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": n_layers,
        "num_attention_heads": shape("model.layers.0.self_attn.q_proj.weight")[0] // head_dim,
        "num_key_value_heads": shape("model.layers.0.self_attn.k_proj.weight")[0] // head_dim,
        "head_dim": head_dim,
        **QWEN3_DEFAULTS,
    }


def find_tokenizer(ckpt: Checkpoint) -> Path | None:
    """A folder layout's own tokenizer: next to the weights, or the pipeline's `tokenizer/` beside them."""
    if ckpt.layout == "single file":
        return None
    here = ckpt.files[0].path.parent
    for folder in (here, here.parent / "tokenizer"):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


# ---- the Flux VAE layouts ----

VAE_RENAMES = (  # diffusers `AutoencoderKL` names -> Black Forest Labs' (ours); decoder levels are renumbered apart
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\."), r"encoder.down.\1.block."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."), r"encoder.down.\1.downsample."),
    (re.compile(r"\.mid_block\.resnets\.0\."), ".mid.block_1."),
    (re.compile(r"\.mid_block\.resnets\.1\."), ".mid.block_2."),
    (re.compile(r"\.mid_block\.attentions\.0\.group_norm\."), ".mid.attn_1.norm."),
    (re.compile(r"\.mid_block\.attentions\.0\.to_(q|k|v)\."), r".mid.attn_1.\1."),
    (re.compile(r"\.mid_block\.attentions\.0\.to_out\.0\."), ".mid.attn_1.proj_out."),
    (re.compile(r"\.conv_shortcut\."), ".nin_shortcut."),
    (re.compile(r"\.conv_norm_out\."), ".norm_out."),
)
DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")


def vae_sources(ckpt: Checkpoint) -> tuple[dict[str, list[str]], str, str]:
    """Map our parameter names to the file's: (sources, prefix, naming), BFL/ComfyUI or diffusers names."""
    names = list(ckpt.names)
    prefixes = sorted({n[: -len(VAE_MARKER)] for n in names if n.endswith(VAE_MARKER)})
    if len(prefixes) != 1:
        what = looks_like(names) if not prefixes else f"{len(prefixes)} autoencoders ({', '.join(prefixes)})"
        raise CheckpointError(
            f"{ckpt.path}: not a VAE: Z-Image needs the 16-channel Flux VAE (ae.safetensors or a diffusers vae/ "
            f"folder); this looks like {what}."
        )
    prefix = prefixes[0]
    rest = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    diffusers = any(n.startswith("decoder.up_blocks.") for n in rest)
    levels = 1 + max(
        (int(m.group(1)) for n in rest if (m := re.match(r"encoder\.(?:down_blocks|down)\.(\d+)\.", n))), default=0
    )
    sources = {}
    for n in rest:
        ours = n
        if diffusers:
            for pattern, repl in VAE_RENAMES:
                ours = pattern.sub(repl, ours)
            if m := DIFFUSERS_UP.match(ours):
                kind = "block" if m.group(2) == "resnets" else "upsample"
                ours = f"decoder.up.{levels - 1 - int(m.group(1))}.{kind}." + ours[m.end() :]
        sources[ours] = [prefix + n]
    return sources, prefix, "diffusers" if diffusers else "BFL/ComfyUI"


def vae_config(ckpt: Checkpoint, sources, config: dict | None) -> VAEConfig:
    """The architecture from a diffusers config.json when there is one, otherwise from the tensors' shapes."""
    config = config if config is not None else ckpt.config
    where = ckpt.path / "config.json" if config is ckpt.config else "the given config"

    def shape(name):
        if name not in sources:
            raise CheckpointError(f"{ckpt.path}: missing {name}, which every Flux VAE has.")
        return ckpt.shape(sources[name][0])

    conv_in = shape("decoder.conv_in.weight")
    if len(conv_in) != 4:
        raise CheckpointError(f"{ckpt.path}: a video VAE (3D convolutions); Z-Image needs the 16-channel Flux VAE.")
    if conv_in[1] != 16:
        sd = " (a Stable Diffusion 1.x/2.x/XL VAE)" if conv_in[1] == 4 else ""
        raise CheckpointError(
            f"{ckpt.path}: a VAE with {conv_in[1]} latent channels{sd}; Z-Image needs the 16-channel "
            "Flux VAE (ae.safetensors, or the vae/ folder of the Z-Image release)."
        )
    if config is not None:
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{where}: describes a {config['_class_name']}, not the Flux AutoencoderKL.")
        keys = {k: config[k] for k in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                                        "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor")
                if config.get(k) is not None}  # fmt: skip
        return VAEConfig(**keys, quant_conv=config.get("use_quant_conv", True))
    levels = sorted({int(n.split(".")[2]) for n in sources if n.startswith("encoder.down.")})
    return VAEConfig(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels),
        layers_per_block=len({n.split(".")[4] for n in sources if n.startswith("encoder.down.0.block.")}),
        latent_channels=conv_in[1],
        quant_conv="quant_conv.weight" in sources,
    )


# ---- building a model from a checkpoint ----


def quant_scales(ckpt: Checkpoint) -> dict[str, str]:
    """weight name -> its scale tensor's name, after checking every quantized layer's format is one we run."""
    layers = {}
    meta = ckpt.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = dict(json.loads(meta)["layers"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: unreadable _quantization_metadata ({e!r}).") from None
    for name in ckpt.names:
        if name.endswith(".comfy_quant"):
            conf = bytes(ckpt.read(name).tolist()).decode("utf-8", "replace")
            ckpt.release(name)
            try:
                layers[name[: -len(".comfy_quant")]] = json.loads(conf)
            except json.JSONDecodeError:
                raise CheckpointError(f"{ckpt.path}: {name} is not valid JSON: {conf!r}.") from None
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if fmt not in ("float8_e4m3fn", "float8_e5m2"):
            raise CheckpointError(
                f"{ckpt.path}: layer {layer} is quantized as {fmt!r}; only fp8 (float8_e4m3fn, float8_e5m2) "
                "checkpoints are supported. Use the bf16 or an fp8 file."
            )
    scales = {}
    for name in ckpt.names:
        for suffix in (".weight_scale", ".scale_weight"):
            if name.endswith(suffix):
                scales[name[: -len(suffix)] + ".weight"] = name
    return scales


def dtype_summary(ckpt: Checkpoint) -> dict[str, int]:
    return dict(Counter(str(ckpt.dtype(n)).removeprefix("torch.") for n in ckpt.names))


def quantization(ckpt: Checkpoint) -> str:
    fp8 = any(ckpt.dtype(n) in FP8 for n in ckpt.names)
    if "_quantization_metadata" in ckpt.metadata or any(n.endswith(".comfy_quant") for n in ckpt.names):
        return "fp8, ComfyUI quantized (weight_scale + comfy_quant)"
    if any(n.endswith("scaled_fp8") for n in ckpt.names):
        return "fp8, scaled (scaled_fp8 + scale_weight)"
    return "fp8" if fp8 else "none"


def squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def fill(model: nn.Module, ckpt: Checkpoint, sources, device, dtype, weight_dtype=None, expected_as=""):
    """Replace every meta parameter by real memory on `device` holding the checkpoint's values.

    Linear weights stored in fp8 stay fp8 (with their scale); with `weight_dtype` fp8, other Linear weights are
    cast to it; everything else becomes `dtype`. Sources listed together are stacked along dim 0.
    """
    scales = quant_scales(ckpt)
    expected = dict(model.named_parameters())
    missing = [n for n in expected if n not in sources]
    unexpected = [src for n, srcs in sources.items() if n not in expected for src in srcs]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})"] if unexpected else []
        raise CheckpointError(f"{ckpt.path}: tensors do not match {expected_as}: {'; '.join(parts)}.")
    wrong = []
    for name, p in expected.items():
        shapes = [ckpt.shape(s) for s in sources[name]]
        got = (sum(s[0] for s in shapes), *shapes[0][1:]) if all(s[1:] == shapes[0][1:] for s in shapes) else None
        if got is None or squeezed(got) != squeezed(p.shape):  # (C, C, 1, 1) 1x1-conv weights fill (C, C) Linears
            wrong.append(f"{' + '.join(sources[name])} is {' + '.join(map(str, shapes))}, expected {tuple(p.shape)}")
    if wrong:
        raise CheckpointError(
            f"{ckpt.path}: {len(wrong)} tensors have the wrong shape for {expected_as}, first: {'; '.join(wrong[:3])}."
        )

    modules = dict(model.named_modules())
    for name, p in expected.items():
        owner, leaf = name.rpartition(".")[::2]
        module = modules[owner]
        srcs = sources[name]
        is_linear_weight = isinstance(module, Linear) and leaf == "weight"
        src_dtypes = {ckpt.dtype(s) for s in srcs}
        if is_linear_weight and len(src_dtypes) == 1 and src_dtypes <= set(FP8):
            held = src_dtypes.pop()
        elif is_linear_weight and weight_dtype in FP8:
            held = weight_dtype
        else:
            held = dtype
        out = torch.empty(p.shape, dtype=held, device=device)
        row_scale = torch.ones(p.shape[0], 1) if held in FP8 and any(s in scales for s in srcs) else None
        row = 0
        for src in srcs:
            t = ckpt.read(src)
            scale = ckpt.read(scales[src]).float().reshape(-1, *[1] * (t.dim() - 1)) if src in scales else None
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
    for module in model.modules():
        if isinstance(module, Linear):
            module.compute_dtype = dtype


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


@dataclass
class TransformerInfo(ModelInfo):
    variant: str
    variant_reason: str
    naming: str


@dataclass
class VAEInfo(ModelInfo):
    naming: str
    factor: int


@dataclass
class TextEncoderInfo(ModelInfo):
    model: str
    layers_used: int
    tokenizer: str


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


def load_transformer(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> ZImageTransformer:
    """Load a Z-Image transformer from any released layout; `dtype` is the compute dtype.

    `weight_dtype=torch.float8_e4m3fn` holds the Linear weights of a bf16/fp32 file in fp8 (as ComfyUI's
    fp8 weight option does); fp8 files are always held in fp8. `config` overrides the folder's config.json.
    """
    ckpt = open_checkpoint(path, "transformer")
    try:
        sources, prefix = transformer_sources(ckpt)
        cfg = transformer_config(ckpt, sources, config)
        with torch.device("meta"):
            model = ZImageTransformer(cfg).to(dtype)
        source = "inferred from the tensors" if config is None and ckpt.config is None else "config.json"
        described = f"a Z-Image transformer with dim {cfg.dim}, {cfg.n_heads} heads, {cfg.n_layers} layers ({source})"
        fill(model, ckpt, sources, torch.device(device), dtype, weight_dtype, described)
        variant, reason = transformer_variant(ckpt, sources)
        diffusers_named = any(s.startswith(prefix + "all_x_embedder.") for s in sources.get("x_embedder.weight", []))
        model.info = TransformerInfo(
            **describe("Z-Image transformer", model, ckpt, prefix, asdict(cfg), device, dtype),
            variant=variant,
            variant_reason=reason,
            naming="diffusers" if diffusers_named else "ComfyUI",
        )
    finally:
        ckpt.close()
    return model.eval().requires_grad_(False)


def load_text_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    config: dict | None = None,
    tokenizer: str | Path | None = None,
) -> TextEncoder:
    """Load Z-Image's Qwen3 text encoder from a diffusers folder or a single file (bf16 or fp8), ready to encode.

    The tokenizer is `tokenizer` when given, else a diffusers folder's own, else the copy bundled with the pack.
    Drop the returned model to release its memory: nothing else holds it.
    """
    from .text_encoder import BUNDLED_TOKENIZER, Qwen3Config, TextEncoder, load_tokenizer  # transformers: 3 s, here

    ckpt = open_checkpoint(path, "text_encoder")
    try:
        sources, prefix, n_layers = text_encoder_sources(ckpt)
        cfg = text_encoder_config(ckpt, sources, n_layers, config)
        folder = Path(tokenizer) if tokenizer is not None else find_tokenizer(ckpt)
        tok = load_tokenizer(folder or BUNDLED_TOKENIZER)
        used = Qwen3Config(**dict(cfg, num_hidden_layers=n_layers - 1), sliding_window=None, attn_implementation="sdpa")
        with torch.device("meta"):
            model = TextEncoder(used, tok)
        source = "inferred from the tensors" if config is None and ckpt.config is None else "config.json"
        described = (
            f"a Qwen3 text encoder with hidden size {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, "
            f"{n_layers} layers ({source}; the last layer and the final norm are never loaded)"
        )
        fill(model, ckpt, sources, torch.device(device), dtype, weight_dtype, described)
        model.reset_rope(torch.device(device))
        differs = [f"{k} {cfg.get(k)} (released {v})" for k, v in QWEN3_4B.items() if cfg.get(k, v) != v]
        model.info = TextEncoderInfo(
            **describe("Qwen3 text encoder", model, ckpt, prefix, cfg, device, dtype),
            model="Qwen3-4B" if not differs else f"Qwen3, not Z-Image's Qwen3-4B: {', '.join(differs)}",
            layers_used=n_layers - 1,
            tokenizer=str(folder) if folder else "bundled Qwen2 BPE",
        )
    finally:
        ckpt.close()
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> VAE:
    """Load the Flux VAE from `ae.safetensors` (BFL/ComfyUI names) or a diffusers `vae/` folder.

    fp32 by default, as the official pipeline runs it; bf16 halves its activation memory. fp8 files are widened to
    `dtype` (the VAE is small; its convolutions do not take fp8 weights), and `weight_dtype` is not used.
    """
    ckpt = open_checkpoint(path, "vae")
    try:
        sources, prefix, naming = vae_sources(ckpt)
        cfg = vae_config(ckpt, sources, config)
        with torch.device("meta"):
            model = VAE(cfg)
        widths = "/".join(map(str, cfg.block_out_channels))
        fill(model, ckpt, sources, torch.device(device), dtype, None, f"a Flux VAE with widths {widths}")
        model.info = VAEInfo(
            **describe("Flux VAE", model, ckpt, prefix, asdict(cfg), device, dtype), naming=naming, factor=cfg.factor
        )
    finally:
        ckpt.close()
    return model.eval().requires_grad_(False)
