"""Process-group plumbing for multi-process runs: init, launch, rank-0 logging, reductions, data sharding.

Everything here is a no-op (or the obvious single-process value) when ``torch.distributed`` is not
initialised, so the trainer can call these helpers unconditionally.

    # under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment)
    from gemmaforge.parallel.process import init_distributed
    rank, world = init_distributed()            # gloo on CPU, nccl on CUDA

    # from Python (tests, notebooks): spawn N processes on this machine with a free port
    from gemmaforge.parallel.process import launch
    results = launch(worker_fn, 2, arg1, arg2)  # worker_fn(rank, world, arg1, arg2) -> picklable

The parallel layout itself (meshes, TP/FSDP/CP/PP/EP) lives in the rest of ``gemmaforge.parallel``.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- queries

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def rank0_log(log: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """A logger that prints on global rank 0 only (``log`` defaults to stderr)."""
    base = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    return base if is_rank0() else (lambda msg: None)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- init

def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(backend: str | None = None, device_type: str | None = None,
                     timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default process group from the torchrun environment; ``(rank, world_size)``.

    Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is initialised and
    ``(0, 1)`` is returned. On CUDA the process binds to ``cuda:LOCAL_RANK``.
    """
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend or default_backend(device_type), timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_entry(rank: int, world: int, port: int, threads: int, fn, args, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    path = os.path.join(outdir, f"rank{rank}.pickle")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        out = fn(rank, world, *args)
        # a file, not a pipe: a large result would block the child while the parent waits in join
        with open(path + ".tmp", "wb") as f:
            pickle.dump(("ok", out), f)
        os.replace(path + ".tmp", path)
        dist.barrier()  # every rank done before any tears gloo down
    except BaseException as e:  # report, then let the other ranks' collectives time out / fail
        with open(path, "wb") as f:
            pickle.dump(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"), f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the result is on disk: leave now, without interpreter teardown (gloo's threads, torn down at exit,
    # sometimes abort a process that has finished its work)
    os._exit(0)


def launch(fn: Callable, nprocs: int, *args, threads: int = 1) -> list:
    """Run ``fn(rank, nprocs, *args)`` in ``nprocs`` spawned CPU processes (gloo); return the results by rank.

    ``fn`` must be importable by the children (a module-level function). A failure in any rank
    raises ``RuntimeError`` carrying that rank's traceback.
    """
    import tempfile

    import torch.multiprocessing as mp

    port = free_port()
    err = None
    with tempfile.TemporaryDirectory(prefix="gf-launch-") as outdir:
        try:
            mp.start_processes(_launch_entry, args=(nprocs, port, threads, fn, args, outdir), nprocs=nprocs,
                               join=True, start_method="spawn")
        except Exception as e:  # ProcessRaisedException / ProcessExitedException
            err = e
        results: dict[int, object] = {}
        errors = []
        for rank in range(nprocs):
            path = os.path.join(outdir, f"rank{rank}.pickle")
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:  # written by our own child process above
                status, out = pickle.load(f)
            if status == "ok":
                results[rank] = out
            else:
                errors.append(f"rank {rank}: {out}")
    if errors or err is not None or len(results) != nprocs:
        raise RuntimeError("distributed run failed:\n" + ("\n".join(errors) or str(err)))
    return [results[r] for r in range(nprocs)]


# ----------------------------------------------------------------------------- reductions

def all_reduce_sum(value, group=None):
    """Sum a Python number (or tensor) over ``group``; the value itself when not distributed."""
    if not is_distributed() or get_world_size(group) == 1:
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        dist.all_reduce(t, group=group)
        return t
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    out = t.item()
    return int(round(out)) if isinstance(value, int) else out


# ----------------------------------------------------------------------------- data

def shard_items(items: Sequence, rank: int, world: int) -> list:
    """The items a data-parallel rank consumes: ``items[rank::world]`` (every rank the same count)."""
    n = (len(items) // world) * world
    return list(items[rank:n:world])
