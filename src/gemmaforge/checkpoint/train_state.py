"""Atomic training checkpoints: everything needed to resume a run bit-for-bit.

Layout (one directory per saved step)::

    run_dir/checkpoints/step-000123/
        model.safetensors   weights, HF names from model.state_dict(); tensors sharing storage
                            (the tied lm_head) are written once and re-tied on load
        optimizer.pt        optimizer.state_dict()            (torch.save)
        scheduler.pt        scheduler.state_dict()            (torch.save)
        rng.pt              python random, numpy, torch CPU, torch CUDA (every device) states
        data_state.pt       the data loader's position        (torch.save, round-trips exactly)
        extra.json          e.g. the config fingerprint (model config + training shape)
        meta.json           written LAST: step, format version, size and sha256 of every file

A checkpoint is written into a hidden temp dir next to its final place, every file and the dir
are fsync'ed, then the dir is renamed into place (``checkpoint.hf.atomic_dir``) and the parent
dir fsync'ed: a kill at any moment leaves either the complete new checkpoint or none, and the
previous checkpoints untouched. Pruning renames a checkpoint to a hidden name before deleting it,
so a kill mid-delete never leaves a half-deleted ``step-*`` dir either.

A checkpoint is *complete* only if ``meta.json`` parses, carries the completeness marker, and
every file it lists exists with the recorded size (and sha256, unless ``verify="size"``).
Leftover temp dirs (hidden names) are never candidates; the next save deletes them, so one writer
per run dir is assumed (rank 0). ``.pt`` files are read with
``torch.load(weights_only=True)``: state dicts of plain tensors, numbers, strings and containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .hf import atomic_dir

FORMAT = "gemmaforge-train-state"
VERSION = 1
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
# a killed save's temp dir / a killed prune's trash dir. (``.old-`` dirs, left only if a kill hits
# between the two renames of re-saving an existing step, hold a complete checkpoint: kept for a human.)
_STALE_RE = re.compile(r"^\.step-\d+\.(tmp-|del-)")
_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "data_state.pt", "extra.json")


# ----------------------------------------------------------------------------- small helpers

def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_normal(obj):
    """What a value looks like after a JSON round trip (tuples -> lists, dtypes -> str, ...)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper: keep the plain names


# ----------------------------------------------------------------------------- model weights

def _model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, aliases name -> written name) with storage-sharing tensors written once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in _unwrap(model).state_dict().items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.to("cpu").contiguous()
    return tensors, aliases


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- save

