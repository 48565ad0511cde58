"""From a user's path to a ready model: the layouts each Z-Image component ships in, checked and mapped.

The transformer (diffusers folders, ComfyUI single files with or without `model.diffusion_model.`, diffusers-named
single files), the Qwen3 text encoder (diffusers `text_encoder/`, ComfyUI's `qwen_3_4b.safetensors`) and the Flux
VAE (diffusers `vae/`, BFL/ComfyUI `ae.safetensors`), each in bf16/fp32 or fp8, each refused with a message
naming what it is when it is something else. Reading files and filling models is `checkpoint.py`'s.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, NamedTuple

import torch

from .checkpoint import (
    QUANT_AUX,
    Checkpoint,
    CheckpointError,
    ModelInfo,
    describe,
    fill,
    looks_like,
    open_checkpoint,
)
from .ops import DEFAULT, Ops
from .transformer import TransformerConfig, ZImageTransformer
from .vae import VAE, VAEConfig

if TYPE_CHECKING:
    from .text_encoder import TextEncoder


# The tensor each component always has (after its prefix).
TRANSFORMER_MARKER = "layers.0.adaLN_modulation.0.weight"
TEXT_ENCODER_MARKER = "layers.0.self_attn.q_norm.weight"
VAE_MARKER = "decoder.conv_in.weight"
MARKERS = {"transformer": TRANSFORMER_MARKER, "text_encoder": TEXT_ENCODER_MARKER, "vae": VAE_MARKER}
LLAMA_CPP_MARKER = "blk.0.attn_q_norm.weight"  # a Qwen3 text encoder in a llama.cpp GGUF file


def components(path: str | Path) -> list[str]:
    """The Z-Image components at `path`: a pipeline folder's subfolders, or what a file's tensor names show."""
    path = Path(path).expanduser()
    if path.is_dir() and ((path / "model_index.json").is_file() or not (path / "config.json").exists()):
        found = [c for c in MARKERS if (path / c).is_dir()]
        if found:
            return found
    with open_checkpoint(path) as ckpt:
        found = [c for c, marker in MARKERS.items() if any(n.endswith(marker) for n in ckpt.names)]
        found += ["text_encoder"] if LLAMA_CPP_MARKER in ckpt.names and "text_encoder" not in found else []
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


def transformer_sources(ckpt: Checkpoint) -> tuple[dict[str, list[str]], str]:
    """Map our parameter names to the checkpoint's tensor names (q/k/v sources fused in that order)."""
    names = [n for n in ckpt.names if not QUANT_AUX.search(n)]
    prefix = next((p for p in TRANSFORMER_PREFIXES if p + TRANSFORMER_MARKER in ckpt.names), None)
    if prefix is None:
        raise CheckpointError(
            f"{ckpt.path}: not a Z-Image transformer: it looks like {looks_like(names)} "
            f"(no {TRANSFORMER_MARKER} among its {len(names)} tensors)."
        )
    return block_sources(names, prefix), prefix


def block_sources(names: Iterable[str], prefix: str) -> dict[str, list[str]]:
    """Our names for the tensors under `prefix`, diffusers' attention names mapped onto ComfyUI's (the
    transformer's and the ControlNet's blocks are the same blocks)."""
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
    return sources


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


class TransformerFacts(NamedTuple):
    """What a host needs to know before it builds a transformer: to pick dtypes and reserve memory."""

    config: TransformerConfig
    parameters: int
    file_dtype: torch.dtype  # the dtype most of its weights are stored in
    fp16_ok: bool
    variant: str  # turbo, base or omni (`transformer_variant`)


def transformer_facts(path: str | Path) -> TransformerFacts:
    """Read from the header and one small tensor. `fp16_ok` is ComfyUI's test (0.33.0 `model_detection.py`):
    weights whose second-to-last block has FFN norm weights of std >= 0.42 (Base) overflow fp16; Turbo's do not."""
    with open_checkpoint(path, "transformer") as ckpt:
        sources, _ = transformer_sources(ckpt)
        cfg = transformer_config(ckpt, sources, None)
        sizes = Counter()
        for srcs in sources.values():
            for src in srcs:  # int8 and fp4 weights are bf16 ones to the host's dtype choice (ComfyUI's repacks are)
                dtype = ckpt.dtype(src)
                sizes[dtype if dtype.is_floating_point else torch.bfloat16] += math.prod(ckpt.shape(src))
        probe = sources.get(f"layers.{cfg.n_layers - 2}.ffn_norm1.weight") if cfg.n_layers >= 2 else None
        fp16_ok = probe is not None and ckpt.read(probe[0]).float().std(unbiased=False).item() < 0.42
        variant, _ = transformer_variant(ckpt, sources)
    return TransformerFacts(cfg, sum(sizes.values()), sizes.most_common(1)[0][0], fp16_ok, variant)


