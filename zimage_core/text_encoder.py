"""Z-Image's text encoder: Qwen3 hidden states of the prompt in a chat turn.

What the references do (official `src/zimage/pipeline.py`, diffusers' `ZImagePipeline.encode_prompt`, ComfyUI's
`ZImageTokenizer`): put the prompt in a user turn followed by an open assistant turn (no system prompt, no think
block), tokenize with Qwen's byte-level BPE, run Qwen3 and take the hidden states of the second-to-last layer,
without the final norm, one row per real token. The template is written here rather than taken from a
tokenizer's chat template, since the tokenizer files ComfyUI ships carry a template that adds a system prompt.

Only the decoder layers up to the one read are built and loaded (35 of Qwen3-4B's 36) and there is no LM head.
Batches are padded on the right to their longest prompt, not to the maximum length; under causal attention the
padding never reaches a real row. Qwen3 itself is transformers' `Qwen3Model`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

from .ops import DEFAULT, Ops

log = logging.getLogger(__name__)

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_LENGTH = 512  # the references' cap on template + prompt tokens; ComfyUI's native nodes never truncate
BUNDLED_TOKENIZER = Path(__file__).parent / "qwen_tokenizer"  # Qwen2 BPE vocabulary and merges (Apache-2.0)


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str | Path = BUNDLED_TOKENIZER):
    """The Qwen2 BPE tokenizer in `folder` (a diffusers `tokenizer/`, or the copy bundled with the pack)."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    template_ids = tokenizer("<|im_start|><|im_end|>").input_ids
    if len(template_ids) != 2 or tokenizer.unk_token_id in template_ids or tokenizer.pad_token_id is None:
        raise ValueError(
            f"{folder}: not a Qwen tokenizer (it has no <|im_start|>/<|im_end|> tokens or no pad token); "
            "Z-Image needs the Qwen2 BPE tokenizer its text encoder was trained with."
        )
    return tokenizer


class Tokens(NamedTuple):
    ids: torch.Tensor  # (B, L) int64, right-padded with the pad id to the longest item
    lengths: tuple[int, ...]  # real tokens per item
    dropped: tuple[int, ...]  # tokens cut from the end of each item by the maximum length (0: none)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = MAX_LENGTH, template: str = TEMPLATE) -> Tokens:
    """Template and tokenize each prompt; keep the first `max_length` tokens as the references do (None: all)."""
    if not prompts:
        raise ValueError("no prompts to encode: pass at least one (an empty string is a valid prompt)")
    full = [tokenizer(template.format(p)).input_ids for p in prompts]
    kept = [ids[:max_length] if max_length is not None else ids for ids in full]
    for i, (ids, cut) in enumerate(zip(full, kept)):
        if len(ids) > len(cut):
            log.warning(
                "prompt %d is %d tokens with the chat template; only the first %d are encoded (max_length %d), "
                "as the reference pipelines do: %d tokens dropped, the end of the template with them",
                i, len(ids), len(cut), max_length, len(ids) - len(cut),
            )  # fmt: skip
    longest = max(map(len, kept))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([t + [pad] * (longest - len(t)) for t in kept], dtype=torch.int64)
    return Tokens(ids, tuple(map(len, kept)), tuple(len(f) - len(k) for f, k in zip(full, kept)))


class Embeddings(NamedTuple):
    """Text conditioning for the transformer: item i is `features[i, :lengths[i]]`; later rows are zero."""

    features: torch.Tensor  # (B, L, hidden)
    lengths: tuple[int, ...]
    dropped: tuple[int, ...]  # tokens lost to the maximum length, per item

    def repeat(self, n: int) -> Embeddings:
        """The same conditioning for `n` images: as it is when it has `n` items, repeated when it has one."""
        if len(self.lengths) == n:
            return self
        if len(self.lengths) != 1:
            raise ValueError(f"conditioning for {len(self.lengths)} prompts cannot serve {n} images")
        return Embeddings(self.features.expand(n, -1, -1), self.lengths * n, self.dropped * n)

    def split(self, n: int) -> tuple[Embeddings, Embeddings]:
        """The first `n` items and the rest (prompts and negatives encoded in one pass), each only as long as its
        longest item, as if encoded alone."""

        def part(items: slice) -> Embeddings:
            lengths = self.lengths[items]
            return Embeddings(self.features[items, : max(lengths)], lengths, self.dropped[items])

        return part(slice(0, n)), part(slice(n, None))


def fp32_norm(norm: type) -> type:
    """`norm` computing on fp32 input and giving back its input's dtype, as transformers' Qwen3RMSNorm does."""

    class Norm(norm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.float()).to(x.dtype)

    return Norm


class TextEncoder(nn.Module):
    """Qwen3's embedding and decoder layers up to the one Z-Image reads, with its tokenizer in front.

    `config` gives the layers to build: one fewer than the language model has, since the references take
    `hidden_states[-2]`. Build it on the meta device and fill it (`loaders.load_text_encoder`).
    The layers holding weights come from `ops` (so fp8 Linears dequantize per call; inside ComfyUI the host's,
    which it can stream from the offload device); the norms stay transformers' own unless `ops` brings its own.
    """

    load_device: torch.device | None = None  # where it runs, when its host may leave weights elsewhere

    def __init__(self, config: Qwen3Config, tokenizer, ops: Ops = DEFAULT):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = Qwen3Model(config)
        self.model.norm = nn.Identity()  # the layer taken is read before the final norm
        norm = None if ops.RMSNorm is DEFAULT.RMSNorm else fp32_norm(ops.RMSNorm)
        for module in list(self.model.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    bias = child.bias is not None
                    setattr(module, name, ops.Linear(child.in_features, child.out_features, bias=bias))
                elif type(child) is nn.Embedding:
                    setattr(module, name, ops.Embedding(child.num_embeddings, child.embedding_dim, child.padding_idx))
                elif type(child) is Qwen3RMSNorm and norm is not None:
                    setattr(module, name, norm(child.weight.shape[0], eps=child.variance_epsilon))

    def reset_rope(self, device: torch.device):
        """RoPE frequencies are computed, not loaded: rebuild them on `device` after a meta-device build."""
        self.model.rotary_emb = Qwen3RotaryEmbedding(config=self.model.config).to(device)

    def forward(self, ids: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        """Hidden states (B, L, hidden) of right-padded `ids`; rows past each item's length are zero.

        No padding mask is needed: under causal attention a real token only sees the tokens before it.
        """
        out = self.model(input_ids=ids, use_cache=False).last_hidden_state
        real = torch.arange(ids.shape[1], device=ids.device)[None] < torch.tensor(lengths, device=ids.device)[:, None]
        return out.masked_fill(~real[..., None], 0)

    @torch.no_grad()
    def encode(
        self, prompts: str | list[str], max_length: int | None = MAX_LENGTH, template: str = TEMPLATE
    ) -> Embeddings:
        """Encode a batch of prompts in one pass (for CFG: the prompts and then their negatives).

        `template` wraps each prompt ("{}": the text as it is, for Omni's pieces of the template)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = tokenize(self.tokenizer, prompts, max_length, template)
        device = self.load_device or self.model.embed_tokens.weight.device
        self.model.rotary_emb.to(device)  # a buffer the host does not move when it streams the weights
        features = self(tokens.ids.to(device), tokens.lengths)
        return Embeddings(features, tokens.lengths, tokens.dropped)
