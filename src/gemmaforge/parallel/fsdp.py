"""FSDP2 (``fully_shard``) per decoder block and at the root, applied from outside the model.

The root group holds the embedding, the (tied) LM head and the final norm (one group, so the tie is
sharded once). The FSDP mesh is ``dp_shard x cp`` (context-parallel ranks hold different tokens, so
their gradients are reduced like data-parallel ones). Gradients are SUMMED (divide factor 1): the
trainer's loss is already ``sum over valid tokens / global valid tokens``, so summing per-rank
gradients gives exactly the single-process gradient. Expert-parallel experts are ignored: they are
already split over the EP group and stay replicated over dp_shard/ep x cp (``ep.sync_expert_grads``).
"""

from __future__ import annotations

from torch import nn

from ..models.common.decoder import decoder_layers
from .dims import ParallelConfig
from .ep import expert_parameters


def apply_fsdp(model: nn.Module, fsdp_mesh, cfg: ParallelConfig) -> nn.Module:
    """FSDP2 per block and at the root (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype)
    layers = [l for _, l in decoder_layers(model)]
    ignored = set(expert_parameters(model)) or None
    for i, layer in enumerate(layers):
        # the last block is needed first in backward: keeping it unsharded saves one all-gather
        rf = cfg.reshard_after_forward
        if rf is None:
            rf = i < len(layers) - 1
        fully_shard(layer, mesh=fsdp_mesh, reshard_after_forward=rf, mp_policy=mp, ignored_params=ignored)
    # root group: embedding + tied LM head + final norm (one group, so the tie is sharded once)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, ignored_params=ignored)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum: the loss is normalised by the global valid-token count
            # plain SUM collectives (no PREMUL_SUM, which gloo lacks); with factor 1 nothing is rescaled
            m.set_force_sum_reduction_for_comms(True)
    return model
