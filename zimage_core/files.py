"""Weight files on disk: safetensors and GGUF headers, and tensors read from private memory maps.

Each tensor's pages are handed back to the kernel right after its copy. (The safetensors library keeps every
page it touched mapped until the file is closed, which doubles peak RSS for a full-size model; the format itself
is a JSON header and raw little-endian data, so reading it here takes a few lines; GGUF is a binary header and
aligned data.) Where pages cannot be handed back (Windows has no `madvise`), each tensor is read into memory of
its own, freed after its copy: the same low peak, one more copy.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from . import ggml


class CheckpointError(Exception):
    """A file or folder that cannot be loaded; the message names it and says what to do."""


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def can_release() -> bool:
    """Whether mapped pages can be handed back to the kernel (`madvise(MADV_DONTNEED)`: Linux, macOS, BSD)."""
    return hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


class MappedFile:
    """A weight file whose tensors (`entries`: name -> dtype, shape, start, end) are read from a private memory
    map, their pages handed back after each copy; subclasses read the header."""

    path: Path
    metadata: dict
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    kinds: dict[str, str]  # name -> GGML block type, for the tensors stored in one
    _map: mmap.mmap | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in the model (a quantized tensor is read as its bytes)."""
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        """A CPU tensor of the file's bytes; copy it, then call `release(name)`."""
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        if not can_release():
            data = bytearray(end - start)
            with open(self.path, "rb") as f:
                f.seek(start)
                if f.readinto(data) != len(data):
                    raise CheckpointError(f"{self.path}: shorter than its header says. Re-download it.")
            return torch.frombuffer(data, dtype=dtype).view(shape)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes back
        if start % dtype.itemsize:
            return torch.frombuffer(bytearray(self._map[start:end]), dtype=dtype).view(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start).view(shape)

    def release(self, name: str):
        """Drop the pages of `name` from this process (they stay in the page cache)."""
        _, _, start, end = self.entries[name]
        if self._map is not None and end > start and can_release():
            page = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, page, end - page)

    def close(self):
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map (an error is on its way up): let GC unmap it
                pass
            self._map = None


class SafetensorsFile(MappedFile):
    """One safetensors file: its validated header; tensors are `dtype`, `shape` and a byte range."""

    def __init__(self, path: Path):
        self.path, self.kinds = path, {}
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


class GGUFFile(MappedFile):
    """One GGUF file (llama.cpp's format, versions 2 and 3): its metadata and tensor table.

    A GGML-quantized tensor reads as its bytes, one row of blocks per row of the weight, and `kinds` names its
    block type; `shape` is its shape in the model (city96's `comfy.gguf.orig_shape.*` where the file has one).
    """

    def __init__(self, path: Path):
        self.path, self.metadata, self.entries, self.kinds, self.shapes = path, {}, {}, {}, {}
        size = path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes). Re-download it.")
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] != b"GGUF":
                raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'). Re-download it.")
            version = struct.unpack_from("<I", head, 4)[0]
            if version not in (2, 3):
                raise CheckpointError(
                    f"{path}: GGUF version {version}; we read versions 2 and 3 (llama.cpp since August 2023, "
                    "little-endian). Re-convert the model with a current llama.cpp or ComfyUI-GGUF."
                )
            chunk = 1 << 20  # the header, tokenizer tables included, is read in growing pieces, never mapped
            while True:
                f.seek(0)
                buf = f.read(chunk)
                try:
                    self._pos, self.metadata = 8, {}
                    tables = self._header(buf)
                    break
                except (struct.error, UnicodeDecodeError, ValueError) as e:
                    if len(buf) < size:
                        chunk *= 8
                        continue
                    raise CheckpointError(f"{path}: truncated or corrupt GGUF header ({e}). Re-download it.") from None
        for name, kind, dims, start in tables:
            self._add(name, kind, dims, start, size)

    def _take(self, m, fmt: str):
        value = struct.unpack_from(fmt, m, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self, m) -> str:
        n = self._take(m, "<Q")
        if self._pos + n > len(m):
            raise ValueError("a string runs past the end of the file")
        self._pos += n
        return bytes(m[self._pos - n : self._pos]).decode("utf-8")

    def _value(self, m, kind: int):
        if kind == 8:
            return self._string(m)
        if kind == 9:
            item, n = self._take(m, "<I"), self._take(m, "<Q")
            items = [self._value(m, item) for _ in range(n)]
            return items if n <= 4096 else None  # tokenizer tables: never needed here
        if kind not in GGUF_SCALARS:
            raise ValueError(f"unknown value type {kind}")
        return self._take(m, GGUF_SCALARS[kind])

    def _header(self, m) -> list[tuple[str, str, tuple[int, ...], int]]:
        n_tensors, n_values = self._take(m, "<Q"), self._take(m, "<Q")
        for _ in range(n_values):
            key = self._string(m)
            self.metadata[key] = self._value(m, self._take(m, "<I"))
        tables = []
        for _ in range(n_tensors):
            name = self._string(m)
            dims = tuple(self._take(m, "<Q") for _ in range(self._take(m, "<I")))
            kind, offset = self._take(m, "<I"), self._take(m, "<Q")
            tables.append((name, ggml.TYPES.get(kind, f"type {kind}"), dims, offset))
        align = int(self.metadata.get("general.alignment") or 32)
        base = -(-self._pos // align) * align
        return [(name, kind, dims, base + offset) for name, kind, dims, offset in tables]

    def _add(self, name: str, kind: str, dims: tuple[int, ...], start: int, size: int):
        stored = tuple(reversed(dims))  # GGUF lists the fastest-moving dimension first
        if kind in ggml.PLAIN:
            dtype, nbytes = ggml.PLAIN[kind], math.prod(dims) * ggml.PLAIN[kind].itemsize
        elif kind in ggml.BLOCKS:
            block, block_bytes = ggml.BLOCKS[kind]
            if not dims or dims[0] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r} ({kind}) has rows of {dims[:1]} values, not "
                                      f"whole blocks of {block}. Re-download it.")  # fmt: skip
            dtype, stored = torch.uint8, (*stored[:-1], dims[0] // block * block_bytes)
            nbytes, self.kinds[name] = math.prod(stored), kind
        else:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is stored as GGML {kind}, which we do not dequantize; we load "
                f"{', '.join(ggml.BLOCKS)} and F32/F16/BF16. Use a file of another quantization (Q8_0, Q6_K, "
                "Q5_K_S or Q4_K_M)."
            )
        if start + nbytes > size:
            raise CheckpointError(
                f"{self.path}: truncated: tensor {name!r} ends at byte {start + nbytes:,} but the file has "
                f"{size:,}. The download or copy did not finish; fetch the file again."
            )
        self.entries[name] = (dtype, stored, start, start + nbytes)
        orig = self.metadata.get(f"comfy.gguf.orig_shape.{name}")
        self.shapes[name] = tuple(int(d) for d in orig) if orig else tuple(reversed(dims))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]