def transformer_variant(ckpt: Checkpoint, sources) -> tuple[str, str]:
    """(variant, why): Omni/Edit by its SigLIP weights; Turbo and Base share every key, so by name or metadata."""
    if "siglip_embedder.1.weight" in sources:
        return "omni", "has SigLIP reference-image weights"
    names = [ckpt.path.name, ckpt.path.parent.name if ckpt.path.name == "transformer" else ""]
    text = " ".join([*names, json.dumps(ckpt.metadata), str((ckpt.config or {}).get("_name_or_path", ""))]).lower()
    for variant in ("turbo", "base"):
        if re.search(rf"(?<![a-z]){variant}(?![a-z])", text):
            return variant, f"'{variant}' in its name or metadata"
    if any(re.match(r"z[-_ ]?image(?![a-z])", name.lower()) for name in names):
        return "base", "a Z-Image name without 'turbo' (Comfy-Org's z_image_bf16, Tongyi-MAI's Z-Image are Base)"
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
    files = {llama_cpp_name(n): n for n in ckpt.names if not QUANT_AUX.search(n)}  # ours -> the file's
    files.pop(None, None)
    names = list(files)
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
    return {"model." + n: [files[prefix + n]] for n in rest if not n.startswith(skipped)}, prefix, n_layers


LLAMA_CPP = {  # llama.cpp's names for a Qwen3 layer's tensors (GGUF files) -> transformers'
    "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
LLAMA_CPP_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def llama_cpp_name(name: str) -> str | None:
    """transformers' name for a tensor of a llama.cpp GGUF file (as city96's ComfyUI-GGUF maps them; Qwen3's q
    and k are stored unpermuted), None for its unused output head; other names are returned as they are."""
    if m := LLAMA_CPP_LAYER.match(name):
        return f"layers.{m[1]}.{LLAMA_CPP.get(m[2], m[2])}.{m[3]}"
    return {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": None}.get(
        name, name
    )


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


# ---- the SigLIP2 vision encoder (Omni/Edit reference images) ----

SIGLIP_MARKER = "embeddings.patch_embedding.weight"
SIGLIP_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                      "patch_size", "num_patches", "hidden_act", "layer_norm_eps")  # fmt: skip


def siglip_sources(ckpt: Checkpoint) -> tuple[dict[str, list[str]], str]:
    """Map Siglip2VisionModel's names to the file's (any prefix: none, `vision_model.`, `siglip.` ...); the pooling
    head and a full SigLIP2's text tower are never loaded (Z-Image reads the last hidden state)."""
    found = sorted({n[: -len(SIGLIP_MARKER)] for n in ckpt.names if n.endswith(SIGLIP_MARKER)})
    if len(found) != 1:
        raise CheckpointError(
            f"{ckpt.path}: not a SigLIP2 vision encoder (Z-Image Omni/Edit's reference-image encoder): it looks "
            f"like {looks_like(ckpt.names)}."
        )
    prefix = found[0]
    rest = [n[len(prefix) :] for n in ckpt.names if n.startswith(prefix)]
    return {n: [prefix + n] for n in rest if not n.startswith("head.")}, prefix


