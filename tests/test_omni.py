"""Omni/Edit: our transformer's reference-image path equals diffusers' ZImageTransformer2DModel in omni mode."""

import pytest
import torch
from conftest import rel_err
from helpers import SMALL, TINY, reference_transformer, write_diffusers_folder

from zimage_core.loaders import load_transformer

# diffusers' tiny test transformer with SigLIP weights; the table covers latents up to 64 rows for SigLIP's ids
OMNI_TINY = dict(TINY, siglip_feat_dim=24, axes_lens=[256, 64, 64])
# the real head size, RoPE split and table, two refiner blocks per kind
OMNI_SMALL = dict(SMALL, siglip_feat_dim=24, cap_feat_dim=16, n_refiner_layers=2)


@pytest.fixture(scope="module", params=[OMNI_TINY, OMNI_SMALL], ids=["tiny", "small"])
def omni(request, tmp_path_factory):
    ref = reference_transformer(request.param, seed=3)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("omni"), ref, "10MB")
    return ref, load_transformer(folder, dtype=torch.float32)


def inputs(ref_sizes, target, seg_lens, sig_grids, seed=0):
    """Random references (16, H, W), a batch of targets, caption segments per item and SigLIP features."""
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(16, h, w, generator=g) for h, w in ref_sizes]
    x = torch.randn(len(seg_lens), 16, *target, generator=g)
    segs = [[torch.randn(n, OMNI_TINY["cap_feat_dim"], generator=g) for n in lens] for lens in seg_lens]
    sig = [torch.randn(h, w, OMNI_TINY["siglip_feat_dim"], generator=g) for h, w in sig_grids] or None
    return refs, x, segs, sig


def reference(model, refs, x, t, segs, sig):
    n = len(refs)
    with torch.no_grad():
        out = model(
            [[r[:, None] for r in refs] + [xi[:, None]] for xi in x], t, segs,
            siglip_feats=[[*sig, None] if sig else None for _ in x],
            image_noise_mask=[[0] * n + [1] for _ in x], return_dict=False,
        )[0]  # fmt: skip
    return torch.stack([o[:, 0] for o in out])


def ours(model, refs, x, t, segs, sig):
    segments = []
    for k in range(len(segs[0])):
        lens = [item[k].shape[0] for item in segs]
        feats = torch.zeros(len(segs), max(lens), OMNI_TINY["cap_feat_dim"])
        for i, item in enumerate(segs):
            feats[i, : lens[i]] = item[k]
        segments.append((feats, lens))
    with torch.no_grad():
        return model.forward_omni(x, t, segments, [r[None] for r in refs], sig)


@pytest.mark.parametrize(
    "ref_sizes, target, seg_lens, sig_grids",
    [
        ([(16, 12)], (16, 12), [[4, 20, 2]], [(4, 3)]),  # one reference, one item: the prompt's ids all 0
        ([(16, 12)], (10, 14), [[4, 40, 2], [4, 7, 2]], [(3, 5)]),  # CFG-like batch: prompt and negative
        ([(22, 18), (16, 18)], (16, 18), [[4, 2, 9, 2], [4, 2, 7, 2]], [(4, 4), (2, 5)]),  # two references
        ([], (12, 12), [[9], [35]], []),  # no reference: one segment, no SigLIP
    ],
)
def test_reference_images_as_diffusers_omni(omni, ref_sizes, target, seg_lens, sig_grids):
    reference_model, model = omni
    refs, x, segs, sig = inputs(ref_sizes, target, seg_lens, sig_grids)
    t = torch.linspace(0.2, 0.7, len(seg_lens))
    expected = reference(reference_model, refs, x, t, segs, sig)
    got = ours(model, refs, x, t, segs, sig)
    assert rel_err(got, expected) <= 1e-5, rel_err(got, expected)


def test_siglip_features_need_an_omni_transformer(tmp_path):
    plain = load_transformer(write_diffusers_folder(tmp_path, reference_transformer(TINY)), dtype=torch.float32)
    refs, x, segs, sig = inputs([(16, 12)], (16, 12), [[4, 20, 2]], [(4, 3)])
    with pytest.raises(ValueError, match="need an Omni transformer"):
        ours(plain, refs, x, torch.tensor([0.5]), segs, sig)
    with pytest.raises(ValueError, match="need 3 caption segments"):
        ours(plain, refs, x, torch.tensor([0.5]), [[segs[0][0]]], None)
