"""KV cache for generation. Full layers keep every key; sliding layers keep at most the window.

Keys are stored after RoPE, with the stream index and document id they were written at, so the
same mask functions as training apply to cached keys.
"""

from __future__ import annotations

import torch


class KVCache:
    stateful = True  # keeps what each call adds: a layer must not run twice for one call (checkpointing)

    def __init__(self, windows: list[int | None], max_len: int):
        self.windows = windows
        self.max_len = max_len
        self.seen = 0  # stream index of the next token
        self._k: list[torch.Tensor | None] = [None] * len(windows)
        self._v: list[torch.Tensor | None] = [None] * len(windows)
        self._doc: list[torch.Tensor | None] = [None] * len(windows)
        self._idx: list[torch.Tensor | None] = [None] * len(windows)
        self._len = [0] * len(windows)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, idx: torch.Tensor):
        """Append this call's k/v ([B, Hkv, S, D]); return what the layer's queries attend to."""
        w = self.windows[layer]
        if w is None:
            return self._update_full(layer, k, v, doc, idx)
        if self._k[layer] is None or self._len[layer] == 0:
            k_all, v_all, d_all, i_all = k, v, doc, idx
        else:
            k_all = torch.cat([self._k[layer], k], dim=2)
            v_all = torch.cat([self._v[layer], v], dim=2)
            d_all = torch.cat([self._doc[layer], doc], dim=1)
            i_all = torch.cat([self._idx[layer], idx])
        keep = max(w - 1, 0)  # the next query sees w keys including itself
        n = k_all.shape[2]
        s = max(n - keep, 0)
        self._k[layer], self._v[layer] = k_all[:, :, s:].clone(), v_all[:, :, s:].clone()
        self._doc[layer], self._idx[layer] = d_all[:, s:].clone(), i_all[s:].clone()
        self._len[layer] = n - s
        return k_all, v_all, d_all, i_all

    def _update_full(self, layer, k, v, doc, idx):
        B, H, S, D = k.shape
        n = self._len[layer]
        if self._k[layer] is None:
            cap = max(self.max_len, S)
            self._k[layer] = k.new_empty(B, H, cap, D)
            self._v[layer] = v.new_empty(B, H, cap, D)
            self._doc[layer] = doc.new_empty(B, cap)
            self._idx[layer] = idx.new_empty(cap)
        if n + S > self._k[layer].shape[2]:
            raise ValueError(f"KV cache full: {n + S} tokens > capacity {self._k[layer].shape[2]}")
        self._k[layer][:, :, n:n + S] = k
        self._v[layer][:, :, n:n + S] = v
        self._doc[layer][:, n:n + S] = doc
        self._idx[layer][n:n + S] = idx
        self._len[layer] = n + S
        m = n + S
        return self._k[layer][:, :, :m], self._v[layer][:, :, :m], self._doc[layer][:, :m], self._idx[layer][:m]

    def advance(self, n: int) -> None:
        self.seen += n

    def stored_tokens(self, layer: int) -> int:
        return self._len[layer]