def save_train_state(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, optimizer=None,
                     scheduler=None, data_state: dict | None = None, extra: dict | None = None,
                     keep_last: int | None = 3) -> Path:
    """Atomically write ``run_dir/checkpoints/step-{step:06d}/``; keep the newest ``keep_last``
    complete checkpoints (``None``: keep all). Returns the checkpoint dir.

    ``extra`` is stored as JSON (values JSON cannot hold are written as ``str(value)``);
    ``data_state`` with ``torch.save`` (tensors, numbers, strings, tuples, dicts round-trip).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer; got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint); got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    extra_json = json.dumps(extra or {}, indent=2, sort_keys=True, default=str) + "\n"
    tensors, aliases = _model_state(model)
    dst = root / step_dir_name(step)
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict() if optimizer is not None else None, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict() if scheduler is not None else None, tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        torch.save(data_state if data_state is not None else {}, tmp / "data_state.pt")
        (tmp / "extra.json").write_text(extra_json)
        files = {}
        for name in _FILES:
            _fsync_file(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        meta = {"format": FORMAT, "version": VERSION, "step": step, "time": time.time(), "aliases": aliases,
                "files": files, "complete": True}  # the completeness marker: meta.json is written last
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_file(tmp / "meta.json")
        _fsync_dir(tmp)
    _fsync_dir(root)
    if keep_last is not None:
        _prune(root, keep_last, keep=dst)
    return dst


def _remove_stale(root: Path) -> None:
    """Temp dirs left by a killed save / prune (a single writer per run dir is assumed)."""
    for p in root.iterdir():
        if p.is_dir() and _STALE_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    complete = [d for _, d in _step_dirs(root) if _problem(d, verify="size") is None]
    for d in complete[keep_last:]:
        if d == keep:
            continue
        trash = d.with_name(f".{d.name}.del-{os.getpid()}")
        os.replace(d, trash)  # atomic: the step-* name vanishes whole, then the bytes go
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(root)


# ----------------------------------------------------------------------------- validity

def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``step-N`` dirs under ``root``, newest first."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(out, key=lambda sp: sp[0], reverse=True)


def _read_meta(ckpt: Path) -> dict:
    path = ckpt / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint incomplete)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("complete") is not True \
            or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: not a complete gemmaforge training checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} (this gemmaforge reads {VERSION})")
    return meta


def _check_files(ckpt: Path, meta: dict, verify: str) -> None:
    for name in _FILES:
        rec = meta["files"].get(name)
        f = ckpt / name
        if rec is None:
            raise CheckpointError(f"{ckpt / 'meta.json'}: does not record {name}")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != rec.get("size"):
            raise CheckpointError(f"{f}: {size} bytes, meta.json records {rec.get('size')} (truncated or altered)")
        if verify == "hash" and _sha256(f) != rec.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from meta.json (corrupt)")


def _problem(ckpt: Path, verify: str = "hash") -> str | None:
    try:
        _check_files(ckpt, _read_meta(ckpt), verify)
    except CheckpointError as e:
        return str(e)
    return None


def _root(run_dir: str | os.PathLike) -> Path:
    """``run_dir/checkpoints``; a path that already is a checkpoints dir is taken as is."""
    p = Path(run_dir)
    if not (p / CHECKPOINTS).is_dir() and p.name == CHECKPOINTS:
        return p
    return p / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike, verify: str = "size") -> list[Path]:
    """Complete checkpoints of a run, newest first (``verify``: ``"size"`` or ``"hash"``)."""
    return [d for _, d in _step_dirs(_root(run_dir)) if _problem(d, verify) is None]


def latest_checkpoint(run_dir: str | os.PathLike, verify: str = "hash") -> Path | None:
    """The newest COMPLETE checkpoint of ``run_dir`` (or ``None``).

    Partial, truncated or altered checkpoints, dirs without the meta.json marker and leftover
    temp dirs are skipped. ``verify="hash"`` re-hashes the files of each candidate (newest first,
    so normally just one); ``"size"`` only compares sizes.
    """
    if verify not in ("hash", "size"):
        raise ValueError(f"verify must be 'hash' or 'size'; got {verify!r}")
    for _, d in _step_dirs(_root(run_dir)):
        if _problem(d, verify) is None:
            return d
    return None


# ----------------------------------------------------------------------------- load

def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt pickle/zip, or an object weights_only refuses
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)})") from None


def _first_difference(ckpt, want, path: str = "") -> str | None:
    """Dotted path and values of the first difference between two JSON-normal values."""
    if isinstance(want, dict) and isinstance(ckpt, dict):
        for k in list(want) + [k for k in ckpt if k not in want]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in ckpt:
                return f"{sub} (missing in the checkpoint, expected {json.dumps(want[k])})"
            if k not in want:
                return f"{sub} (checkpoint has {json.dumps(ckpt[k])}, not expected)"
            d = _first_difference(ckpt[k], want[k], sub)
            if d:
                return d
        return None
    if isinstance(want, list) and isinstance(ckpt, list) and len(want) == len(ckpt):
        for i, (c, w) in enumerate(zip(ckpt, want)):
            d = _first_difference(c, w, f"{path}[{i}]")
            if d:
                return d
        return None
    if ckpt != want or type(ckpt) is not type(want):
        return f"{path or '<extra>'} (checkpoint {json.dumps(ckpt)}, expected {json.dumps(want)})"
    return None


def check_extra(ckpt_dir: str | os.PathLike, extra: dict, expect_extra: dict) -> None:
    """Raise CheckpointError naming the first key of ``expect_extra`` whose value differs.

    Only the top-level keys of ``expect_extra`` are compared (the checkpoint's ``extra`` may hold
    more, e.g. bookkeeping); below them, values must be equal in full.
    """
    want = _json_normal(expect_extra)
    got = {k: extra[k] for k in want if k in extra}
    d = _first_difference(got, want)
    if d:
        raise CheckpointError(f"{ckpt_dir}: incompatible checkpoint: {d}")


def load_train_state(ckpt_dir: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                     expect_extra: dict | None = None) -> tuple[int, dict, dict]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint dir; returns
    ``(step, data_state, extra)``.

    Every file is verified (size and sha256) and read, and ``expect_extra`` compared, BEFORE any
    state is touched: a bad or incompatible checkpoint raises CheckpointError (one line naming the
    file, or the dir and the first differing key) and leaves model/optimizer/RNG as they were.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint dir does not exist")
    meta = _read_meta(ckpt)
    _check_files(ckpt, meta, "hash")
    try:
        extra = json.loads((ckpt / "extra.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'extra.json'}: unreadable ({_first_line(e)})") from None
    if expect_extra is not None:
        check_extra(ckpt, extra, expect_extra)

    wfile = ckpt / "model.safetensors"
    try:
        with safe_open(str(wfile), framework="pt") as st:
            sd = {k: st.get_tensor(k) for k in st.keys()}
    except Exception as e:
        raise CheckpointError(f"{wfile}: not a readable safetensors file ({_first_line(e)})") from None
    for name, target in meta.get("aliases", {}).items():
        if target not in sd:
            raise CheckpointError(f"{ckpt / 'meta.json'}: alias {name} -> {target}, "
                                  f"but {target} is not in {wfile.name}")
        sd[name] = sd[target]
    opt_sd = _torch_load(ckpt / "optimizer.pt")
    sched_sd = _torch_load(ckpt / "scheduler.pt")
    rng = _torch_load(ckpt / "rng.pt")
    data_state = _torch_load(ckpt / "data_state.pt")
    if optimizer is not None and opt_sd is None:
        raise CheckpointError(f"{ckpt / 'optimizer.pt'}: the checkpoint holds no optimizer state")
    if scheduler is not None and sched_sd is None:
        raise CheckpointError(f"{ckpt / 'scheduler.pt'}: the checkpoint holds no scheduler state")

    target = _unwrap(model)
    expected = target.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    shaped = sorted(f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
                    for k in expected.keys() & sd.keys() if sd[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:6])}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    if shaped:
        problems.append(f"mis-shaped: {', '.join(shaped[:6])}")
    if problems:
        raise CheckpointError(f"{wfile}: does not fit the model: " + "; ".join(problems))

    with torch.no_grad():
        target.load_state_dict(sd, strict=True)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / 'optimizer.pt'}: does not fit the optimizer ({_first_line(e)})") from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_sd)
    _set_rng_state(rng)
    return int(meta["step"]), data_state, extra
