"""What the loader nodes list from ComfyUI's model folders (from the file lists `folder_paths` gives, as
`nodes/models.py` passes them), and how loaded models are kept."""

import gc
import os
import time
from pathlib import Path

import pytest

from zimage_core.checkpoint import CheckpointError
from zimage_core.loaders import ModelCache, model_entries, resolve, stamp


def listing(roots: list[Path]) -> list[str]:
    """Every file under `roots`, relative, with the OS's separators: what ComfyUI's `folder_paths` lists."""
    return sorted({os.path.relpath(os.path.join(d, f), root) for root in roots for d, _, files in os.walk(root)
                   for f in files})  # fmt: skip


def model_choices(roots: list[Path], component: str) -> dict[str, Path]:
    return model_entries(roots, listing(roots), component)


def resolve_name(roots: list[Path], component: str, name: str) -> Path:
    return resolve(model_choices(roots, component), name, roots)


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_choices_list_files_and_diffusers_folders_once(tmp_path):
    a, b = tmp_path / "unet", tmp_path / "diffusion_models"
    touch(a / "z_image_turbo_bf16.safetensors")
    touch(a / "sub" / "z_image_fp8.safetensors")
    touch(a / "notes.txt")
    touch(a / ".cache" / "hidden.safetensors")
    touch(b / "z_image_turbo_bf16.safetensors")  # the same name in a later folder: the first folder wins
    touch(b / "Z-Image-Turbo" / "model_index.json")  # a pipeline folder: listed as one entry
    touch(b / "Z-Image-Turbo" / "transformer" / "config.json")
    touch(b / "Z-Image-Turbo" / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    touch(b / "Z-Image-Turbo" / "vae" / "config.json")
    touch(b / "Z-Image-Turbo" / "vae" / "diffusion_pytorch_model.safetensors")
    touch(b / "my_transformer" / "config.json")  # a component folder
    touch(b / "my_transformer" / "diffusion_pytorch_model.safetensors")
    found = model_choices([a, b, tmp_path / "missing"], "transformer")
    assert list(found) == [
        "Z-Image-Turbo", "my_transformer", "sub/z_image_fp8.safetensors", "z_image_turbo_bf16.safetensors",
    ]  # fmt: skip
    assert found["z_image_turbo_bf16.safetensors"] == a / "z_image_turbo_bf16.safetensors"
    assert found["Z-Image-Turbo"] == b / "Z-Image-Turbo"
    assert "Z-Image-Turbo" not in model_choices([b], "text_encoder")  # it has no text_encoder/ subfolder
    assert "Z-Image-Turbo" in model_choices([b], "vae")


def test_stamp_changes_when_a_file_is_replaced_not_when_it_is_read(tmp_path):
    file = touch(tmp_path / "model.safetensors", b"one")
    folder = tmp_path / "folder"
    touch(folder / "config.json", b"{}")
    shard = touch(folder / "model.safetensors", b"weights")
    before, folder_before = stamp(file), stamp(folder)
    file.read_bytes()
    assert stamp(file) == before
    replacement = touch(tmp_path / "new.safetensors", b"two")  # same size, other file, moved into place
    os.replace(replacement, file)
    assert stamp(file) != before
    time.sleep(0.01)
    shard.write_bytes(b"weights")
    assert stamp(folder) != folder_before


class Model:
    """Stands in for a loaded model: weak-referenceable, counted."""

    built = 0

    def __init__(self):
        Model.built += 1


def test_cache_reuses_while_held_reloads_on_change_and_keeps_nothing_alive(tmp_path):
    a = touch(tmp_path / "a.safetensors")
    cache, start = ModelCache(), Model.built
    first = cache.get("transformer", a, ("default",), Model)
    assert cache.get("transformer", a, ("default",), Model) is first and Model.built == start + 1
    assert cache.get("transformer", a, ("fp8",), Model) is not first  # other options: another model
    os.replace(touch(tmp_path / "c.safetensors", b"y"), a)
    second = cache.get("transformer", a, ("default",), Model)
    assert second is not first and Model.built == start + 3
    assert cache.get("vae", a, ("default",), Model) is not second  # another kind: another model
    del first, second
    gc.collect()
    assert not cache.alive  # nothing held here once the callers let go
    cache.get("transformer", a, ("default",), Model)
    assert Model.built == start + 5


def test_a_failed_load_stores_nothing(tmp_path):
    a = touch(tmp_path / "a.safetensors")
    cache = ModelCache()

    def broken():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        cache.get("vae", a, (), broken)
    assert not cache.alive
    assert isinstance(cache.get("vae", a, (), Model), Model)


def test_model_names_cannot_escape_the_model_folders(tmp_path):
    root = tmp_path / "models" / "diffusion_models"
    inside = touch(root / "sub" / "z_image_turbo_bf16.safetensors")
    touch(tmp_path / "models" / "vae" / "ae.safetensors")
    touch(tmp_path / "secret.safetensors")
    assert resolve_name([root], "transformer", "sub/z_image_turbo_bf16.safetensors") == inside
    for name in (
        "../vae/ae.safetensors",
        "../../secret.safetensors",
        "..\\..\\secret.safetensors",
        str(tmp_path / "secret.safetensors"),
        "sub/../../vae/ae.safetensors",
        "/etc/passwd",
        "",
        ".",
    ):
        with pytest.raises(CheckpointError, match="is not among the models in"):
            resolve_name([root], "transformer", name)
    assert all(Path(p).resolve().is_relative_to(root) for p in model_choices([root], "transformer").values())
    hostile = ["../vae/ae.safetensors", str(tmp_path / "secret.safetensors"), "sub/../../secret.safetensors"]
    assert list(model_entries([root], hostile, "transformer")) == []  # whatever a listing holds
