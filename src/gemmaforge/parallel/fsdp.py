"""FSDP2 (``fully_shard``) per decoder block and at the root, applied from outside the model.

The ``[V, H]`` tables (token embedding, tied or untied LM head, Gemma 4's per-layer embedding) are
vocabulary-parallel (``parallel.vocab``): ``Shard(0)`` DTensors over the same mesh that FSDP
ignores, each rank holding ``V / P`` rows for the whole step; their uses exchange token ids, hidden
states and per-token statistics, never the table (a tied 262k x 640 table all-gathered for the whole
step had kept an FSDP2 x2 rank at 0.97x one process's peak memory). The root group holds what is
left (the final norm, Gemma 4's per-layer projection); under tensor parallelism, whose tables are
replicated DTensors, the tables stay in the root group (gathered from the forward to the backward).

The FSDP mesh is ``dp_shard x cp`` (context-parallel ranks hold different tokens, so their gradients
are reduced like data-parallel ones). Gradients are SUMMED (divide factor 1): the trainer's loss is
already ``sum over valid tokens / global valid tokens``, so summing per-rank gradients gives exactly
the single-process gradient (a vocabulary-parallel table's shard gradient already sums every rank's
tokens). Expert-parallel experts are ignored: they are already split over the EP group and stay
replicated over dp_shard/ep x cp (``ep.sync_expert_grads``).

A multimodal model's towers (the modules its ``media_specs`` name) are sharded too: each layer of a
tower's ``layers`` list is its own FSDP2 unit, then each tower module one unit holding the rest (patch
embedding, position table, final norm, projector), so a rank holds 1/P of the towers between uses.
"""

from __future__ import annotations

from torch import nn

from ..models.common.decoder import decoder_layers
from ..models.common.media import tower_modules
from .dims import ParallelConfig
from .ep import expert_parameters
from .vocab import apply_vocab_parallel


def apply_fsdp(model: nn.Module, fsdp_mesh, cfg: ParallelConfig) -> nn.Module:
    """Vocabulary-parallel tables, then FSDP2 per block and at the root (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype)
    vocab = apply_vocab_parallel(model, fsdp_mesh, compute_dtype=cfg.param_dtype)
    layers = [l for _, l in decoder_layers(model)]
    ignored = (set(expert_parameters(model)) | set(vocab)) or None
    for i, layer in enumerate(layers):
        # the last block is needed first in backward: keeping it unsharded saves one all-gather
        rf = cfg.reshard_after_forward
        if rf is None:
            rf = i < len(layers) - 1
        fully_shard(layer, mesh=fsdp_mesh, reshard_after_forward=rf, mp_policy=mp, ignored_params=ignored)
    for _, tower in tower_modules(model) if hasattr(model, "media_specs") else []:
        for name, sub in tower.named_modules():
            if name.rsplit(".", 1)[-1] == "layers" and isinstance(sub, (nn.ModuleList, nn.ModuleDict)):
                for block in sub.children():
                    fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, ignored_params=ignored)
        fully_shard(tower, mesh=fsdp_mesh, mp_policy=mp, ignored_params=ignored)
    # root group: what the blocks and the vocabulary-parallel tables leave (final norm, ...)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, ignored_params=ignored)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum: the loss is normalised by the global valid-token count
            # plain SUM collectives (no PREMUL_SUM, which gloo lacks); with factor 1 nothing is rescaled
            m.set_force_sum_reduction_for_comms(True)
    return model