def siglip_config(ckpt: Checkpoint, sources, config: dict | None) -> dict:
    """Siglip2VisionConfig arguments from config.json (a vision model's, or a full SigLIP2's vision_config), else
    from the shapes; the head count is not in the shapes: the SigLIP2 family uses heads of 64 or (so400m) 72."""
    config = config if config is not None else ckpt.config
    if config is not None:
        config = config.get("vision_config", config)
        if config.get("model_type", "siglip2_vision_model") not in ("siglip2_vision_model", "siglip2"):
            raise CheckpointError(f"{ckpt.path}: config.json describes a {config['model_type']}, not SigLIP2.")
        return {k: config[k] for k in SIGLIP_CONFIG_KEYS if k in config}

    def shape(name):
        if name not in sources:
            raise CheckpointError(f"{ckpt.path}: missing {name}, which every SigLIP2 vision encoder has.")
        return ckpt.shape(sources[name][0])

    hidden, patch_pixels = shape(SIGLIP_MARKER)
    layers = 1 + max(int(m.group(1)) for n in sources if (m := re.match(r"encoder\.layers\.(\d+)\.", n)))
    head = 64 if hidden % 64 == 0 else 72
    return {
        "hidden_size": hidden,
        "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head,
        "patch_size": round((patch_pixels / 3) ** 0.5),
        "num_patches": shape("embeddings.position_embedding.weight")[0],
    }


def load_siglip(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                config: dict | None = None):  # fmt: skip
    """Load the SigLIP2 vision encoder (transformers' `Siglip2VisionModel`) and its image processor from a
    transformers folder, a pipeline folder (`siglip/`, `siglip_processor/`) or a single safetensors file.

    The processor is the folder's own (`preprocessor_config.json` there or in `../siglip_processor/`), else
    transformers' defaults for the model's patch size.
    """
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    with open_checkpoint(path, "siglip") as ckpt:
        sources, prefix = siglip_sources(ckpt)
        cfg = siglip_config(ckpt, sources, config)
        with torch.device("meta"):
            model = Siglip2VisionModel(Siglip2VisionConfig(**cfg, vision_use_head=False))
        # transformers 4.x wraps the tower as `.vision_model`; 5.x names its parameters without it
        inner = "vision_model." if next(iter(dict(model.named_parameters()))).startswith("vision_model.") else ""
        sources = {inner + k: v for k, v in sources.items()}
        source = "inferred from the tensors" if config is None and ckpt.config is None else "config.json"
        described = f"a SigLIP2 vision encoder with hidden size {cfg['hidden_size']}, {cfg.get('num_hidden_layers')} layers ({source})"
        fill(model, ckpt, sources, torch.device(device), dtype, None, described)
        here = ckpt.files[0].path.parent
        folders = [f for f in (here, here.parent / "siglip_processor") if (f / "preprocessor_config.json").is_file()]
        if folders and ckpt.layout != "single file":
            processor = Siglip2ImageProcessor.from_pretrained(str(folders[0]))
        else:
            processor = Siglip2ImageProcessor(patch_size=cfg.get("patch_size", 16))
        model.info = ModelInfo(**describe("SigLIP2 vision encoder", model, ckpt, prefix, cfg, device, dtype))
    return model.eval().requires_grad_(False), processor


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


def load_transformer(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    config: dict | None = None,
    ops: Ops = DEFAULT,
    compute_dtype: torch.dtype | None = None,
    model_class: type[ZImageTransformer] = ZImageTransformer,
) -> ZImageTransformer:
    """Load a Z-Image transformer from any released layout; `dtype` is the compute dtype.

    `weight_dtype=torch.float8_e4m3fn` holds the Linear weights of a bf16/fp32 file in fp8 (as ComfyUI's
    fp8 weight option does); fp8 files are always held in fp8. `config` overrides the folder's config.json;
    `ops` are the layers to build from and `model_class` the class (a host passes its own); `compute_dtype`
    (default `dtype`) what the GEMMs run in when the weights are held in another dtype.
    """
    with open_checkpoint(path, "transformer") as ckpt:
        sources, prefix = transformer_sources(ckpt)
        cfg = transformer_config(ckpt, sources, config)
        with torch.device("meta"):
            model = model_class(cfg, ops, compute_dtype=compute_dtype or dtype).to(dtype)
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
    return model.eval().requires_grad_(False)


