"""GGUF (llama.cpp) reader: metadata, tensors, dequantization, Gemma 3 conversion.

Pure numpy/torch, no ``gguf`` or ``transformers`` import. The file is memory-mapped; a tensor's
bytes are read when it is dequantized.

    hf_config, state_dict, tokenizer_json = load_gguf("gemma-3-270m-Q4_K_M.gguf")

Layout of a GGUF v2/v3 file (all little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to ``general.alignment`` (default 32)
    tensor data; each tensor at data_start + offset

``ne[0]`` is the fastest-moving dimension, so the torch shape is ``reversed(ne)``; quantization
blocks run along ``ne[0]`` (the last torch dimension).

Conversion to the transformers ``Gemma3ForCausalLM`` layout follows what transformers 5.23 does with
a gemma3 GGUF: tensors are renamed and every ``*norm.weight`` gets 1 subtracted (llama.cpp stores
Gemma's RMSNorm scale as ``1 + w``); there is no q/k permutation for Gemma.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "GGML_TYPES",
    "GGUFFile",
    "GGUFTensorInfo",
    "dequantize",
    "gguf_to_hf_config",
    "gguf_to_hf_name",
    "gguf_tokenizer_json",
    "load_gguf",
    "load_gguf_tokenizer",
    "read_gguf",
    "supported_types",
]

# ----------------------------------------------------------------------------------------------
# ggml tensor types: id -> (name, elements per block, bytes per block)
# ----------------------------------------------------------------------------------------------

QK_K = 256

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
    15: ("Q8_K", QK_K, 292),
    16: ("IQ2_XXS", QK_K, 66),
    17: ("IQ2_XS", QK_K, 74),
    18: ("IQ3_XXS", QK_K, 98),
    19: ("IQ1_S", QK_K, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", QK_K, 110),
    22: ("IQ2_S", QK_K, 82),
    23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", QK_K, 54),
    35: ("TQ2_0", QK_K, 66),
    39: ("MXFP4", 32, 17),
}

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
        if info.ggml_type not in _DEQUANT:
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


# ----------------------------------------------------------------------------------------------
# dequantization
#
# A kernel takes raw blocks ``b`` (uint8, shape (n, type_size)) and writes float32 values into
# ``o`` (shape (n, block_size)). Big tensors go through in cache-sized chunks written straight into
# the result, so the only full-size memory traffic is the output itself.
#
# Every formula keeps the float operation order of ggml's reference dequantize_row_* (and of the
# gguf-py package): fp16 scales are widened exactly, integers are exact in float32, and each
# product / sum is one float32 rounding done in the same order, so results are bit-identical.
# ----------------------------------------------------------------------------------------------

_U8 = np.uint8


def _f16(b: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte ``start`` of every block, as float32 (n, 1)."""
    return b[:, start : start + 2].view(np.float16).astype(np.float32)


