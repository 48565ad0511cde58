"""Models in ComfyUI's model folders, read from `folder_paths`' cached file lists (the host refreshes them when a
folder changes), so listing, validating and fingerprinting a loader never walks the disk on the event loop."""

import functools
from pathlib import Path

import folder_paths

from ..zimage_core.loaders import model_entries, resolve


@functools.lru_cache(maxsize=64)
def entries(component: str, roots: tuple[Path, ...], names: tuple[str, ...]) -> dict[str, Path]:
    return model_entries(list(roots), names, component)


def roots(folder: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in folder_paths.get_folder_paths(folder))


def choices(folder: str, component: str) -> dict[str, Path]:
    """A loader's files and diffusers folders, worked out once per listing the host gives."""
    return dict(entries(component, roots(folder), tuple(folder_paths.get_filename_list(folder))))


def find(folder: str, component: str, name: str) -> Path:
    """The file or folder behind a loader's `name`, or an error saying where it looked."""
    return resolve(choices(folder, component), name, list(roots(folder)))