def load_text_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    config: dict | None = None,
    tokenizer: str | Path | None = None,
    ops: Ops = DEFAULT,
) -> TextEncoder:
    """Load Z-Image's Qwen3 text encoder from a diffusers folder or a single file (bf16 or fp8), ready to encode.

    The tokenizer is `tokenizer` when given, else a diffusers folder's own, else the copy bundled with the pack.
    Drop the returned model to release its memory: nothing else holds it.
    """
    from .text_encoder import BUNDLED_TOKENIZER, Qwen3Config, TextEncoder, load_tokenizer  # transformers: 3 s, here

    with open_checkpoint(path, "text_encoder") as ckpt:
        sources, prefix, n_layers = text_encoder_sources(ckpt)
        cfg = text_encoder_config(ckpt, sources, n_layers, config)
        folder = Path(tokenizer) if tokenizer is not None else find_tokenizer(ckpt)
        tok = load_tokenizer(folder or BUNDLED_TOKENIZER)
        used = Qwen3Config(**dict(cfg, num_hidden_layers=n_layers - 1), sliding_window=None, attn_implementation="sdpa")
        with torch.device("meta"):
            model = TextEncoder(used, tok, ops)
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
    with open_checkpoint(path, "vae") as ckpt:
        sources, prefix, naming = vae_sources(ckpt)
        cfg = vae_config(ckpt, sources, config)
        with torch.device("meta"):
            model = VAE(cfg)
        widths = "/".join(map(str, cfg.block_out_channels))
        fill(model, ckpt, sources, torch.device(device), dtype, None, f"a Flux VAE with widths {widths}")
        model.info = VAEInfo(
            **describe("Flux VAE", model, ckpt, prefix, asdict(cfg), device, dtype), naming=naming, factor=cfg.factor
        )
    return model.eval().requires_grad_(False)


LOADERS = {"transformer": load_transformer, "text_encoder": load_text_encoder, "vae": load_vae}


# ---- finding and keeping models in a ComfyUI install ----

WEIGHTS = (".safetensors", ".sft", ".gguf")


def model_entries(roots: list[Path], names: Iterable[str], component: str) -> dict[str, Path]:
    """What a loader offers, from the weight files a host lists in its model folders `roots` (names relative to
    a root, as ComfyUI's `folder_paths` lists them): files, and each diffusers folder once, a pipeline folder only
    when it has `component`. Names use `/`; the first root holding a name wins, and names in hidden folders or
    outside the roots are not offered."""
    found: dict[str, Path] = {}
    folders: dict[Path, str | None] = {}  # folder -> "pipeline", "model" or None, each looked at once

    def kind(folder: Path) -> str | None:
        if folder not in folders:
            pipeline = (folder / "model_index.json").is_file() or (folder / component / "config.json").is_file()
            folders[folder] = "pipeline" if pipeline else "model" if (folder / "config.json").is_file() else None
        return folders[folder]

    for name in names:
        parts = PurePath(name).parts
        if not name.endswith(WEIGHTS):
            continue
        root = next((r for r in roots if (r / name).is_file()), None)
        if root is None or ".." in parts or any(p.startswith(".") for p in parts) or PurePath(name).is_absolute():
            continue
        entry = parts
        for depth in range(1, len(parts)):
            what = kind(root.joinpath(*parts[:depth]))
            if what == "pipeline":
                entry = parts[:depth] if (root.joinpath(*parts[:depth]) / component).is_dir() else ()
                break
            if what == "model":
                entry = parts[:depth]
                break
        if entry:
            found.setdefault("/".join(entry), root.joinpath(*entry))
    return dict(sorted(found.items()))


def resolve(entries: dict[str, Path], name: str, roots: list[Path]) -> Path:
    """The file or folder a loader's `name` stands for: only a name the folders list, so no name (`../x`, an
    absolute path) reaches outside them."""
    found = entries.get(name)
    if found is None:
        where = ", ".join(map(str, roots)) or "no folders"
        raise CheckpointError(f"{name!r} is not among the models in {where}: pick one the loader lists")
    return found


def stamp(path: str | Path) -> tuple:
    """What changes when the model at `path` is replaced: each weight and config file's name, size, time, inode."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in (*WEIGHTS, ".json"))
    return tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])


class ModelCache:
    """Loaded models by kind, path, options and file stamp, for as long as something else holds them.

    Asking again while a model is alive returns it; a replaced file (new stamp) is read again. Nothing is kept
    alive here: ComfyUI's own caches decide how long a model lives, so memory goes back when they drop it.
    A load that fails stores nothing.
    """

    def __init__(self):
        self.alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def get(self, kind: str, path: str | Path, options: tuple, build: Callable[[], object]):
        key = (kind, str(path), options, stamp(path))
        model = self.alive.get(key)
        if model is None:
            model = build()
            self.alive[key] = model
        return model
