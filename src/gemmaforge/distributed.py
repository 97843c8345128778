"""Process-group plumbing for multi-process runs: init, launch, rank-0 logging, reductions, data sharding.

Everything here is a no-op (or the obvious single-process value) when ``torch.distributed`` is not
initialised, so the trainer can call these helpers unconditionally.

    # under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment)
    from gemmaforge.distributed import init_distributed
    rank, world = init_distributed()            # gloo on CPU, nccl on CUDA

    # from Python (tests, notebooks): spawn N processes on this machine with a free port
    from gemmaforge.distributed import launch
    results = launch(worker_fn, 2, arg1, arg2)  # worker_fn(rank, world, arg1, arg2) -> picklable

The parallel layout itself (meshes, TP/FSDP/CP/PP) lives in ``gemmaforge.transforms.parallel``.
"""

from __future__ import annotations

import math
import os
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


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_entry(rank: int, world: int, port: int, threads: int, fn, args, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        out = fn(rank, world, *args)
        # a file, not a pipe: a large result would block the child while the parent waits in join
        torch.save(("ok", out), path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException as e:  # report, then let the other ranks' collectives time out / fail
        torch.save(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"), path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                continue
            status, out = torch.load(path, weights_only=False)
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


def all_reduce_max(value: float, group=None) -> float:
    if not is_distributed() or get_world_size(group) == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def all_true(flag: bool, group=None) -> bool:
    """Logical AND over ranks (e.g. 'every rank's gradients are finite')."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(t, group=group)
    return t.item() == 0.0


# ----------------------------------------------------------------------------- data

def shard_items(items: Sequence, rank: int, world: int) -> list:
    """The items a data-parallel rank consumes: ``items[rank::world]`` (every rank the same count)."""
    n = (len(items) // world) * world
    return list(items[rank:n:world])


# ----------------------------------------------------------------------------- the trainer, distributed

def make_distributed_trainer(cfg, dims=None, pcfg=None, **kw):
    """A ``DistributedTrainer`` (imported lazily: train.py imports nothing from here)."""
    return _trainer_class()(cfg, dims=dims, pcfg=pcfg, **kw)


def _trainer_class():
    from .train import Trainer

    class DistributedTrainer(Trainer):
        """``Trainer`` under torchrun with a parallel layout (FSDP2 / TP / CP / PP / EP and their products).

        Same loop and numerics as one process: every rank draws the SAME global rows for a step
        from the shared ``RowStream`` (so the data position is layout-independent and resumable at
        any layout) and keeps its data-parallel share; the loss is the sum over this rank's valid
        tokens divided by the step's GLOBAL valid-token count (one all-reduce), FSDP sums the
        gradients, clipping and the finite check are global. Rank 0 alone logs, writes metrics,
        plots and the final HF export; checkpoints are DCP directories (``checkpoint/dcp.py``)
        written by every rank.

        Pipeline parallelism (``pp > 1``): each rank builds only its stage (``Pipeline``), every
        packed row of its data-parallel share is one pipeline micro-batch, the schedule
        (``ParallelConfig.pp_schedule``: GPipe or 1F1B) runs forward and backward, the last stage
        applies the chunked loss and shares the step's loss with the pipeline (so rank 0, the first
        stage, logs the real loss). Evaluation runs the stages forward only.

        Expert parallelism (``ep > 1``, MoE models): the experts of each MoE layer are split over
        ``ep`` contiguous dp_shard ranks (all-to-all token exchange); FSDP2 shards every other
        parameter over all of dp_shard x cp, while the experts stay replicated over the
        dp_shard/ep x cp ranks outside their EP group and their gradients are summed there after
        the backward (``sync_expert_grads``). Every rank runs the same number of forwards (equal
        data shares), as the all-to-alls require.
        """

        def __init__(self, cfg, *, dims=None, pcfg=None, model=None, **kw):
            from .errors import ConfigError
            from .transforms.parallel import ParallelConfig, ParallelDims

            init_distributed()
            self.dims_req = dims or ParallelDims()
            self.pcfg = pcfg or ParallelConfig(activation_checkpointing=bool(cfg.activation_checkpointing))
            self.pipe = None
            if cfg.lora_rank:
                raise ConfigError("--lora-rank cannot be combined with a parallel layout yet")
            cfg.validate()
            self._check_layout(cfg)  # before any data or model is loaded: a wrong layout fails at start
            self._resume_path, cfg.resume = cfg.resume, None  # resumed after the optimizer is rebuilt
            if not is_rank0():
                cfg.progress = False
            kw["log"] = rank0_log(kw.get("log"))
            super().__init__(cfg, model=model, **kw)
            # plain (non-fused) AdamW: works on DTensor shards of any layout
            from .train import param_groups

            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, cfg.weight_decay, cfg.decay_norms_and_embeddings), lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
            from .train import lr_lambda

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
            if self._resume_path:
                cfg.resume = self._resume_path
                self._resume(self._resume_path)

        def _check_layout(self, cfg):
            """World size, divisibility and pipeline constraints: one-line LayoutError on every rank."""
            from .transforms.parallel import LayoutError, pipeline_schedule_name

            d = self.dims_req.validate(get_world_size(), seq_len=cfg.seq_len)
            rows = cfg.accum * cfg.rows_per_micro_batch
            if rows % d.dp_shard:
                raise LayoutError(f"parallel layout: {rows} rows per step (--batch-tokens {cfg.batch_tokens} / "
                                  f"--seq-len {cfg.seq_len}) is not divisible by dp_shard={d.dp_shard}")
            if d.pp > 1:
                sched = pipeline_schedule_name(self.pcfg.pp_schedule)
                n_mb = rows // d.dp_shard
                if sched == "1F1B" and n_mb < d.pp:
                    raise LayoutError(
                        f"parallel layout: the 1F1B schedule needs at least pp={d.pp} micro-batches per step, but "
                        f"each pipeline gets {n_mb} row(s) (--batch-tokens {cfg.batch_tokens} / --seq-len "
                        f"{cfg.seq_len} / dp_shard {d.dp_shard}); raise --batch-tokens or use --pp-schedule gpipe")
            return d

        # ---- setup ----
        def _prepare_out(self):
            from pathlib import Path

            from .errors import ConfigError

            res = [None]
            if is_rank0():  # one writer probes and creates the run dir; everyone learns its name (or the error)
                try:
                    res = [("ok", str(super()._prepare_out()))]
                except ConfigError as e:
                    res = [("error", str(e))]
            if is_distributed():
                dist.broadcast_object_list(res, src=0)
            status, value = res[0]
            if status == "error":
                raise ConfigError(value)
            return Path(value)

        def _load_model(self, model):
            from .transforms.parallel import (ContextParallel, Pipeline, build_meta_model, materialize, parallel_state,
                                              parallelize)

            if model is None and is_rank0():
                from .api import from_pretrained

                model = from_pretrained(self.cfg.model, dtype=torch.float32, device="cpu")
            cfgs = [model.config if is_rank0() else None]
            if is_distributed():
                dist.broadcast_object_list(cfgs, src=0)
            self.dims = self.dims_req.validate(get_world_size(), cfgs[0], self.cfg.seq_len)
            mesh = self.dims.build_mesh(self.device.type)
            full = {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_rank0() else {}
            meta = build_meta_model(cfgs[0])
            if self.dims.pp > 1:  # cut the meta model down to this rank's stage first
                n_mb = self.cfg.accum * self.cfg.rows_per_micro_batch // self.dims.dp_shard
                self.pipe = Pipeline(meta, mesh, self.pcfg.pp_schedule, n_microbatches=n_mb,
                                     chunk_size=self.cfg.loss_chunk_size)
                meta = self.pipe.module
            parallelize(meta, mesh, self.pcfg)
            materialize(meta, self.device, state_dict=full, broadcast=True)
            del model, full
            meta.train()
            meta.attn_backend = self.cfg.attn_backend
            self.pstate = parallel_state(meta)
            self.cp = ContextParallel(mesh["cp"]) if self.dims.cp > 1 else None
            self.log(f"parallel: {self.dims.describe()} on {get_world_size()} processes "
                     f"({', '.join(self.pstate.applied) or 'nothing to apply'})")
            if self.pipe is not None:
                self.log(f"parallel: {self.pipe.describe()} (rank 0's stage)")
            return meta

        def _apply_transforms(self):  # done by parallelize (TP -> AC -> compile -> FSDP)
            pass

        # ---- the step ----
        def _micro_batches(self):
            from .data import collate_rows

            cfg = self.cfg
            rows = [self.stream.next() for _ in range(cfg.accum * cfg.rows_per_micro_batch)]  # the global step
            mine = shard_items(rows, self.pstate.dp_rank, self.dims.dp_shard)
            m = cfg.rows_per_micro_batch
            return [collate_rows(mine[i:i + m]) for i in range(0, len(mine), m)]

        def _loss_sum(self, batch):
            if self.cp is None:
                return super()._loss_sum(batch)
            b = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return self.cp.loss_sum(self.model, b, chunk_size=self.cfg.loss_chunk_size)

        def _forward_backward(self):
            """Data/tensor/context parallel: this rank's micro-batches. Returns (loss, valid tokens, tokens)."""
            st = self.pstate
            batches = self._micro_batches()
            n_valid = all_reduce_sum(sum(int(b["num_valid_labels"]) for b in batches), st.dp_group)
            n_tokens = all_reduce_sum(sum(int(b["input_ids"].numel()) for b in batches), st.dp_group)
            total = 0.0
            for b in batches:
                loss = self._loss_sum(b) / max(n_valid, 1)
                loss.backward()
                total += float(loss.detach())
            from .transforms.parallel import sync_expert_grads

            sync_expert_grads(self.model)  # expert parallelism: sum expert grads over their replicas
            return all_reduce_sum(total, st.loss_group), n_valid, n_tokens

        def _pipeline_forward_backward(self):
            """Pipeline parallel: this pipeline's rows, one micro-batch each, through the schedule."""
            from .transforms.parallel import pipeline_batch

            cfg, st = self.cfg, self.pstate
            rows = [self.stream.next() for _ in range(cfg.accum * cfg.rows_per_micro_batch)]  # the global step
            ids, doc, labels, mine_valid = pipeline_batch(shard_items(rows, st.dp_rank, self.dims.dp_shard))
            n_valid = all_reduce_sum(mine_valid, st.dp_group)
            n_tokens = all_reduce_sum(int(ids.numel()), st.dp_group)
            dev = self.device
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.pipe.step(ids.to(dev), doc.to(dev), labels.to(dev), n_valid)
            self.pipe.sync_tied_grads()
            return all_reduce_sum(loss, st.dp_group), n_valid, n_tokens

        def train_step(self) -> dict:
            import time as _time

            from .transforms.parallel import clip_grad_norm_, grads_finite

            t0 = _time.perf_counter()
            if self.pipe is None:
                total, n_valid, n_tokens = self._forward_backward()
            else:
                total, n_valid, n_tokens = self._pipeline_forward_backward()
            ok = math.isfinite(total) and grads_finite(self.params)
            row = {"step": self.step + 1, "loss": total, "lr": self.scheduler.get_last_lr()[0], "tokens": n_tokens,
                   "valid_tokens": n_valid}
            if ok:
                if self.cfg.clip > 0:
                    owner = self.pipe.owner_factor if self.pipe is not None else None
                    row["grad_norm"] = float(clip_grad_norm_(self.params, self.cfg.clip, extra_owner_factor=owner))
                self.optimizer.step()
                self.bad_in_a_row = 0
            else:
                msg = f"step {self.step + 1}: skipped, non-finite loss or gradient (parallel run: not localised)"
                self.log(msg)
                row.update(skipped=True, reason=msg)
                self.bad_in_a_row += 1
            return self._finish_step(row, ok, t0, n_tokens)

        @torch.no_grad()
        def evaluate(self):
            if not self.val_rows:
                return None
            from .data import collate_rows

            was = self.model.training
            self.model.eval()
            total, n = 0.0, 0
            mine = shard_items(self.val_rows, self.pstate.dp_rank, self.dims.dp_shard)
            if self.pipe is not None and mine:  # every pipeline gets the same number of rows
                from .transforms.parallel import pipeline_batch

                ids, doc, labels, n = pipeline_batch(mine)
                dev = self.device
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
                    total = self.pipe.eval_loss_sum(ids.to(dev), doc.to(dev), labels.to(dev))
            elif self.pipe is None:
                for r in mine:
                    b = collate_rows([r])
                    total += float(self._loss_sum(b))
                    n += int(b["num_valid_labels"])
            self.model.train(was)
            total = all_reduce_sum(total, self.pstate.loss_group)
            n = all_reduce_sum(n, self.pstate.dp_group)
            if n == 0:
                return None
            loss = total / n
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": n}

        # ---- persistence ----
        def _write_metrics(self, row):
            if is_rank0():
                super()._write_metrics(row)

        def save_checkpoint(self):
            from .checkpoint.dcp import save_distributed

            path = self.out / "checkpoints" / f"step-{self.step:06d}"
            extra = {"step": self.step, "data_state": {**self.stream.state(), "bad_in_a_row": self.bad_in_a_row},
                     "scheduler": self.scheduler.state_dict(), "fingerprint": self.fingerprint(),
                     "layout": self.dims.describe()}
            saved = save_distributed(path, self.model, self.optimizer, extra=extra)
            if is_rank0():  # keep the newest keep_last complete checkpoints
                import shutil

                done = sorted(c for c in (self.out / "checkpoints").glob("step-*") if (c / "meta.json").exists())
                for old in done[:-self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            barrier()
            return saved

        def _resume(self, path):
            from pathlib import Path

            from .checkpoint.dcp import load_distributed
            from .errors import CheckpointError
            from .train import RowStream

            p = Path(path)
            cands = sorted(p.glob("checkpoints/step-*")) if (p / "checkpoints").exists() else [p]
            cands = [c for c in cands if (c / "meta.json").exists()]
            if not cands:
                raise CheckpointError(f"--resume {p}: no complete distributed checkpoint found")
            ckpt = cands[-1]
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            extra = load_distributed(ckpt, self.model, self.optimizer)
            self.scheduler.load_state_dict(extra["scheduler"])
            # DCP stores ONE copy of the optimizer's param_groups (keyed by group index), naming only
            # the writing rank's parameters. Pipeline stages hold different parameters, so on the
            # other stages the loaded groups lose their hyperparameters (the per-parameter state,
            # keyed by name, loads fine): put back this run's hyperparameters and the learning rate
            # in force at the save point.
            for group, h, lr in zip(self.optimizer.param_groups, hyper, self.scheduler.get_last_lr()):
                for k, v in h.items():
                    group.setdefault(k, v)
                group["lr"] = lr
            self.step = int(extra["step"])
            ds = extra["data_state"]
            self.stream = RowStream(self.train_rows, self.cfg.seed, ds["epoch"], ds["cursor"])
            self.bad_in_a_row = int(ds.get("bad_in_a_row", 0))
            if is_rank0() and self.metrics_path.exists():  # rows after the checkpoint: an interrupted future
                import json as _json

                keep = [l for l in self.metrics_path.read_text().splitlines()
                        if l.strip() and _json.loads(l).get("step", 0) <= self.step]
                self.metrics_path.write_text("".join(l + "\n" for l in keep))
            barrier()
            self.log(f"resumed from {ckpt} at step {self.step} (saved at {extra.get('layout')})")

        def export(self):
            from .transforms.parallel import export_hf

            dst = export_hf(self.model, self.out / "final", tokenizer=self.tokenizer)
            self.log(f"final model: {self.out / 'final'}")
            return dst

        def plot(self):
            if is_rank0():
                return super().plot()
            return None

    return DistributedTrainer
