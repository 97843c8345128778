"""Activation checkpointing applied from outside: same loss and gradients, same names, less saved."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.parallel.checkpointing import (
    apply_activation_checkpointing,
    checkpointed_layers,
    remove_activation_checkpointing,
)


def _model():
    torch.manual_seed(0)
    m = from_config(preset("gemma-3-tiny")).train()
    for p in m.parameters():
        if p.dim() == 1:  # non-identity norms so every parameter gets a distinctive gradient
            torch.nn.init.normal_(p, 0, 0.3)
    assert set(m.config.layer_types) == {"sliding_attention", "full_attention"}
    return m


def _packed(vocab):
    g = torch.Generator().manual_seed(1)
    lengths = [3, 13, 1, 20, 7]  # documents longer than the sliding window (8) too
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, cu_seqlens=cu), ids


def _padded(vocab):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    return dict(input_ids=ids, attention_mask=mask), torch.where(mask.bool(), ids, -100)


def _loss_and_grads(m, inputs, labels, backend):
    m.zero_grad(set_to_none=True)
    logits = m(**inputs, attn_backend=backend)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[:-1].float(), labels.reshape(-1)[1:],
                           ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("batch", ["packed", "padded"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_loss_and_every_gradient_equal(batch, backend):
    m = _model()
    inputs, labels = (_packed if batch == "packed" else _padded)(m.config.vocab_size)
    loss0, g0 = _loss_and_grads(m, inputs, labels, backend)
    keys0 = list(m.state_dict().keys())
    names0 = [n for n, _ in m.named_parameters()]

    apply_activation_checkpointing(m)
    assert checkpointed_layers(m) == [f"model.layers.{i}" for i in range(4)]
    assert list(m.state_dict().keys()) == keys0  # names unchanged: model.layers.N....
    assert [n for n, _ in m.named_parameters()] == names0
    loss1, g1 = _loss_and_grads(m, inputs, labels, backend)

    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    assert g1.keys() == g0.keys() and len(g0) == len(names0)
    for n in g0:
        assert g0[n].abs().sum() > 0, n  # every parameter (both layer types) really gets a gradient
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)


def _count_calls(m):
    counts = {}
    for i in range(4):
        mlp = m.model.layers[str(i)].mlp
        counts[i] = 0

        def hook(mod, args, out, i=i):
            counts[i] += 1

        mlp.register_forward_hook(hook)
    return counts


def _saved_tensors(m, inputs):
    n = 0

    def pack(t):
        nonlocal n
        n += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = m(**inputs)
    return n, logits


def test_recomputes_in_backward_and_saves_less():
    m = _model()
    inputs, _ = _packed(m.config.vocab_size)
    counts = _count_calls(m)

    saved_plain, logits = _saved_tensors(m, inputs)
    logits.float().logsumexp(-1).mean().backward()
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}  # no recomputation without checkpointing

    apply_activation_checkpointing(m, every=2)  # layers 0 and 2
    assert checkpointed_layers(m) == ["model.layers.0", "model.layers.2"]
    apply_activation_checkpointing(m)  # re-applying replaces the selection, never double-wraps
    assert checkpointed_layers(m) == [f"model.layers.{i}" for i in range(4)]
    for c in counts:
        counts[c] = 0
    saved_ckpt, logits = _saved_tensors(m, inputs)
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}
    logits.float().logsumexp(-1).mean().backward()
    assert counts == {0: 2, 1: 2, 2: 2, 3: 2}  # every block ran again during backward
    # only the block inputs (and what surrounds the blocks) stay saved
    assert saved_ckpt < saved_plain / 4, (saved_ckpt, saved_plain)

    remove_activation_checkpointing(m)
    assert checkpointed_layers(m) == []
    for c in counts:
        counts[c] = 0
    saved_again, logits = _saved_tensors(m, inputs)
    logits.float().logsumexp(-1).mean().backward()
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}
    assert saved_again == saved_plain


def test_every_selects_layers_and_both_rope_types_checkpointed():
    m = _model()
    apply_activation_checkpointing(m, every=3)
    assert checkpointed_layers(m) == ["model.layers.0", "model.layers.3"]  # sliding and full
    types_ = {m.config.layer_types[int(n.rsplit(".", 1)[1])] for n in checkpointed_layers(m)}
    assert types_ == {"sliding_attention", "full_attention"}
    with pytest.raises(ValueError):
        apply_activation_checkpointing(m, every=0)


def test_no_grad_and_kv_cache_run_plain(monkeypatch):
    import gemmaforge.parallel.checkpointing as ckmod

    calls = []
    real = ckmod.checkpoint
    monkeypatch.setattr(ckmod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = m(ids)
    apply_activation_checkpointing(m)
    with torch.no_grad():
        out = m(ids)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert calls == []
    # with a KV cache (grad on), recomputation would append keys twice: layers run plainly
    cache = m.new_cache(32)
    out = m(ids[:, :8], cache=cache)
    out2 = m(ids[:, 8:], cache=cache)
    assert cache.seen == 12 and calls == []
    torch.testing.assert_close(torch.cat([out, out2], 1), ref, atol=1e-5, rtol=0)
    m(ids).sum()  # the spy does see the checkpointed path
    assert len(calls) == 4


def test_deepcopy_keeps_checkpointing_bound_to_the_copy():
    m = _model()
    apply_activation_checkpointing(m)
    c = copy.deepcopy(m)
    assert checkpointed_layers(c) == checkpointed_layers(m)
    layer = c.model.layers["1"]
    assert layer.forward.__self__ is layer
    inputs, labels = _packed(m.config.vocab_size)
    loss_c, gc = _loss_and_grads(c, inputs, labels, "sdpa")
    # the copy's checkpointed layers run the copy's weights: gradients land on the copy only
    assert gc["model.layers.1.mlp.up_proj.weight"].abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    loss_m, _ = _loss_and_grads(m, inputs, labels, "sdpa")
    torch.testing.assert_close(loss_c, loss_m, atol=1e-6, rtol=0)
