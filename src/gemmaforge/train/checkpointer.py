"""Training checkpoints: one format for every layout, atomic, verified, resumable at any other layout.

Layout (one directory per saved step)::

    run_dir/checkpoints/step-000123/
        __0_0.distcp ...    model and optimizer state, one file per rank (torch.distributed.checkpoint,
        .metadata           keyed by parameter name; a tied LM head is written once, as the embedding)
        scheduler.json      the learning-rate scheduler's state
        rng-rank0.pt ...    python random, numpy, torch CPU and CUDA generator states of each rank
        data_state.pt       the data loader's position        (torch.save, round-trips exactly)
        extra.json          the run's fingerprint (model config, training shape) and bookkeeping
        meta.json           written LAST: step, format version, size and sha256 of every file

Every rank writes its own shards (a single process: all of it) into a hidden temp dir next to the
final place; after a barrier, rank 0 fsyncs every file, hashes them into ``meta.json`` and renames the
dir into place, so a kill at any moment leaves either the complete new checkpoint or none, and the
previous checkpoints untouched. Pruning renames a checkpoint to a hidden name before deleting it.

DCP reshards on load: a checkpoint written by FSDP2 x 2 loads into one plain process, into TP x 2,
into a pipeline stage... (parameter names never change under the parallel transforms). With
``trainable_only`` (what the Trainer writes) frozen parameters are left out: a LoRA checkpoint holds
the adapter, its AdamW moments and the run state, never the frozen base (reloaded from the model
source; the Trainer's fingerprint ties the checkpoint to that base).

A checkpoint is *complete* only if ``meta.json`` parses, carries the completeness marker, and every
file it lists exists with the recorded size (and sha256, unless ``verify="size"``); the newest
complete one is found numerically (``step-1000000`` after ``step-999999``). Leftover temp dirs
(hidden names) are never candidates; the next save deletes them. ``.pt`` files are read with
``torch.load(weights_only=True)``. Before anything is loaded, every file is verified, the
fingerprint compared and the model's parameter names and shapes checked against the checkpoint's:
a bad or incompatible checkpoint raises one ``CheckpointError`` line and changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..formats.hf import default_permissions, make_temp_dir
from ..parallel.dims import pipeline_stage

FORMAT = "gemmaforge-checkpoint"
VERSION = 3  # 3: model and optimizer as torch.distributed.checkpoint shards, at any layout
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
# a killed save's temp dir / a killed prune's trash dir. (``.old-`` dirs, left only if a kill hits
# between the two renames of re-saving an existing step, hold a complete checkpoint: kept for a human.)
_STALE_RE = re.compile(r"^\.step-\d+\.(tmp-|del-)")


# ----------------------------------------------------------------------------- small helpers

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _from_rank0(value):
    """``value`` as rank 0 has it, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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



# ----------------------------------------------------------------------------- model and optimizer state

def _options(strict: bool = True, trainable_only: bool = False):
    """Optimizer state flattened to ``state.<fqn>.<key>`` / ``param_groups.<fqn>.<key>``: every rank
    saves and loads the group settings of its own parameters (unflattened, ``param_groups`` is one
    object that DCP keeps from a single rank, wrong wherever ranks hold different parameters).
    ``trainable_only``: frozen parameters (a LoRA run's base model) are left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, strict=strict, ignore_frozen_params=trainable_only)


def _tied_head(model) -> bool:
    head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return head is not None and emb is not None and head.weight is emb.weight


def _dcp_state(model, optimizer, trainable_only: bool = False) -> dict:
    """``{"model": ..., "optim": ...}`` keyed by parameter name; a tied head only as the embedding;
    ``trainable_only``: without the frozen parameters."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        msd, state = get_model_state_dict(model, options=_options(trainable_only=trainable_only)), {}
    else:
        msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only=trainable_only))
        state = {"optim": osd}
    if _tied_head(model):
        msd.pop("lm_head.weight", None)
    state["model"] = msd
    return state


