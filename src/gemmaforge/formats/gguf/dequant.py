"""Dequantization of ggml tensor types to float32 (bit-identical to ggml's reference kernels)."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import CheckpointError

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


def is_supported(ggml_type: int) -> bool:
    return ggml_type in _DEQUANT


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
