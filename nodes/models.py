"""Models in ComfyUI's model folders, read from `folder_paths`' cached file lists (the host refreshes them when a
folder changes), so listing, validating and fingerprinting a loader never walks the disk on the event loop."""

import functools
from pathlib import Path

import folder_paths

from ..zimage_core.loaders import model_entries, resolve


@functools.lru_cache(maxsize=64)
def entries(component: str, roots: tuple[Path, ...], names: tuple[str, ...]) -> dict[str, Path]:
    return model_entries(list(roots), names, component)


# GGUF files sit in the same folders under a key of their own, which city96's ComfyUI-GGUF registers the same way
# (the folder's own path list, extension .gguf): with both packs installed, both list the same files.
GGUF_KEYS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}


def register_gguf_folders():
    known = folder_paths.folder_names_and_paths
    for folder, key in GGUF_KEYS.items():
        if key not in known and folder in known:
            known[key] = (known[folder][0], {".gguf"})


register_gguf_folders()


def roots(folder: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in folder_paths.get_folder_paths(folder))


def choices(folder: str, component: str) -> dict[str, Path]:
    """A loader's files and diffusers folders, worked out once per listing the host gives."""
    names = folder_paths.get_filename_list(folder)
    if GGUF_KEYS.get(folder) in folder_paths.folder_names_and_paths:
        names = [*names, *folder_paths.get_filename_list(GGUF_KEYS[folder])]
    return dict(entries(component, roots(folder), tuple(names)))


def find(folder: str, component: str, name: str) -> Path:
    """The file or folder behind a loader's `name`, or an error saying where it looked."""
    return resolve(choices(folder, component), name, list(roots(folder)))
