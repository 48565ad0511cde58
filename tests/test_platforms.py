"""Where Linux's helpers are missing (Windows has no `madvise`, no `resource` and no /proc; psutil may be absent too):
every layout loads the same tensors, `generate` and `inspect` run, and loading keeps its low peak memory."""

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui import write_models
from helpers import (
    QWEN3_SMALL,
    REAL,
    SMALL,
    VAE_TINY,
    fp8_forms,
    full_size_specs,
    loaded_peak,
    reference_qwen3,
    reference_transformer,
    reference_vae,
    to_bfl,
    to_comfy,
    write_diffusers_folder,
    write_file,
    write_pipeline_folder,
    write_sparse,
)
from PIL import Image

from zimage_core import checkpoint, files
from zimage_core.__main__ import main
from zimage_core.loaders import LOADERS, load_siglip

ROOT = Path(__file__).parents[1]


def windows_like(patch: pytest.MonkeyPatch):
    """Take away what Windows lacks; a memory map of a weight file then fails the test."""
    patch.delattr(mmap, "MADV_DONTNEED", raising=False)
    patch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    patch.setitem(sys.modules, "psutil", None)
    read_text = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc"):
            raise FileNotFoundError(self)
        return read_text(self, *args, **kwargs)

    def no_map(*args, **kwargs):
        raise AssertionError("a weight file was memory-mapped where its pages cannot be handed back")

    patch.setattr(Path, "read_text", no_proc)
    patch.setattr(mmap, "mmap", no_map)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(component, path) of every layout kind: transformer folders, single files and fp8 forms, the text encoder's
    folder and single file, the VAE's two namings, SigLIP2 as one file."""
    root = tmp_path_factory.mktemp("layouts")
    transformer = reference_transformer(SMALL, seed=1)
    sd = to_comfy(transformer.state_dict())
    forms, _ = fp8_forms(sd)
    qwen = reference_qwen3(QWEN3_SMALL)
    vae = reference_vae(VAE_TINY)
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    qwen.save_pretrained(root / "te")
    vae.save_pretrained(root / "vae")
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                    num_attention_heads=1, patch_size=16, num_patches=16))  # fmt: skip
    return {
        "transformer diffusers folder": ("transformer", write_diffusers_folder(root / "t", transformer, "300KB")),
        "transformer pipeline folder": ("transformer", write_pipeline_folder(root / "pipe", transformer)),
        "transformer ComfyUI file": (
            "transformer",
            write_file(
                root / "z_image_turbo_bf16.safetensors",
                {"model.diffusion_model." + k: v.bfloat16() for k, v in sd.items()},
            ),
        ),
        **{
            f"transformer fp8 {form}": ("transformer", write_file(root / f"{form}.safetensors", *forms[form]))
            for form in forms
        },
        "text encoder folder": ("text_encoder", root / "te"),
        "text encoder ComfyUI file": (
            "text_encoder",
            write_file(root / "qwen_3_4b.safetensors", {"model." + k: v for k, v in qwen.state_dict().items()}),
        ),
        "VAE diffusers folder": ("vae", root / "vae"),
        "VAE ae.safetensors": ("vae", write_file(root / "ae.safetensors", to_bfl(vae.state_dict()))),
        "SigLIP2 file": (
            "siglip",
            write_file(root / "siglip2.safetensors", {f"vision_model.{k}": v for k, v in siglip.state_dict().items()}),
        ),
    }


def load(component: str, path: Path) -> dict[str, torch.Tensor]:
    model = load_siglip(path)[0] if component == "siglip" else LOADERS[component](path, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "layout",
    ["transformer diffusers folder", "transformer pipeline folder", "transformer ComfyUI file",
     "transformer fp8 plain", "transformer fp8 scaled", "transformer fp8 comfy_quant", "text encoder folder",
     "text encoder ComfyUI file", "VAE diffusers folder", "VAE ae.safetensors", "SigLIP2 file"],
)  # fmt: skip
def test_every_layout_loads_the_same_tensors_without_madvise(layouts, layout):
    component, path = layouts[layout]
    expected = load(component, path)
    with pytest.MonkeyPatch.context() as patch:
        windows_like(patch)
        assert not files.can_release()
        got = load(component, path)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # the same bytes, read another way


def test_a_truncated_file_is_refused_by_the_fallback_reader_too(tmp_path):
    path = write_file(tmp_path / "ae.safetensors", to_bfl(reference_vae(VAE_TINY).state_dict()))
    with pytest.MonkeyPatch.context() as patch:
        windows_like(patch)
        ckpt = checkpoint.open_checkpoint(path, "vae")
        name = max(ckpt.names, key=lambda n: ckpt.names[n].entries[n][3])  # the tensor at the end of the file
        path.write_bytes(path.read_bytes()[:-8])
        with pytest.raises(checkpoint.CheckpointError, match="shorter than its header"):
            ckpt.read(name)


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """A ComfyUI models/ folder with the released names, small random weights."""
    written = tmp_path_factory.mktemp("written")
    write_models(written)
    root = tmp_path_factory.mktemp("models")
    for folder, name, kind in (("diffusion_models", "z_image_turbo_bf16.safetensors", "transformer"),
                               ("text_encoders", "qwen_3_4b.safetensors", "text_encoder"),
                               ("vae", "ae.safetensors", "vae")):  # fmt: skip
        (root / folder).mkdir()
        (root / folder / name).write_bytes((written / f"{kind}.safetensors").read_bytes())
    return root


def test_generate_and_inspect_run_without_madvise_resource_and_proc(comfy_models, tmp_path, capsys):
    args = ["generate", "--model", str(comfy_models), "--prompt", "a cat", "--size", "64x64", "--steps", "2",
            "--dtype", "fp32"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "linux.png")]) == 0
    with pytest.MonkeyPatch.context() as patch:
        windows_like(patch)
        assert main([*args, "--out", str(tmp_path / "windows.png")]) == 0
        capsys.readouterr()
        assert main(["inspect", str(comfy_models / "vae" / "ae.safetensors")]) == 0
        assert "peak RSS      not measurable on this system" in capsys.readouterr().out
    linux, windows = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("linux", "windows"))
    assert linux.shape == (64, 64, 3) and np.array_equal(linux, windows)  # one process, one shape: one result


@pytest.mark.heavy
def test_the_fallback_reader_keeps_peak_rss_near_the_weights_held(tmp_path):
    """A real-width 4-layer transformer, sparse bf16, read without madvise: the same bound as the mapped reader."""
    specs = full_size_specs(dict(REAL, n_layers=4), torch.bfloat16)
    comfy = to_comfy({n: torch.empty(s, device="meta") for n, (s, _) in specs.items()})
    path = write_sparse(tmp_path / "big.safetensors", {n: (tuple(t.shape), torch.bfloat16) for n, t in comfy.items()})
    code = f"""
import mmap, sys
del mmap.MADV_DONTNEED
sys.modules["resource"] = sys.modules["psutil"] = None  # as windows_like: Linux's psutil itself needs `resource`
from zimage_core import files
assert not files.can_release()
from zimage_core.__main__ import main
sys.exit(main(["inspect", "--json", {str(path)!r}]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["held_bytes"] > 1.5e9 and loaded_peak(info) <= 1.15 * info["held_bytes"] + 0.15e9
