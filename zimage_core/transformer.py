"""The Z-Image S3-DiT: one stream of image and caption tokens through modulated transformer blocks.

Numerically this is the official model (Tongyi-MAI/Z-Image `src/zimage/transformer.py`, which diffusers'
`ZImageTransformer2DModel` matches bit for bit), written for speed and memory:
- the batch is a tensor, not a list: images in one call share a size, captions may differ in length;
- q/k/v are one fused GEMM, RoPE is real-valued (cos/sin of the same fp32 angles), attention is one function;
- position ids, RoPE angles and masks depend only on shapes, so they are built once per shape and cached;
- with bf16/fp16 weights the residual stream, norms and RoPE stay in fp32 and only GEMMs and attention run in
  the low-precision dtype, which keeps bf16 closer to the fp32 model than the references are;
- every layer comes from an ops namespace (`ops.py`: ours by default, the host's inside ComfyUI), and fp16
  overflow is clamped where ComfyUI clamps it.

Module names follow ComfyUI's single-file layout (`attention.qkv`, `x_embedder`, `final_layer`); `loaders.py`
maps the diffusers layout onto them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import DEFAULT, Ops

SEQ_MULTIPLE = 32  # every item's image and caption sequences are padded to a multiple of this with pad tokens
ADALN_DIM = 256  # width of the timestep conditioning vector
T_EMBED_MID = 1024  # hidden width of the timestep MLP
FREQ_EMBED_DIM = 256  # sinusoidal timestep features


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture hyper-parameters; defaults are the released 6B model (diffusers' `transformer/config.json`)."""

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # set only for Omni/Edit models
    patch_size: int = 2
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("axes_dims", "axes_lens"):  # hashable, so shapes can be cached per config
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dim % self.n_heads or sum(self.axes_dims) != self.dim // self.n_heads:
            raise ValueError(
                f"inconsistent transformer config: dim {self.dim} / {self.n_heads} heads must equal "
                f"sum(axes_dims) = {sum(self.axes_dims)}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 overflow to its largest finite value, at the points ComfyUI clamps (`comfy/ldm/lumina/model.py`
    `clamp_fp16`: attention and feed-forward outputs and the SwiGLU product), so fp16 gives images, not NaN."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by the angles in `rope` = (cos, sin) stacked last, in
    the angles' dtype (the residual stream's)."""
    cos, sin = rope.unbind(-1)
    x0, x1 = x.to(rope.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, eps: float, ops: Ops):
        super().__init__()
        self.n_heads, self.attend = n_heads, ops.attention
        self.qkv = ops.Linear(dim, 3 * dim, bias=False)
        self.out = ops.Linear(dim, dim, bias=False)
        self.q_norm = ops.RMSNorm(dim // n_heads, eps)
        self.k_norm = ops.RMSNorm(dim // n_heads, eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)
        q = apply_rope(self.q_norm(q.to(rope.dtype)), rope).to(v.dtype)
        k = apply_rope(self.k_norm(k.to(rope.dtype)), rope).to(v.dtype)
        return self.out(self.attend(q, k, v, mask))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, ops: Ops):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False)
        self.w2 = ops.Linear(hidden, dim, bias=False)
        self.w3 = ops.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.w2(clamp_fp16(F.silu(self.w1(x)) * self.w3(x)))
        h = F.silu(self.w1(x), inplace=True)  # at inference two hidden-size tensors instead of four
        return self.w2(clamp_fp16(h.mul_(self.w3(x))))


class Block(nn.Module):
    """Attention and SwiGLU with "sandwich" RMSNorms; modulated blocks scale the inputs and tanh-gate the outputs."""

    def __init__(self, cfg: TransformerConfig, modulated: bool, ops: Ops):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.norm_eps, ops)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, ops)
        self.attention_norm1 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(ops.Linear(min(cfg.dim, ADALN_DIM), 4 * cfg.dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, dtype, c=None, noisy=None):
        """x: the residual stream (B, S, dim), in its own dtype (fp32 unless the model says otherwise), as are the
        norms; `dtype` the one GEMMs and attention run in; c: conditioning (B, 1, 256) for modulated blocks, or
        (Omni) a pair (noisy, clean) chosen per token by `noisy` (B, S, 1)."""
        if c is None:
            h = clamp_fp16(self.attention(self.attention_norm1(x).to(dtype), rope, mask))
            x = x + self.attention_norm2(h.to(x.dtype))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x).to(dtype)).to(x.dtype))
        mod = per_token(self.adaLN_modulation, c, noisy).chunk(4, dim=-1)  # fp32, rounded once to the stream's
        scale_msa, gate_msa, scale_mlp, gate_mlp = (m.to(x.dtype) for m in (1 + mod[0], mod[1].tanh(), 1 + mod[2],
                                                                            mod[3].tanh()))  # fmt: skip
        h = clamp_fp16(self.attention((self.attention_norm1(x) * scale_msa).to(dtype), rope, mask))
        x = x + gate_msa * self.attention_norm2(h.to(x.dtype))
        h = clamp_fp16(self.feed_forward((self.ffn_norm1(x) * scale_mlp).to(dtype)))
        return x + gate_mlp * self.ffn_norm2(h.to(x.dtype))


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, ops: Ops):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(FREQ_EMBED_DIM, T_EMBED_MID), nn.SiLU(), ops.Linear(T_EMBED_MID, out_dim))

    def forward(self, t: torch.Tensor, dtype) -> torch.Tensor:
        half = FREQ_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, ops: Ops):
        super().__init__()
        self.linear = ops.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(min(dim, ADALN_DIM), dim))

    def forward(self, x: torch.Tensor, c, dtype, noisy=None) -> torch.Tensor:
        scale = 1 + per_token(self.adaLN_modulation, c, noisy)
        return self.linear((F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * scale).to(dtype))


def per_token(modulation: nn.Module, c, noisy: torch.Tensor | None) -> torch.Tensor:
    """The modulation of `c`; for Omni, of c = (noisy, clean) picked per token (each computed once, as diffusers)."""
    if noisy is None:
        return modulation(c).float()
    return torch.where(noisy, modulation(c[0]).float(), modulation(c[1]).float())


class Layout(NamedTuple):
    """Everything about a batch that depends only on its shape."""

    img_rope: torch.Tensor  # (B, N_pad, 1, head_dim/2, 2) cos and sin of the image tokens' angles
    cap_rope: torch.Tensor  # (B, L_pad, 1, head_dim/2, 2) the same for caption tokens
    rope: torch.Tensor  # the unified sequence: image tokens, then caption tokens
    cap_real: torch.Tensor  # (B, L_pad, 1) True for real caption rows, False where the pad token goes
    cap_mask: torch.Tensor | None  # (B, L_pad) keys that exist, None when every caption pads to the same length
    mask: torch.Tensor | None  # (B, N_pad + L_pad) the same for the unified sequence


def angles(cfg: TransformerConfig, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """RoPE cos and sin (..., 1, head_dim/2, 2) of position ids (..., 3), as the official model builds its tables
    (float64 products, rounded to fp32, then `torch.polar`), on the CPU so devices without float64 work too."""
    parts = []
    for axis, d in enumerate(cfg.axes_dims):
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        parts.append((ids[..., axis : axis + 1].double() * inv).float())
    a = torch.cat(parts, dim=-1)
    return torch.view_as_real(torch.polar(torch.ones_like(a), a)).unsqueeze(-3).to(device)


@functools.lru_cache(maxsize=16)
def layout(cfg: TransformerConfig, grid: tuple[int, int], cap_lens: tuple[int, ...], device: torch.device) -> Layout:
    """Position ids, RoPE angles and masks for image tokens of an (h, w) grid and captions of `cap_lens`.

    Per item: caption ids are (1 .. Lpad, 0, 0) (pad tokens continue the count), image ids (Lpad + 1, row, col),
    image pad tokens (0, 0, 0).
    """
    h, w = grid
    n = h * w
    padded = torch.tensor([length + (-length % SEQ_MULTIPLE) for length in cap_lens])
    l_max, bsz = int(padded.max()), len(cap_lens)
    for axis, (limit, largest) in enumerate(zip(cfg.axes_lens, (l_max + 1, h - 1, w - 1))):
        if largest >= limit:
            raise ValueError(
                f"{'caption' if axis == 0 else 'image'} is too long for this model's RoPE table: position "
                f"{largest} on axis {axis} (limit {limit - 1}; image {h} x {w} tokens, caption {max(cap_lens)} tokens)"
            )

    cap_ids = torch.zeros(l_max, 3, dtype=torch.int64)
    cap_ids[:, 0] = torch.arange(1, l_max + 1)
    img_ids = torch.zeros(bsz, n + (-n % SEQ_MULTIPLE), 3, dtype=torch.int64)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids[:, :n, 0] = padded[:, None] + 1
    img_ids[:, :n, 1] = rows.flatten()
    img_ids[:, :n, 2] = cols.flatten()

    img_rope, cap_rope = angles(cfg, img_ids, device), angles(cfg, cap_ids, device).expand(bsz, -1, -1, -1, -1)
    keep = torch.arange(l_max)[None] < padded[:, None]
    cap_mask = mask = None
    if not keep.all():
        cap_mask = keep.to(device)
        mask = torch.cat([torch.ones(bsz, img_ids.shape[1], dtype=torch.bool), keep], dim=1).to(device)
    cap_real = (torch.arange(l_max)[None] < torch.tensor(cap_lens)[:, None])[..., None].to(device)
    return Layout(img_rope, cap_rope, torch.cat([img_rope, cap_rope], dim=1), cap_real, cap_mask, mask)


class OmniItem(NamedTuple):
    """Position ids (n, 3) and noisy flags (n,) of one Omni item's captions, images and SigLIP tokens."""

    cap_ids: torch.Tensor
    img_ids: torch.Tensor
    sig_ids: torch.Tensor
    cap_noisy: torch.Tensor
    img_noisy: torch.Tensor
    sig_noisy: torch.Tensor


