"""The per-forward context every layer reads: one object built by ``CausalLM.forward`` for one call.

It carries what a call's layers share and nothing a module keeps: the document layout
(``SeqInfo``), the RoPE table of each layer type, the attention backend, the key source (a KV
cache, or a context-parallel key exchange), the hooks bound to this call and the family's
per-forward state (Gemma 4: per-layer embeddings, the KV-sharing store).

A plain object on purpose (not a dataclass, dict or list): FSDP2 and other wrappers that map over
a layer's arguments rebuild those containers, but pass other objects through by reference, so
what one layer writes into ``state`` is seen by every later layer.
"""

from __future__ import annotations

import torch

from ...layers.attention import SeqInfo


class ForwardContext:
    def __init__(self, info: SeqInfo, rope: dict, backend: str, cache=None):
        self.info = info
        self.rope = rope  # layer type -> (cos, sin), each [B, S, head_dim]
        self.backend = backend
        # where keys/values come from besides this call's tokens: a KVCache (``stateful``: it keeps what
        # it is given, so a layer must not run twice) or a context-parallel exchange (gathers per call)
        self.cache = cache
        # layer indices whose attention must run the eager backend and expose probabilities (hooks)
        self.eager_layers: set = set()
        # interpretability hooks (models/common/hooks.py); None = no hook anywhere, each site costs one call
        self.hooks = None
        # per-forward state of the family (e.g. Gemma 4's per-layer inputs and KV-sharing store)
        self.state: dict = {}

    @property
    def stateful_cache(self) -> bool:
        """The key source keeps what each call adds (a KV cache): a layer must run exactly once."""
        return self.cache is not None and getattr(self.cache, "stateful", True)

    def hook(self, layer: int | None, name: str, x: torch.Tensor, layout: str = "bsd") -> torch.Tensor:
        """A named hook site (TransformerLens names). Returns ``x`` or a hook's replacement."""
        return x if self.hooks is None else self.hooks(layer, name, x, layout)

    def mlp_hook(self, layer: int):
        return None if self.hooks is None else (lambda name, x: self.hooks(layer, name, x, "bsd"))

    def wants(self, layer: int | None, name: str) -> bool:
        return self.hooks is not None and self.hooks.wants(layer, name)
