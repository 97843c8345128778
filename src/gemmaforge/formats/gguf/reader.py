"""GGUF (llama.cpp) reader: header, metadata and tensor directory of a memory-mapped file.

Pure numpy/torch, no ``gguf`` or ``transformers`` import. A tensor's bytes are read when it is
dequantized (``dequant.py``).

Layout of a GGUF v2/v3 file (all little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to ``general.alignment`` (default 32)
    tensor data; each tensor at data_start + offset

``ne[0]`` is the fastest-moving dimension, so the torch shape is ``reversed(ne)``; quantization
blocks run along ``ne[0]`` (the last torch dimension).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import CheckpointError
from .dequant import GGML_TYPES, dequantize, is_supported, supported_types

# ----------------------------------------------------------------------------------------------
# metadata value types
# ----------------------------------------------------------------------------------------------

_SCALAR = {  # value type -> (struct format, numpy dtype)
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    """Internal: a read ran past the end of the file's bytes."""


class _Cursor:
    """Sequential little-endian reads over a byte buffer (the memory map)."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf, pos: int = 0):
        self.buf = buf
        self.pos = pos
        self.size = len(buf)

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated()

    def u32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def scalar(self, vtype: int):
        fmt, _ = _SCALAR[vtype]
        n = struct.calcsize(fmt)
        self._need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if etype in _SCALAR:
                dt = np.dtype(_SCALAR[etype][1]).newbyteorder("<")
                nbytes = count * dt.itemsize
                self._need(nbytes)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += nbytes
                return arr.tolist()
            if etype == _STRING:
                return self._strings(count)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise ValueError(f"array of unknown value type {etype}")
        raise ValueError(f"unknown metadata value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated()
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise _Truncated()
            append(str(buf[pos:end], "utf-8", "replace"))
            pos = end
        self.pos = pos
        return out


# ----------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (reversed ggml ne)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type {self.ggml_type}",))[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A parsed, memory-mapped GGUF file. Use :func:`read_gguf` to open one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{where}: no such GGUF file")
        self.file_size = self.path.stat().st_size
        if self.file_size < 24:
            raise CheckpointError(f"{where}: truncated GGUF file ({self.file_size} bytes, shorter than the header)")
        try:
            self._mm = np.memmap(self.path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{where}: cannot memory-map the file ({e})") from None
        mm = self._mm
        magic = bytes(mm[:4])
        if magic != b"GGUF":
            raise CheckpointError(f"{where}: not a GGUF file (wrong magic {magic!r}, expected b'GGUF')")
        cur = _Cursor(memoryview(mm), 4)
        try:
            self.version = cur.u32()
            if self.version not in (2, 3):
                swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
                if swapped in (2, 3):
                    raise CheckpointError(f"{where}: big-endian GGUF files are not supported")
                raise CheckpointError(f"{where}: unsupported GGUF version {self.version} (supported: 2, 3)")
            n_tensors = cur.u64()
            n_kv = cur.u64()
            if n_tensors > self.file_size or n_kv > self.file_size:
                raise CheckpointError(
                    f"{where}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys in "
                    f"a {self.file_size}-byte file)"
                )
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.u32()
                try:
                    self.metadata[key] = cur.value(vtype)
                except ValueError as e:
                    raise CheckpointError(f"{where}: metadata key {key!r}: {e}") from None
            raw_infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.u32()
                if n_dims > 8:
                    raise CheckpointError(f"{where}: tensor {name!r} has {n_dims} dimensions (corrupt tensor info)")
                ne = [cur.u64() for _ in range(n_dims)]
                ggml_type = cur.u32()
                offset = cur.u64()
                raw_infos.append((name, ne, ggml_type, offset))
        except _Truncated:
            raise CheckpointError(f"{where}: truncated GGUF file (the header runs past the end of the file)") from None

        self.alignment = int(self.metadata.get("general.alignment", 32))
        if self.alignment <= 0:
            raise CheckpointError(f"{where}: invalid general.alignment {self.alignment}")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, offset in raw_infos:
            numel = 1
            for d in ne:
                numel *= d
            if ggml_type in GGML_TYPES:
                _, bs, ts = GGML_TYPES[ggml_type]
                if ne and ne[0] % bs:
                    raise CheckpointError(
                        f"{where}: tensor {name!r} ({GGML_TYPES[ggml_type][0]}) has a row of {ne[0]} elements, "
                        f"not a multiple of the block size {bs}"
                    )
                nbytes = numel // bs * ts
            else:
                nbytes = 0  # unknown type: size unknown, reported when the tensor is read
            info = GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, self.data_offset + offset, nbytes)
            if info.offset + info.nbytes > self.file_size:
                raise CheckpointError(
                    f"{where}: truncated GGUF file: tensor {name!r} needs bytes {info.offset}..{info.offset + nbytes} "
                    f"but the file has {self.file_size}"
                )
            if name in self.tensors:
                raise CheckpointError(f"{where}: duplicate tensor name {name!r}")
            self.tensors[name] = info

    # -- metadata helpers ------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: missing metadata key 'general.architecture'")
        return arch

    def require(self, key: str):
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
        return self.metadata[key]

    # -- tensors ---------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a read-only view into the memory map)."""
        info = self._info(name)
        return self._mm[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in torch shape."""
        info = self._info(name)
        if not is_supported(info.ggml_type):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has ggml type {info.type_name} ({info.ggml_type}), "
                f"which gemmaforge cannot dequantize (supported: {', '.join(supported_types())})"
            )
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (metadata + tensor table) and memory-map its data."""
    return GGUFFile(path)
