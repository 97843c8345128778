"""Context parallelism: each rank of a CP group holds a contiguous shard of every packed row.

Each rank runs its ``T / cp`` tokens through the model; every attention layer all-gathers K/V so
queries see the keys of their whole document with global positions (RoPE), global stream indices
(causal and sliding-window masks) and global document ids (document mask). Gradients of the
gathered K/V are summed back to the rank that produced them. The per-rank loss sums add up (over
``dp_shard x cp``, which FSDP reduces over) to the single-process sum.

Attention per rank costs ``O(T/cp x T)`` (a dense mask over the gathered keys); causal load is
not balanced (the last shard does the most work).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError


class _GatherSeq(torch.autograd.Function):
    """All-gather equal shards along ``dim``; backward: sum the gradients over ranks, keep our shard."""

    @staticmethod
    def forward(ctx, x, dim, group, size, rank):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        ctx.dim, ctx.group, ctx.size, ctx.rank, ctx.n = dim, group, size, rank, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g):
        if dist.get_backend(ctx.group) == "nccl":
            chunks = [c.contiguous() for c in g.chunk(ctx.size, ctx.dim)]
            out = torch.empty_like(chunks[ctx.rank])
            dist.reduce_scatter(out, chunks, group=ctx.group)
            return out, None, None, None, None
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None, None, None


class _CPKeys:
    """Per-forward key source of a context-parallel rank, passed to the model as its ``cache``.

    The model's attention path already knows how to attend queries to keys that carry their own
    stream indices and document ids (that is what a KV cache is). For each layer ``update`` returns
    the K/V of the WHOLE sequence (all-gathered, differentiable) with global stream indices, and
    document ids in this rank's local numbering; ``seen`` makes the model give the local queries
    their global stream indices. Causal, sliding-window and document masks are then the global ones.
    Unlike a KV cache it keeps nothing between calls (``stateful = False``): a checkpointed layer may
    run again in the backward and gathers the same keys.
    """

    stateful = False

    def __init__(self, cp: "ContextParallel", offset: int, key_doc: torch.Tensor, key_idx: torch.Tensor):
        self.cp, self.seen, self.key_doc, self.key_idx = cp, offset, key_doc, key_idx

    def update(self, layer, k, v, doc, idx):
        k = _GatherSeq.apply(k, 2, self.cp.group, self.cp.size, self.cp.rank)
        v = _GatherSeq.apply(v, 2, self.cp.group, self.cp.size, self.cp.rank)
        return k, v, self.key_doc.expand(k.shape[0], -1), self.key_idx

    def advance(self, n: int) -> None:  # nothing is kept between forwards
        pass


class ContextParallel:
    """Shard a packed sequence over the ranks of ``cp_mesh`` (contiguous equal shards).

        cp = ContextParallel(mesh["cp"])
        part = cp.shard(batch)   # this rank's tokens, plus the key exchange as ``cache``
    """

    def __init__(self, cp_mesh_or_group):
        self.group = cp_mesh_or_group.get_group() if hasattr(cp_mesh_or_group, "get_group") else cp_mesh_or_group
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def shard(self, batch: dict) -> dict:
        """This rank's part of a collated batch: ``input_ids [1, S]``, ``cu_seqlens``, ``position_ids
        [1, S]`` (global, restarting per document), ``cache`` (the key exchange) and ``span``, the
        ``(start, end)`` of its tokens in the row (per-token targets are sliced alike)."""
        ids = batch["input_ids"].reshape(-1)
        T = ids.numel()
        if T % self.size:
            raise ConfigError(f"context parallel: {T} tokens per micro-batch is not divisible by cp={self.size}")
        S = T // self.size
        off = self.rank * S
        cu = batch["cu_seqlens"].to(torch.long).reshape(-1)
        dev = ids.device
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev), (cu[1:] - cu[:-1]), output_size=T)
        pos = torch.arange(T, device=dev) - cu[:-1].to(dev)[doc]
        inner = [int(c) - off for c in cu.tolist() if off < int(c) < off + S]
        # a leading EMPTY segment: the local row always has >= 2 segments, so the model never treats
        # it as a single document (which would skip the document mask against the gathered keys);
        # local document ids are therefore (global id - id of our first token + 1)
        cu_local = torch.tensor([0, 0, *inner, S], dtype=torch.int32, device=dev)
        key_doc = (doc - doc[off] + 1)[None]
        cache = _CPKeys(self, off, key_doc, torch.arange(T, device=dev))
        return {"input_ids": ids[off:off + S][None], "cu_seqlens": cu_local, "position_ids": pos[off:off + S][None],
                "cache": cache, "span": (off, off + S)}
