"""A memory-mapped GGUF file: validated metadata and zero-copy views of its tensor bytes."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from runtime.errors import GGUFError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
# Arrays this long in the metadata are data (vocabularies, merges), not settings;
# anything longer than this is treated as a corrupt header rather than read.
_MAX_ARRAY_LEN = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's place in the file. `shape` is in torch order (rows, cols): ggml's ne reversed."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # the raw bytes, uint8, a view into the memory map (never a copy)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Reader(GGUFReader):
    """GGUFReader with a fast path for metadata arrays.

    The stock reader makes two numpy views per array element, which takes ~15 s on a
    262k-token vocabulary; here a scalar array is one view and a string array one
    memoryview slice per item. `ReaderField.contents()` reads both layouts.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        if n > _MAX_ARRAY_LEN:
            raise ValueError(f"array of {n} items")
        itype = GGUFValueType(int(raw_itype[0]))
        offs = orig_offs + 12
        if itype == GGUFValueType.STRING:
            buf = memoryview(self.data)  # type: ignore[arg-type]  # np.memmap is a buffer
            size = len(buf)
            # Each item has an 8-byte length: a corrupt count fails here, not after
            # millions of empty reads past the end.
            if offs + 8 * n > size:
                raise ValueError("string array runs past the end of the file")
            parts: list[Any] = [raw_itype, alen]
            for _ in range(n):
                slen = int.from_bytes(buf[offs : offs + 8], "little")
                parts.append(buf[offs + 8 : offs + 8 + slen])
                offs += 8 + slen
                if offs > size:
                    raise ValueError("string array runs past the end of the file")
            return offs - orig_offs, parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # nested arrays: rare and small, the stock path handles them
            return super()._get_field_parts(orig_offs, raw_type)
        arr = self._get(offs, nptype, n)
        if len(arr) != n:
            raise ValueError("array runs past the end of the file")
        return 12 + int(arr.nbytes), [raw_itype, alen, arr], [2], [GGUFValueType.ARRAY, itype]

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        # Check every tensor against the file before the stock code makes numpy views of
        # its bytes: an unknown type or a truncated file is then reported as what it is,
        # not as a failed reshape.
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = printable(bytes(name_data).decode("utf-8", "replace"))
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise UnsupportedModelError(
                    f"tensor {name}: unknown ggml type id {int(raw_dtype[0])}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            ne = [int(x) for x in dims]
            if not ne or any(n <= 0 for n in ne) or ne[0] % block:
                raise GGUFError(f"tensor {name}: bad shape {printable(str(ne), 60)} for type {qtype.name}")
            end = start_offs + int(offset[0]) + math.prod(ne) // block * type_size
            if end > size:
                raise GGUFError(f"truncated: tensor {name} needs bytes up to {end}, file has {size}")
        super()._build_tensors(start_offs, fields)


class GGUFFile:
    """Opens a GGUF file read-only through a memory map and checks it before anything uses it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read ({e.strerror or _short(e)})") from e
        if size < 24:
            raise GGUFError(f"{self.path}: too small to be a GGUF file ({size} bytes)")
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            self._reader = _Reader(self.path, "r")
        except GGUFError as e:  # from _build_tensors: already says what is wrong
            raise type(e)(f"{self.path}: {e}") from None
        except (ValueError, IndexError, OverflowError, KeyError, TypeError, MemoryError, OSError) as e:
            raise GGUFError(f"{self.path}: corrupt or truncated GGUF header ({_short(e)})") from e
        self.tensors: dict[str, TensorInfo] = self._index_tensors(size)

    def _index_tensors(self, file_size: int) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            try:
                qtype = GGMLQuantizationType(int(t.tensor_type))
            except ValueError:
                raise UnsupportedModelError(
                    f"tensor {printable(t.name)}: unknown ggml type id {int(t.tensor_type)}"
                ) from None
            ne = [int(x) for x in t.shape]
            block, type_size = GGML_QUANT_SIZES[qtype]
            if any(n <= 0 for n in ne) or ne[0] % block:
                raise GGUFError(f"tensor {printable(t.name)}: bad shape {printable(str(ne), 60)} for type {qtype.name}")
            n_bytes = int(np.prod(ne)) // block * type_size
            end = int(t.data_offset) + n_bytes
            if end > file_size:
                raise GGUFError(
                    f"{self.path}: truncated: tensor {printable(t.name)} needs bytes up to {end}, "
                    f"file has {file_size}"
                )
            raw = self._reader.data[int(t.data_offset) : end]
            out[t.name] = TensorInfo(t.name, qtype, tuple(reversed(ne)), raw)
        return out

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair decoded to Python values (strings, numbers, lists)."""
        md: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if len(field.data) > _MAX_ARRAY_LEN:
                raise GGUFError(f"metadata {printable(key)}: array of {len(field.data)} items is absurd")
            try:
                md[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as e:
                raise GGUFError(f"metadata {printable(key)}: unreadable value ({_short(e)})") from e
        return md

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.path}: metadata lacks general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def mapping(self) -> tuple[int, int]:
        """(address, length) of the file's read-only memory map."""
        data = self._reader.data
        return int(data.ctypes.data), int(data.nbytes)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name}") from None

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {printable(msg[0], 160)}" if msg else type(e).__name__


def printable(s: str, limit: int = 80) -> str:
    """A name from the file made safe for a one-line message: escaped and shortened."""
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."