def _low_high(qs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Nibbles of ``qs`` (n, m, g) into ``out`` (n, m, 2, g): low nibbles, then high nibbles."""
    np.bitwise_and(qs, _U8(0x0F), out=out[:, :, 0])
    np.right_shift(qs, _U8(4), out=out[:, :, 1])
    return out


_SH2 = np.array([0, 2, 4, 6], dtype=_U8)
_SH1 = np.arange(8, dtype=_U8)


def _crumbs(x: np.ndarray, n_groups: int) -> np.ndarray:
    """2-bit fields: (n, n_groups*32) bytes -> (n, n_groups, 4, 32), shift 0, 2, 4, 6."""
    n = x.shape[0]
    return (x.reshape(n, n_groups, 1, 32) >> _SH2.reshape(1, 1, 4, 1)) & _U8(3)


def _k_f32(b, o):
    o[...] = b.view(np.float32)


def _k_f16(b, o):
    o[...] = b.view(np.float16)


def _k_bf16(b, o):
    ov = o.view(np.uint32)
    ov[...] = b.view(np.uint16)
    ov <<= np.uint32(16)


def _k_f64(b, o):
    o[...] = b.view(np.float64)


def _k_q4_0(b, o):  # d, qs[16]: x = d * (q - 8)
    n = b.shape[0]
    q = _low_high(b[:, 2:].reshape(n, 1, 16), np.empty((n, 1, 2, 16), _U8)).reshape(n, 32)
    q -= _U8(8)  # wraps; reinterpreted as int8 below
    np.multiply(_f16(b, 0), q.view(np.int8), out=o)


def _k_q4_1(b, o):  # d, m, qs[16]: x = d * q + m
    n = b.shape[0]
    q = _low_high(b[:, 4:].reshape(n, 1, 16), np.empty((n, 1, 2, 16), _U8)).reshape(n, 32)
    np.multiply(_f16(b, 0), q, out=o)
    o += _f16(b, 2)


def _q5(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    n = qs.shape[0]
    q = _low_high(qs.reshape(n, 1, 16), np.empty((n, 1, 2, 16), _U8)).reshape(n, 32)
    h = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the little-endian u32
    h <<= _U8(4)
    q |= h
    return q


def _k_q5_0(b, o):  # d, qh[4], qs[16]: x = d * (q - 16)
    q = _q5(b[:, 6:], b[:, 2:6])
    q -= _U8(16)
    np.multiply(_f16(b, 0), q.view(np.int8), out=o)


def _k_q5_1(b, o):  # d, m, qh[4], qs[16]: x = d * q + m
    q = _q5(b[:, 8:], b[:, 4:8])
    np.multiply(_f16(b, 0), q, out=o)
    o += _f16(b, 2)


def _k_q8_0(b, o):  # d, qs[32] int8: x = q * d
    np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), out=o)


def _k_q2_k(b, o):  # scales[16], qs[64], d, dmin: x = (d*sc) * q - (dmin*m)
    n = b.shape[0]
    sc = b[:, :16]
    dl = np.multiply(_f16(b, 80), sc & _U8(0x0F), dtype=np.float32).reshape(n, 16, 1)
    ml = np.multiply(_f16(b, 82), sc >> _U8(4), dtype=np.float32).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80], 2).reshape(n, 16, 16)
    o3 = o.reshape(n, 16, 16)
    np.multiply(dl, q, out=o3)
    o3 -= ml


def _k_q3_k(b, o):  # hmask[32], qs[64], scales[12], d: x = (d*(sc-32)) * (q - 4*!hbit)
    n = b.shape[0]
    sc = b[:, 96:108]
    lo = (sc[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=_U8).reshape(1, 2, 1)).reshape(n, 16) & _U8(0x0F)
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> _SH2.reshape(1, 4, 1)).reshape(n, 16) & _U8(0x03)
    s = lo | (hi << _U8(4))
    s -= _U8(32)
    dl = np.multiply(_f16(b, 108), s.view(np.int8), dtype=np.float32).reshape(n, 16, 1)
    q = _crumbs(b[:, 32:96], 2).reshape(n, 16, 16)
    h = (b[:, :32].reshape(n, 1, 1, 32) >> _SH1.reshape(1, 1, 8, 1)) & _U8(1)
    h ^= _U8(1)
    h <<= _U8(2)
    q -= h.reshape(n, 16, 16)  # wraps; reinterpreted as int8
    np.multiply(dl, q.view(np.int8), out=o.reshape(n, 16, 16))


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & _U8(0x3F), (md & _U8(0x0F)) | ((d >> _U8(2)) & _U8(0x30))], axis=1)
    mn = np.concatenate([m & _U8(0x3F), (md >> _U8(4)) | ((m >> _U8(2)) & _U8(0x30))], axis=1)
    return sc, mn


def _k_q4_k(b, o):  # d, dmin, scales[12], qs[128]: x = (d*sc) * q - (dmin*m)
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = np.multiply(_f16(b, 0), sc, dtype=np.float32).reshape(n, 8, 1)
    ml = np.multiply(_f16(b, 2), mn, dtype=np.float32).reshape(n, 8, 1)
    q = _low_high(b[:, 16:].reshape(n, 4, 32), np.empty((n, 4, 2, 32), _U8)).reshape(n, 8, 32)
    o3 = o.reshape(n, 8, 32)
    np.multiply(dl, q, out=o3)
    o3 -= ml


def _k_q5_k(b, o):  # d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = np.multiply(_f16(b, 0), sc, dtype=np.float32).reshape(n, 8, 1)
    ml = np.multiply(_f16(b, 2), mn, dtype=np.float32).reshape(n, 8, 1)
    q = _low_high(b[:, 48:].reshape(n, 4, 32), np.empty((n, 4, 2, 32), _U8)).reshape(n, 8, 32)
    h = (b[:, 16:48].reshape(n, 1, 32) >> _SH1.reshape(1, 8, 1)) & _U8(1)
    h <<= _U8(4)
    q |= h
    o3 = o.reshape(n, 8, 32)
    np.multiply(dl, q, out=o3)
    o3 -= ml


def _k_q6_k(b, o):  # ql[128], qh[64], scales[16] int8, d: x = (d*sc) * (q - 32)
    n = b.shape[0]
    dl = np.multiply(_f16(b, 208), b[:, 192:208].view(np.int8), dtype=np.float32).reshape(n, 16, 1)
    q = _low_high(b[:, :128].reshape(n, 2, 64), np.empty((n, 2, 2, 64), _U8)).reshape(n, 2, 4, 32)
    h = _crumbs(b[:, 128:192], 2)
    h <<= _U8(4)
    q |= h
    q -= _U8(32)
    np.multiply(dl, q.reshape(n, 16, 16).view(np.int8), out=o.reshape(n, 16, 16))


def _k_q8_k(b, o):  # d f32, qs[256] int8, bsums[16] i16: x = d * q
    np.multiply(b[:, :4].view(np.float32), b[:, 4:260].view(np.int8), out=o)


_DEQUANT = {
    0: _k_f32,
    1: _k_f16,
    30: _k_bf16,
    28: _k_f64,
    2: _k_q4_0,
    3: _k_q4_1,
    6: _k_q5_0,
    7: _k_q5_1,
    8: _k_q8_0,
    10: _k_q2_k,
    11: _k_q3_k,
    12: _k_q4_k,
    13: _k_q5_k,
    14: _k_q6_k,
    15: _k_q8_k,
}

_CHUNK_ELEMS = 1 << 16  # values per chunk: temporaries stay in cache


def supported_types() -> list[str]:
    """Names of the ggml types :func:`dequantize` handles."""
    return [GGML_TYPES[t][0] for t in sorted(_DEQUANT)]


def _type_id(ggml_type: int | str) -> int:
    if isinstance(ggml_type, str):
        by_name = {v[0]: k for k, v in GGML_TYPES.items()}
        if ggml_type.upper() not in by_name:
            raise CheckpointError(f"unknown ggml tensor type {ggml_type!r}")
        return by_name[ggml_type.upper()]
    return int(ggml_type)


def dequantize(raw, ggml_type: int | str, shape=None) -> torch.Tensor:
    """Dequantize raw GGUF tensor bytes to a float32 torch tensor.

    ``raw``: the bytes of whole blocks (uint8 numpy array, e.g. a memory-map slice; torch uint8
    tensor; bytes). ``ggml_type``: ggml type id or name (``"Q4_K"``). ``shape``: torch-order shape
    of the result (default: flat).
    """
    ggml_type = _type_id(ggml_type)
    if ggml_type not in _DEQUANT:
        name = GGML_TYPES.get(ggml_type, (f"unknown type {ggml_type}",))[0]
        raise CheckpointError(
            f"cannot dequantize ggml type {name} ({ggml_type}); supported: {', '.join(supported_types())}"
        )
    tname, bs, ts = GGML_TYPES[ggml_type]
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        arr = np.ascontiguousarray(arr).view(np.uint8)
    arr = arr.reshape(-1)
    if arr.size % ts:
        raise CheckpointError(f"{tname} data of {arr.size} bytes is not a whole number of {ts}-byte blocks")
    n_blocks = arr.size // ts
    blocks = arr.reshape(n_blocks, ts)
    out = torch.empty(n_blocks * bs, dtype=torch.float32)
    ov = out.numpy().reshape(n_blocks, bs)
    kernel = _DEQUANT[ggml_type]
    step = max(1, _CHUNK_ELEMS // bs)
    with np.errstate(all="ignore"):
        for s in range(0, n_blocks, step):
            kernel(blocks[s : s + step], ov[s : s + step])
    if shape is not None:
        shape = tuple(int(x) for x in shape)
        numel = 1
        for x in shape:
            numel *= x
        if numel != out.numel():
            raise CheckpointError(f"{tname} data holds {out.numel()} values, shape {shape} needs {numel}")
        out = out.reshape(shape)
    return out


# ----------------------------------------------------------------------------------------------
# Gemma 3: names, config, tokenizer
# ----------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_hf_name(name: str) -> str | None:
    """The transformers Gemma3ForCausalLM key of a gemma3 GGUF tensor (None: not a model weight)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _is_gemma_norm(gguf_name: str) -> bool:
    # llama.cpp's converter stores Gemma RMSNorm weights as (1 + w); transformers subtracts 1 from
    # every tensor whose name contains "norm.weight".
    return "norm.weight" in gguf_name


def _layer_types(f: GGUFFile, n_layers: int) -> list[str]:
    """Which layers attend globally. llama.cpp's gemma3 uses a period of 6 (every 6th layer global)."""
    pattern = f.metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per-layer flags, True = sliding window (llama.cpp's swa_layers)
        if len(pattern) != n_layers:
            raise CheckpointError(
                f"{f.path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
            )
        return ["sliding_attention" if bool(x) else "full_attention" for x in pattern]
    period = 6 if pattern is None else int(pattern)
    # llama.cpp set_swa_pattern(n): layer il is SWA iff n == 0 or il % n < n - 1
    return [
        "sliding_attention" if (period == 0 or i % period < period - 1) else "full_attention" for i in range(n_layers)
    ]


def _rope_parameters(f: GGUFFile) -> dict:
    md = f.metadata
    base = float(md.get("gemma3.rope.freq_base", 1_000_000.0))
    local_base = float(md.get("gemma3.rope.freq_base_swa", 10_000.0))
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    stype = md.get("gemma3.rope.scaling.type")
    factor = md.get("gemma3.rope.scaling.factor")
    if stype not in (None, "none") and factor not in (None, 0.0, 1.0):
        if stype == "linear":
            full = {"rope_type": "linear", "factor": float(factor), "rope_theta": base}
        elif stype == "yarn":
            full = {"rope_type": "yarn", "factor": float(factor), "rope_theta": base}
            orig = md.get("gemma3.rope.scaling.original_context_length")
            if orig is not None:
                full["original_max_position_embeddings"] = int(orig)
        else:
            raise CheckpointError(f"{f.path}: unsupported rope scaling type {stype!r}")
    return {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}


def gguf_to_hf_config(f: GGUFFile) -> dict:
    """A transformers ``Gemma3TextConfig`` config.json dict from a gemma3 GGUF's metadata."""
    arch = f.architecture
    if arch != "gemma3":
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported (expected 'gemma3')")
    md = f.metadata
    req = f.require
    hidden = int(req("gemma3.embedding_length"))
    n_layers = int(req("gemma3.block_count"))
    n_heads = int(req("gemma3.attention.head_count"))
    n_kv = md.get("gemma3.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        n_kv = max(n_kv)
    head_dim = int(md.get("gemma3.attention.key_length", hidden // n_heads))
    if "gemma3.vocab_size" in md:
        vocab = int(md["gemma3.vocab_size"])
    elif "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    else:
        vocab = f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else None
        if vocab is None:
            raise CheckpointError(f"{f.path}: cannot tell the vocabulary size (no tokens, no token_embd.weight)")
    scale = md.get("gemma3.attention.scale")
    if scale:
        qpas = float(1.0 / (float(scale) ** 2))
        qpas = int(round(qpas)) if abs(qpas - round(qpas)) < 1e-3 else qpas
    elif n_layers == 62:
        # llama.cpp hard-codes 1/sqrt(hidden/heads) for Gemma 3 27B (62 layers); HF's config has 168
        qpas = hidden // n_heads
    else:
        qpas = head_dim

    def soft(key):
        v = md.get(key)
        return float(v) if v else None

    ctx = int(md.get("gemma3.context_length", 131072))
    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(req("gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(md.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(md.get("gemma3.attention.sliding_window", 4096)),
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "layer_types": _layer_types(f, n_layers),
        "rope_parameters": _rope_parameters(f),
        "query_pre_attn_scalar": qpas,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id", 0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "final_logit_softcapping": soft("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": soft("gemma3.attn_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return cfg


def _hf_state_dict(f: GGUFFile, cfg: dict) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, info in f.tensors.items():
        key = gguf_to_hf_name(name)
        if key is None:
            continue  # e.g. rope_freqs, vision tower: not part of Gemma3ForCausalLM
        w = f.tensor(name)
        if _is_gemma_norm(name):
            w = w - 1.0
        sd[key] = w
    n_layers = cfg["num_hidden_layers"]
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    expected += [f"model.layers.{i}.{k}" for i in range(n_layers) for k in _BLOCK_NAMES.values()]
    if not cfg["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for key in expected:
        if key not in sd:
            gname = next((g for g in list(_GLOBAL_NAMES) if _GLOBAL_NAMES[g] == key), None)
            if gname is None:
                m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
                gname = f"blk.{m.group(1)}." + next(g for g, h in _BLOCK_NAMES.items() if h == m.group(2))
            raise CheckpointError(f"{f.path}: missing tensor {gname!r} (needed for {key})")
    # shapes
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    per_layer = {
        "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (cfg["intermediate_size"], h),
        "mlp.up_proj.weight": (cfg["intermediate_size"], h),
        "mlp.down_proj.weight": (h, cfg["intermediate_size"]),
    }
    for i in range(n_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    for key, s in shapes.items():
        if tuple(sd[key].shape) != s:
            raise CheckpointError(f"{f.path}: tensor for {key} has shape {tuple(sd[key].shape)}, config implies {s}")
    return sd


# -- tokenizer ---------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"


def _respell(token: str) -> str:
    # Gemma GGUFs store runs of 2+ spaces as real spaces; the HF tokenizer spells them with "▁".
    return _SPACE * len(token) if " " in token and not token.strip() else token


def _merges_from_vocab(tokens: list[str], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges implied by a Gemma vocabulary: every split of a token into two vocab pieces,
    ranked by the token's position in the file, then longer left piece first.

    This is the order transformers' GGUF converter gives (``generate_merges`` scored by -index).
    """
    merges: list[list[str]] = []
    append = merges.append
    seen = set()
    order = []  # unique spellings in first-appearance order; a repeated one ranks by its last index
    for t in tokens:
        if t not in seen:
            seen.add(t)
            order.append(t)
    order.sort(key=vocab.__getitem__)
    with _no_gc():  # ~half a million small lists: the cyclic GC would rescan them over and over
        for t in order:
            for i in range(len(t) - 1, 0, -1):
                left = t[:i]
                if left in vocab:
                    right = t[i:]
                    if right in vocab:
                        append([left, right])
    return merges


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _added(token_id: int, content: str, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict:
    def tok(name, type_id):
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def seq(name, type_id):
        return {"Sequence": {"id": name, "type_id": type_id}}

    single = ([tok(bos[0], 0)] if bos else []) + [seq("A", 0)] + ([tok(eos[0], 0)] if eos else [])
    pair = single + ([tok(bos[0], 1)] if bos else []) + [seq("B", 1)] + ([tok(eos[0], 1)] if eos else [])
    special = {}
    for t in (bos, eos):
        if t:
            special[t[0]] = {"id": t[0], "ids": [t[1]], "tokens": [t[0]]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def gguf_tokenizer_json(f: GGUFFile) -> dict:
    """The HF ``tokenizers`` JSON (as a dict) of a Gemma GGUF's vocabulary.

    Mirrors what transformers builds for a gemma/gemma2/gemma3 GGUF with a ``llama`` (sentencepiece)
    vocabulary: a byte-fallback BPE whose merges are recovered from the vocabulary order, a
    " " -> "▁" normalizer, a split on spaces, control tokens as special added tokens, user-defined
    tokens as plain added tokens, and BOS/EOS added per ``tokenizer.ggml.add_{bos,eos}_token``.
    """
    with _no_gc():
        return _tokenizer_json(f)


def _tokenizer_json(f: GGUFFile) -> dict:
    md = f.metadata
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise CheckpointError(f"{f.path}: missing metadata key 'tokenizer.ggml.model' (no tokenizer in this GGUF)")
    if model != "llama" or f.architecture not in ("gemma", "gemma2", "gemma3"):
        raise CheckpointError(
            f"{f.path}: tokenizer {model!r} for architecture {f.architecture!r} is not supported "
            "(expected a Gemma sentencepiece vocabulary, tokenizer.ggml.model = 'llama')"
        )
    raw_tokens = f.require("tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(raw_tokens)
    if len(types) != len(raw_tokens):
        raise CheckpointError(
            f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(raw_tokens)} tokens"
        )
    tokens = [_respell(t) for t in raw_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_vocab(tokens, vocab)

    def tok_of(key, default=None):
        i = md.get(key)
        if i is None or not (0 <= int(i) < len(raw_tokens)):
            return default
        return raw_tokens[int(i)]

    unk = tok_of("tokenizer.ggml.unknown_token_id", "<unk>")
    named = [tok_of(k) for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")]
    named.append("<mask>")  # GemmaTokenizer's default mask token

    added: dict[int, dict] = {}
    for i, (t, ty) in enumerate(zip(raw_tokens, types)):
        if ty == _CONTROL:
            added[i] = _added(i, t, True)
    for t, ty in zip(raw_tokens, types):
        if ty == _USER_DEFINED and t in vocab and vocab[t] not in added:
            added[vocab[t]] = _added(vocab[t], t, False)
    # bos/eos/unk/pad/mask that are not added tokens yet become special added tokens
    present = {a["content"] for a in added.values()}
    for t in named:
        if t is not None and t in vocab and t not in present:
            added[vocab[t]] = _added(vocab[t], t, True)
            present.add(t)

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    bos_id, eos_id = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
    bos = (raw_tokens[bos_id], int(bos_id)) if add_bos and bos_id is not None else None
    eos = (raw_tokens[eos_id], int(eos_id)) if add_eos and eos_id is not None else None

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added[k] for k in sorted(added)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": _template_processor(bos, eos),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


# -- entry points ------------------------------------------------------------------------------


def load_gguf_tokenizer(path: str | os.PathLike) -> dict:
    """The HF ``tokenizers`` JSON dict of a Gemma GGUF's vocabulary (no tensor is read)."""
    return gguf_tokenizer_json(read_gguf(path))


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(hf_config, state_dict, tokenizer_json)`` of a Gemma 3 GGUF file.

    ``hf_config``: a transformers ``Gemma3TextConfig`` config.json dict. ``state_dict``: float32
    tensors under ``Gemma3ForCausalLM`` names and shapes, equal to what transformers loads from
    the same file (``lm_head.weight`` only when the file has an untied ``output.weight``).
    ``tokenizer_json``: an HF ``tokenizers`` JSON dict (see :func:`gguf_tokenizer_json`).
    """
    f = read_gguf(path)
    cfg = gguf_to_hf_config(f)
    sd = _hf_state_dict(f, cfg)
    tok = gguf_tokenizer_json(f)
    return cfg, sd, tok