def padded(n: int) -> int:
    return n + (-n % SEQ_MULTIPLE)


@functools.lru_cache(maxsize=64)
def omni_item(cfg: TransformerConfig, seg_lens: tuple[int, ...], grids: tuple, sig_grids: tuple) -> OmniItem:
    """The ids diffusers 0.42.1 gives an Omni item: N + 2 caption segments of `seg_lens` tokens around N reference
    images and the target (latent sizes `grids`, the target last), and the references' SigLIP grids.

    One counter runs over the segments: segment j starts at c_j, image j sits at c_j + L_j (unpadded), its SigLIP
    tokens one further with (row, col) rescaled to the latent grid; then c_{j+1} = c_j + L_j + 2. diffusers lists
    each segment's ids as its padded length of running ids followed by (padded - L_j) zero rows and reads the
    concatenation row by row, so later segments' rows shift; that is reproduced (zimage-spec.md 7.4).
    Captions before reference j and the references are clean; the prompt's segment, the last one and the target
    (with its empty 32-token SigLIP slot) are noisy.
    """
    p, n_refs = cfg.patch_size, len(grids) - 1
    listed, cap_noisy, ends, start = [], [], [], 1
    for j, length in enumerate(seg_lens):
        listed += [*range(start, start + padded(length)), *[0] * (padded(length) - length)]
        cap_noisy += [j >= n_refs] * padded(length)
        ends.append(start + length)
        start += length + 2
    cap_ids = torch.zeros(len(cap_noisy), 3, dtype=torch.int64)
    cap_ids[:, 0] = torch.tensor(listed[: len(cap_noisy)])

    def grid(first: int, h: int, w: int) -> torch.Tensor:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids = torch.zeros(padded(h * w), 3, dtype=torch.int64)
        ids[: h * w] = torch.stack([torch.full((h * w,), first), rows.flatten(), cols.flatten()], dim=-1)
        return ids

    img_ids = [grid(ends[j], hgt // p, wid // p) for j, (hgt, wid) in enumerate(grids)]
    img_noisy = [torch.full((len(ids),), j == n_refs) for j, ids in enumerate(img_ids)]
    sig_ids, sig_noisy = [], []
    for j, (hs, ws) in enumerate(sig_grids):
        ids = grid(ends[j] + 1, hs, ws).float()
        ids[:, 1] = ids[:, 1] / max(hs - 1, 1) * (grids[j][0] - 1)  # fp32, then truncated, as diffusers
        ids[:, 2] = ids[:, 2] / max(ws - 1, 1) * (grids[j][1] - 1)
        sig_ids.append(ids.to(torch.int32).long())
        sig_noisy.append(torch.zeros(len(ids), dtype=torch.bool))
    if sig_grids:  # the target's SigLIP slot: pad tokens only
        sig_ids.append(torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.int64))
        sig_noisy.append(torch.ones(SEQ_MULTIPLE, dtype=torch.bool))
    item = OmniItem(cap_ids, torch.cat(img_ids), torch.cat(sig_ids) if sig_ids else torch.zeros(0, 3, dtype=torch.int64),
                    torch.tensor(cap_noisy), torch.cat(img_noisy),
                    torch.cat(sig_noisy) if sig_noisy else torch.zeros(0, dtype=torch.bool))  # fmt: skip
    largest = torch.cat([item.cap_ids, item.img_ids, item.sig_ids]).amax(0)
    for axis, (top, limit) in enumerate(zip(largest.tolist(), cfg.axes_lens)):
        if top >= limit:
            raise ValueError(f"Omni sequence beyond this model's RoPE table: position {top} on axis {axis} "
                             f"(limit {limit - 1}; captions {seg_lens}, latents {grids})")  # fmt: skip
    return item


class OmniLayout(NamedTuple):
    """Everything about an Omni batch that depends only on its shape (see `omni_item`)."""

    items: tuple[OmniItem, ...]
    img_noisy: torch.Tensor  # (1, N_img, 1) the target's tokens are noisy, the references' clean
    img_rope: torch.Tensor
    cap_rope: torch.Tensor
    sig_rope: torch.Tensor | None
    rope: torch.Tensor  # the unified sequence: captions, images, SigLIP
    mask: torch.Tensor | None
    noisy: torch.Tensor  # (B, S, 1)
    start: tuple[int, ...]  # where each item's target tokens begin in the unified sequence


@functools.lru_cache(maxsize=16)
def omni_layout(cfg: TransformerConfig, lengths: tuple, grids: tuple, sig_grids: tuple, device) -> OmniLayout:
    """Position ids, RoPE angles, masks and noisy flags of a batch of Omni items, built once per shape as
    `layout` is for plain batches."""
    items = tuple(omni_item(cfg, lens, grids, sig_grids) for lens in lengths)
    ids, mask = stack_padded([torch.cat([it.cap_ids, it.img_ids, it.sig_ids]) for it in items])
    noisy = stack_padded([torch.cat([it.cap_noisy, it.img_noisy, it.sig_noisy])[:, None] for it in items])[0]
    hgt, wid = grids[-1]
    n = (hgt // cfg.patch_size) * (wid // cfg.patch_size)
    return OmniLayout(
        items,
        items[0].img_noisy.to(device)[None, :, None],
        angles(cfg, torch.stack([it.img_ids for it in items]), device),
        angles(cfg, stack_padded([it.cap_ids for it in items])[0], device),
        angles(cfg, torch.stack([it.sig_ids for it in items]), device) if sig_grids else None,
        angles(cfg, ids, device),
        None if mask is None else mask.to(device),
        noisy.to(device),
        tuple(len(it.cap_ids) + len(it.img_ids) - padded(n) for it in items),  # the target is the last image
    )


def ropes_in(shape, dtype: torch.dtype):
    """A layout with its RoPE tables (built in fp32) in the residual stream's dtype."""
    if dtype == torch.float32:
        return shape
    return shape._replace(
        **{k: v.to(dtype) for k, v in shape._asdict().items() if k.endswith("rope") and v is not None}
    )


def stack_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad sequences (n_i, ...) with zeros into (B, n_max, ...); the key mask, or None when all are equal."""
    longest = max(len(r) for r in rows)
    out = torch.stack([F.pad(r, (0, 0) * (r.dim() - 1) + (0, longest - len(r))) for r in rows])
    if all(len(r) == longest for r in rows):
        return out, None
    return out, torch.arange(longest, device=out.device)[None] < torch.tensor(
        [len(r) for r in rows], device=out.device
    )[:, None]


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Latents (B, C, H, W) padded circularly to whole p x p patches: ComfyUI's `pad_to_patch_size`, so the
    odd sizes its graphs can make (an EmptySD3LatentImage of 1000 x 680) run as they do natively."""
    return (
        F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p), mode="circular") if x.shape[2] % p or x.shape[3] % p else x
    )


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Latents (B, C, H, W) to rows (B, H/p * W/p, p * p * C) of p x p patches, row-major, channels last."""
    bsz, c, hgt, wid = x.shape
    return x.reshape(bsz, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 3, 5, 1).reshape(bsz, -1, p * p * c)


def unpatchify(rows: torch.Tensor, shape: torch.Size, p: int) -> torch.Tensor:
    """Rows (B, H/p * W/p, p * p * C) back to latents of `shape` (B, C, H, W)."""
    bsz, c, hgt, wid = shape
    return rows.view(bsz, hgt // p, wid // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(shape)


class ZImageTransformer(nn.Module):
    """Z-Image transformer (Turbo, Base and the Omni/Edit weights)."""

    def __init__(self, cfg: TransformerConfig, ops: Ops = DEFAULT, compute_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype = torch.float32):  # fmt: skip
        """`ops`: the layers and attention to build from; `compute_dtype`: what GEMMs and attention run in
        (None: the x_embedder weight's dtype); `residual_dtype`: what the residual stream, norms and RoPE are
        held in between them (fp32, as ComfyUI and the references; the compute dtype halves their traffic)."""
        super().__init__()
        self.cfg, self.compute_dtype, self.residual_dtype = cfg, compute_dtype, residual_dtype
        p = cfg.patch_size
        self.x_embedder = ops.Linear(p * p * cfg.in_channels, cfg.dim)
        self.t_embedder = TimestepEmbedder(min(cfg.dim, ADALN_DIM), ops)
        self.cap_embedder = nn.Sequential(ops.RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                          ops.Linear(cfg.cap_feat_dim, cfg.dim))  # fmt: skip
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(Block(cfg, True, ops) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, False, ops) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(Block(cfg, True, ops) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg.dim, p * p * cfg.in_channels, ops)
        if cfg.siglip_feat_dim is not None:  # Omni/Edit: reference-image features from SigLIP2
            self.siglip_embedder = nn.Sequential(
                ops.RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps), ops.Linear(cfg.siglip_feat_dim, cfg.dim)
            )
            self.siglip_refiner = nn.ModuleList(Block(cfg, False, ops) for _ in range(cfg.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (its Linear weights may be held in fp8)."""
        return self.compute_dtype or self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where it runs (a host that streams weights in overrides this with its load device)."""
        return self.x_embedder.weight.device

    def project(self, embedder: nn.Sequential, feats: torch.Tensor) -> torch.Tensor:
        """Caption or SigLIP features through their RMSNorm (fp32) and projection (compute dtype)."""
        return embedder[1](embedder[0](feats.float()).to(self.dtype)).to(self.residual_dtype)

    def pad(self, token: nn.Parameter, like: torch.Tensor) -> torch.Tensor:
        return token.to(like.device, self.residual_dtype)

    def padded(self, rows: torch.Tensor, n_all: int) -> torch.Tensor:
        """Image-token rows (B, n, dim) followed by the image pad token up to `n_all` rows."""
        rows = rows.to(self.residual_dtype)
        return torch.cat([rows, self.pad(self.x_pad_token, rows).expand(len(rows), n_all - rows.shape[1], -1)], 1)

    graphs = None  # a `graphs.Graphs` to replay plain forwards from (`Speed(graphs=True)`)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor, cap_lens: list[int] | None = None,
        control=None,
    ) -> torch.Tensor:  # fmt: skip
        """Predict the flow velocity `x0 - noise` (the official model's raw output).

        x: latents (B, C, H, W) (sizes that are not whole patches are padded circularly, as ComfyUI's NextDiT pads
        them, and the output cropped back); t: model time (B,), 1 - sigma;
        cap_feats: text features (B, L, cap_feat_dim) of which item i uses the first `cap_lens[i]` rows.
        Items of different image sizes go in separate calls (the result equals a mixed-size reference batch).
        control: a `controlnet.Control` (a ControlNet and its input), whose hints join the refiner and the layers.
        """
        p, bsz = self.cfg.patch_size, len(x)
        cap_lens = (cap_feats.shape[1],) * bsz if cap_lens is None else tuple(int(n) for n in cap_lens)
        if len(cap_lens) != bsz or min(cap_lens) < 1 or max(cap_lens) > cap_feats.shape[1]:
            raise ValueError(f"cap_lens {cap_lens} do not fit caption features of shape {tuple(cap_feats.shape)}")
        grid = (-(-x.shape[2] // p), -(-x.shape[3] // p))
        if self.graphs is None or control is not None:
            return self.predict(x, t, cap_feats, cap_lens, grid, control)
        keep = layout(self.cfg, grid, cap_lens, x.device)
        return self.graphs(lambda *a: self.predict(*a, cap_lens, grid), (x, t, cap_feats), (cap_lens,), keep)

    def predict(self, x, t, cap_feats, cap_lens: tuple[int, ...], grid: tuple[int, int], control=None):
        """`forward` on checked caption lengths and the image's grid of patches."""
        cfg, p, size = self.cfg, self.cfg.patch_size, x.shape
        x = to_patches(x, p)
        h, w = grid
        shape = ropes_in(layout(cfg, grid, cap_lens, x.device), self.residual_dtype)
        n, n_all, l_all = h * w, shape.img_rope.shape[1], shape.cap_rope.shape[1]

        dt = self.dtype
        cond = self.t_embedder(t * cfg.t_scale, dt)[:, None]

        img = self.padded(self.x_embedder(patchify(x, p).to(dt)), n_all)
        run = control.begin(self, img, shape, cond, dt) if control is not None else None
        for i, block in enumerate(self.noise_refiner):
            img = block(img, shape.img_rope, None, dt, cond)
            img = run.after_refiner(i, img) if run else img

        cap = F.pad(cap_feats[:, :l_all], (0, 0, 0, max(0, l_all - cap_feats.shape[1])))
        cap = torch.where(shape.cap_real, self.project(self.cap_embedder, cap), self.pad(self.cap_pad_token, cap))
        for block in self.context_refiner:
            cap = block(cap, shape.cap_rope, shape.cap_mask, dt)

        seq = torch.cat([img, cap], dim=1)
        if run:
            run.begin_layers(seq, cap)
        for i, block in enumerate(self.layers):
            seq = block(seq, shape.rope, shape.mask, dt, cond)
            seq = run.after_layer(i, seq) if run else seq

        out = unpatchify(self.final_layer(seq[:, :n], cond, dt), x.shape, p)
        return out[..., : size[2], : size[3]].to(x.dtype)

    def forward_omni(self, x, t, segments, refs, siglip=None) -> torch.Tensor:
        """Omni/Edit: the target's velocity given reference images, as diffusers' `ZImageOmniPipeline` runs it.

        x: noisy target latents (B, C, H, W); t: model time (B,); refs: N clean reference latents, each
        (B or 1, C, H_j, W_j); segments: the caption pieces around the images (N + 2; one without references;
        reference j follows piece j, the target follows piece N), each (features (B, L, cap_feat_dim), per-item lengths), e.g. `Embeddings`;
        siglip: per reference its SigLIP2 features (Hs, Ws, siglip_feat_dim), shared by the batch, or None.
        Per item the sequence is [captions, images, SigLIP]; references and target share the noise refiner.
        """
        cfg, p, bsz = self.cfg, self.cfg.patch_size, x.shape[0]
        if len(segments) < len(refs) + 1:
            raise ValueError(f"{len(refs)} reference images need {len(refs) + 2} caption segments, got {len(segments)}")
        if siglip is not None and (len(siglip) != len(refs) or cfg.siglip_feat_dim is None):
            raise ValueError("SigLIP features need an Omni transformer and one (Hs, Ws, C) tensor per reference")
        images = [r.expand(bsz, -1, -1, -1) for r in refs] + [x]
        grids = tuple(tuple(im.shape[2:]) for im in images)
        if any(hgt % p or wid % p for hgt, wid in grids):
            raise ValueError(f"latent sizes {grids} are not all multiples of the patch size {p}")
        sig_grids = tuple(tuple(sg.shape[:2]) for sg in siglip) if siglip else ()
        lengths = tuple(tuple(int(seg[1][i]) for seg in segments) for i in range(bsz))
        shape = ropes_in(omni_layout(cfg, lengths, grids, sig_grids, x.device), self.residual_dtype)
        dev, dt = x.device, self.dtype
        c = tuple(self.t_embedder(time * cfg.t_scale, dt)[:, None] for time in (t, torch.ones_like(t)))

        def embed(embedder, token, rows: list[list[torch.Tensor]]) -> list[torch.Tensor]:
            """Each item's pieces padded to whole blocks and embedded in one call over the batch, as diffusers does
            (so the same matrix products run); pad rows then become the pad token."""
            pieces = [[F.pad(r[None], (0, 0, 0, padded(len(r)) - len(r)), mode="replicate")[0] if len(r) else
                       r.new_zeros(SEQ_MULTIPLE, r.shape[1]) for r in item] for item in rows]  # fmt: skip
            real = torch.cat(
                [torch.arange(len(q)) < len(r) for item, raw in zip(pieces, rows) for q, r in zip(item, raw)]
            )
            out = torch.where(real[:, None].to(dev), embedder(torch.cat([torch.cat(i) for i in pieces])),
                              self.pad(token, x))  # fmt: skip
            return list(out.split([sum(map(len, item)) for item in pieces]))

        patches = [patchify(im, p) for im in images]
        img = torch.stack(embed(lambda rows: self.x_embedder(rows.to(dt)).to(self.residual_dtype), self.x_pad_token,
                                [[q[i] for q in patches] for i in range(bsz)]))  # fmt: skip
        for block in self.noise_refiner:
            img = block(img, shape.img_rope, None, dt, c, shape.img_noisy)

        rows = [[seg[0][i, :n] for seg, n in zip(segments, lens)] for i, lens in enumerate(lengths)]
        cap, cap_mask = stack_padded(embed(lambda f: self.project(self.cap_embedder, f), self.cap_pad_token, rows))
        for block in self.context_refiner:
            cap = block(cap, shape.cap_rope, cap_mask, dt)

        sig = None
        if siglip:  # read channel-major, as diffusers reads them; the target's slot holds pad tokens only
            flat = [f.permute(2, 0, 1).reshape(f.shape[0] * f.shape[1], f.shape[2]).to(dev) for f in siglip]
            sig = torch.stack(embed(lambda f: self.project(self.siglip_embedder, f), self.siglip_pad_token,
                                    [[*flat, flat[0][:0]]] * bsz))  # fmt: skip
            for block in self.siglip_refiner:
                sig = block(sig, shape.sig_rope, None, dt)

        seq = stack_padded([torch.cat([cap[i, : len(it.cap_ids)], img[i], *([sig[i]] if sig is not None else [])])
                            for i, it in enumerate(shape.items)])[0]  # fmt: skip
        for block in self.layers:
            seq = block(seq, shape.rope, shape.mask, dt, c, shape.noisy)

        n = (x.shape[2] // p) * (x.shape[3] // p)
        target = torch.stack([seq[i, s : s + n] for i, s in enumerate(shape.start)])
        flags = torch.stack([shape.noisy[i, s : s + n] for i, s in enumerate(shape.start)])
        out = self.final_layer(target, c, dt, flags)
        return unpatchify(out, x.shape, p).to(x.dtype)