def _model_shapes(model, trainable_only: bool = False) -> dict[str, tuple]:
    """Parameter and persistent-buffer names of ``model`` with their global shapes, as saved."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(trainable_only=trainable_only))
    if _tied_head(model):
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in sd.items()}


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
                     keep_last: int | None = 3, trainable_only: bool = False) -> Path:
    """Atomically write ``run_dir/checkpoints/step-{step:06d}/`` (collective: every rank calls it);
    keep the newest ``keep_last`` complete checkpoints (``None``: keep all). Returns the checkpoint dir.

    ``trainable_only``: the frozen parameters (a LoRA run's base model) are not written: the model they
    load into must hold them already (``load_train_state(..., trainable_only=True)``); meta.json says so.

    ``extra`` is stored as JSON (values JSON cannot hold are written as ``str(value)``);
    ``data_state`` with ``torch.save`` (tensors, numbers, strings, tuples, dicts round-trip).
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer; got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint); got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    dst = root / step_dir_name(step)
    tmp = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp = make_temp_dir(f".{dst.name}.tmp-", root)
    tmp = Path(_from_rank0(tmp))
    with _single_process_quiet():
        dcp.save(_dcp_state(model, optimizer, trainable_only), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                 no_dist=not _distributed())
    torch.save(_rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _fsync_file(tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict() if scheduler is not None else None,
                                                       default=str) + "\n")
        torch.save(data_state if data_state is not None else {}, tmp / "data_state.pt")
        (tmp / "extra.json").write_text(json.dumps(extra or {}, indent=2, sort_keys=True, default=str) + "\n")
        default_permissions(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        meta = {"format": FORMAT, "version": VERSION, "step": step, "time": time.time(),
                "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
                "has_optimizer": optimizer is not None, "trainable_only": trainable_only, "files": files,
                "complete": True}  # the completeness marker: meta.json is written last
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_file(tmp / "meta.json")
        _fsync_dir(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(root)
        if keep_last is not None:
            _prune(root, keep_last, keep=dst)
    _barrier()
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



def remove_checkpoints(run_dir: str | os.PathLike) -> int:
    """Delete every checkpoint of ``run_dir`` (collective: rank 0 deletes, every rank waits); each
    ``step-N`` name vanishes whole (renamed, then deleted), and ``checkpoints/`` goes if left empty.
    Returns how many were removed."""
    root = Path(run_dir) / CHECKPOINTS
    n = 0
    if _rank() == 0 and root.is_dir():
        _remove_stale(root)
        for _, d in _step_dirs(root):
            trash = d.with_name(f".{d.name}.del-{os.getpid()}")
            os.replace(d, trash)
            shutil.rmtree(trash, ignore_errors=True)
            n += 1
        _fsync_dir(root)
        with contextlib.suppress(OSError):
            root.rmdir()
    _barrier()
    return n


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


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The step a complete checkpoint was saved at (its ``meta.json``, not its directory name)."""
    step = _read_meta(Path(ckpt)).get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{Path(ckpt) / 'meta.json'}: no valid step ({step!r})")
    return step


_REQUIRED = (".metadata", "scheduler.json", "data_state.pt", "extra.json")  # besides the shards


def _check_files(ckpt: Path, meta: dict, verify: str) -> None:
    names = list(meta["files"])
    for name in _REQUIRED:
        if name not in meta["files"]:
            raise CheckpointError(f"{ckpt / 'meta.json'}: does not record {name}")
    for name in names:
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

    Only the top-level keys of ``expect_extra`` are compared, in its order (the caller lists settings
    before what derives from them, so a changed ``--seq-len`` is named rather than the data digest it
    changes; the checkpoint's ``extra`` may hold more, e.g. bookkeeping); below them, values must be
    equal in full.
    """
    want = {k: _json_normal(v) for k, v in expect_extra.items()}
    got = {k: extra[k] for k in want if k in extra}
    d = _first_difference(got, want)
    if d:
        raise CheckpointError(f"{ckpt_dir}: incompatible checkpoint: {d}")




def _first_problem(ckpt: Path, verify: str) -> str | None:
    """Rank 0 verifies, every rank gets the verdict (the files are the same for all)."""
    return _from_rank0(_problem(ckpt, verify) if _rank() == 0 else None)


def _check_fits(ckpt: Path, model, trainable_only: bool = False) -> None:
    """The model's parameter names and shapes equal the checkpoint's (one line naming the differences);
    a pipeline stage holds a part of the model: the checkpoint's other tensors are not its own."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged .metadata passes no further
        raise CheckpointError(f"{ckpt / '.metadata'}: unreadable ({_first_line(e)})") from None
    saved = {k[len("model."):]: tuple(v.size) for k, v in md.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    expected = _model_shapes(model, trainable_only)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = [] if pipeline_stage(model) is not None else sorted(saved.keys() - expected.keys())
    shaped = sorted(f"{k} (checkpoint {saved[k]}, model {expected[k]})"
                    for k in expected.keys() & saved.keys() if saved[k] != expected[k])
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
        raise CheckpointError(f"{ckpt}: does not fit the model: " + "; ".join(problems))


def _read_json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def load_train_state(ckpt_dir: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                     expect_extra: dict | None = None, trainable_only: bool = False) -> tuple[int, dict, dict]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint dir at the current layout
    (collective: every rank calls it); returns ``(step, data_state, extra)``.

    Every file is verified (size and sha256), ``expect_extra`` compared and the model's tensors
    checked against the checkpoint's BEFORE any state is touched: a bad or incompatible checkpoint
    raises CheckpointError (one line naming the file, or the dir and the first difference) and
    leaves model/optimizer/RNG as they were. ``trainable_only``: the frozen parameters are not read
    (the model holds them already: its base weights); a checkpoint saved without them needs it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint dir does not exist")
    problem = _first_problem(ckpt, "hash")
    if problem is not None:
        raise CheckpointError(problem)
    meta = _read_meta(ckpt)
    extra = _read_json_file(ckpt / "extra.json")
    if expect_extra is not None:
        check_extra(ckpt, extra, expect_extra)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{ckpt}: saved without optimizer state")
    if meta.get("trainable_only") and not trainable_only:
        raise CheckpointError(f"{ckpt}: holds the trainable parameters only (frozen ones come from the base "
                              f"model): load it with trainable_only=True")
    _check_fits(ckpt, model, trainable_only)
    sched_sd = _read_json_file(ckpt / "scheduler.json")
    if scheduler is not None and sched_sd is None:
        raise CheckpointError(f"{ckpt / 'scheduler.json'}: the checkpoint holds no scheduler state")
    data_state = _torch_load(ckpt / "data_state.pt")
    rng_file = ckpt / f"rng-rank{_rank()}.pt"
    rng = _torch_load(rng_file) if rng_file.exists() else None

    state = _dcp_state(model, optimizer, trainable_only)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=not _distributed())
    except Exception as e:  # noqa: BLE001 - DCP's planner errors: one line
        raise CheckpointError(f"{ckpt}: cannot load ({_first_line(e)[:300]})") from None
    # strict=False: a tied head is saved once, as the embedding (loading that fills both)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_options(False, trainable_only))
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options(False, trainable_only))
    if scheduler is not None:
        scheduler.load_state_dict(sched_sd)
    if rng is not None:
        _set_rng_state(rng)
    return int(meta["step"]), data_state, extra
