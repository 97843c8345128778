"""Tensor parallelism (DTensor ``parallelize_module``), applied to a model from outside.

* q/k/v and gate/up: ``ColwiseParallel`` (output features = whole heads / MLP columns); the model's
  ``view(B, S, -1, head_dim)`` then sees the local head count, so no model change is needed.
* o_proj and down: ``RowwiseParallel`` (one all-reduce each, output replicated).
* q_norm/k_norm: per-head weights used by every head, so they stay replicated; their input is a
  local ``[B, H_local, S, D]`` tensor, wrapped as a DTensor sharded on the head dim so that the
  gradient of the replicated weight is summed over the TP ranks.
* everything else (embedding, layer norms, final norm): replicated DTensors (``ReplicateParallel``:
  plain tensors in, plain tensors out), so every parameter is a DTensor on the TP mesh and the
  optimizer, gradient clipping and FSDP's 2-D composition stay uniform.
* the LM head (tied or not): its module becomes a ``ReplicatedLMHead``, whose products use the local
  value of the replicated weight (the full ``[V, H]`` matrix); the gradient flows back into the
  replicated DTensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.head import LMHead
from ..models.common.decoder import decoder_layers


def _replicate_style():
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        """Parameters become replicated DTensors; tensor inputs/outputs stay plain tensors."""

        def _apply(self, module: nn.Module, device_mesh):
            def partition(name, mod, mesh):
                for n, p in list(mod.named_parameters(recurse=False)):
                    if isinstance(p, DTensor):
                        continue
                    d = distribute_tensor(p.data, mesh, [Replicate()], src_data_rank=0)
                    mod.register_parameter(n, nn.Parameter(d, requires_grad=p.requires_grad))

            def to_dt(x, mesh):
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
                    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                return x

            def input_fn(mod, inputs, mesh):
                return tuple(to_dt(x, mesh) for x in inputs)

            def output_fn(mod, outputs, mesh):
                if isinstance(outputs, DTensor):
                    return outputs.to_local()
                if isinstance(outputs, tuple):
                    return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
                return outputs

            return distribute_module(module, device_mesh, partition, input_fn, output_fn)

    return ReplicateParallel()


def layer_tp_plan(layer: nn.Module) -> dict:
    """The TP plan of one decoder block (names relative to the block); only submodules that exist."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {}
    names = dict(layer.named_modules())
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        if n in names:
            plan[n] = ColwiseParallel()
    for n in ("self_attn.o_proj", "mlp.down_proj"):
        if n in names:
            plan[n] = RowwiseParallel()
    for n in ("self_attn.q_norm", "self_attn.k_norm"):
        if n in names:  # per-head norm on [B, H_local, S, D]: shard dim 1 = heads
            plan[n] = SequenceParallel(sequence_dim=1, use_local_output=True)
    return plan


class ReplicatedLMHead(LMHead):
    """The LM head over a TP-replicated weight: products use its local value (the whole matrix)."""

    def matrix(self) -> torch.Tensor:
        w = self.weight
        return w.to_local() if hasattr(w, "to_local") else w


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    for _, layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, layer_tp_plan(layer))
    head = model.lm_head
    tied = head is not None and model.model.embed_tokens is not None and \
        head.weight is model.model.embed_tokens.weight
    # everything not covered by a plan, but the head: replicated (plain tensors in and out)
    for name, mod in list(model.named_modules()):
        if mod is head:
            continue
        if any(not isinstance(p, DTensor) for p in mod.parameters(recurse=False)):
            parallelize_module(mod, tp_mesh, _replicate_style())
    if head is not None:
        model.lm_head = head = ReplicatedLMHead.sharing(head)
        if tied:
            head.weight = model.model.embed_tokens.weight  # the embedding got a new (DTensor) Parameter: tie again
        elif not isinstance(head.weight, DTensor):
            w = head.weight
            head.weight = nn.Parameter(distribute_tensor(w.data, tp_mesh, [Replicate()], src_data_rank=0),
                                       requires_grad=w.requires_grad)
    return model
