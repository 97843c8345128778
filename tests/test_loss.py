"""Tests for gemmaforge.ops.head_loss: chunked LM-head cross-entropy and log-probs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gemmaforge.ops.head_loss import (
    chunked_cross_entropy,
    chunked_logprobs,
    naive_cross_entropy,
    naive_logprobs,
)

N, H, V = 37, 16, 101
TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(n=N, h=H, v=V, seed=0, dtype=torch.float32, ignore=True, scale=2.5):
    """Raw logits have std ~ 4 * scale for H=16: the default (~10) saturates a
    softcap of 5; without softcap use ``scale=1`` (std ~4), since at std ~14
    (after temperature 0.7) even the naive fp32 reference is only accurate to
    ~5e-5 for the entropy gradient."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore:
        labels[torch.rand(n, generator=g) < 0.25] = -100
        labels[8:16] = -100  # a whole chunk (for chunk_size=8) is ignored
        labels[-1] = -100
    return hidden, weight, labels


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 64])
def test_ce_value_and_grads_match_naive(reduction, softcap, chunk_size):
    hidden, weight, labels = make_inputs(scale=2.5 if softcap else 1.0)
    if softcap is not None:
        raw = hidden @ weight.t()
        assert raw.abs().max() > 4 * softcap  # saturating regime
    h1, w1 = leaf(hidden), leaf(weight)
    h2, w2 = leaf(hidden), leaf(weight)
    out = chunked_cross_entropy(h1, w1, labels, softcap=softcap, chunk_size=chunk_size, reduction=reduction)
    ref = naive_cross_entropy(h2, w2, labels, softcap=softcap, reduction=reduction)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL)
    if reduction == "none":
        assert torch.all(out[labels == -100] == 0)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    else:
        go = torch.tensor(1.7)
    g1 = torch.autograd.grad(out, (h1, w1), go)
    g2 = torch.autograd.grad(ref, (h2, w2), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.all(g1[0][labels == -100] == 0)


@pytest.mark.parametrize("n", [5, 16, 37])  # fewer rows than H, exactly H, more (later chunks accumulate)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("grads", ["both", "hidden", "weight"])
def test_ce_vocab_blocks_and_logits_in_gradient_buffer(monkeypatch, n, softcap, grads):
    """Several vocabulary blocks (the last one partial), logits of the first min(N, H) rows formed
    inside the weight-gradient buffer and overwritten block by block in reverse order: loss and both
    gradients still equal the naive reference, for every label position (first/last block too)."""
    import gemmaforge.ops.head_loss as L

    monkeypatch.setattr(L, "_VOCAB_BLOCK", 8)  # V = 101: 13 blocks, the last of 5 rows
    hidden, weight, labels = make_inputs(n=n, scale=2.5 if softcap else 1.0, ignore=False)
    labels[0], labels[-1] = 0, V - 1  # targets in the first and the last (partial) block
    h1, w1 = leaf(hidden, grads != "weight"), leaf(weight, grads != "hidden")
    h2, w2 = leaf(hidden, grads != "weight"), leaf(weight, grads != "hidden")
    out = chunked_cross_entropy(h1, w1, labels, softcap=softcap, chunk_size=7, reduction="sum")
    ref = naive_cross_entropy(h2, w2, labels, softcap=softcap, reduction="sum")
    torch.testing.assert_close(out, ref, **TOL)
    out.backward()
    ref.backward()
    for a, b in ((h1, h2), (w1, w2)):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **TOL)
        else:
            assert a.grad is None


class GemmShapes(TorchDispatchMode):
    """Records the output shape of every matrix product (ATen's, and oneDNN's where ``ops.cpu_gemm``
    takes it)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm,
                                   torch.ops.mkldnn._linear_pointwise):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("n", [37, 45])  # 29 and 37 valid rows: padded to 32 and 40
def test_ce_pads_token_rows_to_aligned_gemms(n):
    """The fused loss pads the valid rows to a multiple of 8 with zero rows, so every GEMM of the
    head sees an aligned token count (511 rows made MKL's logits GEMM 1.4x slower than 512); the
    padding changes neither the loss nor a gradient (a zero row adds exactly 0 to the weight's)."""
    import gemmaforge.ops.head_loss as L

    hidden, weight, labels = make_inputs(n=n, scale=1.0)
    n_valid = int((labels != -100).sum())
    assert n_valid % L._ROW_ALIGN != 0
    h1, w1, h2, w2 = leaf(hidden), leaf(weight), leaf(hidden), leaf(weight)
    with GemmShapes() as mode:
        out = chunked_cross_entropy(h1, w1, labels, chunk_size=8, reduction="mean")
    token_dims = [d for shape in mode.shapes for d in shape if d not in (H, V)]
    assert token_dims and all(d % L._ROW_ALIGN == 0 for d in token_dims), mode.shapes
    ref = naive_cross_entropy(h2, w2, labels, reduction="mean")
    torch.testing.assert_close(out, ref, **TOL)
    out.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)
    assert h1.grad.shape == hidden.shape and torch.all(h1.grad[labels == -100] == 0)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_ce_weight_grad_buffer_is_reused_and_exact(softcap):
    """``weight_grad_buffer``: the fused loss forms its logits and the weight gradient in the given
    [V, H] buffer; ``weight.grad`` shares its memory (autograd adopts it, no copy); reused over steps
    (grad set to None in between) every loss and gradient equals a fresh-buffer run's bitwise, and
    equals the naive loss within tolerance. A buffer still holding the gradient, or of the wrong
    shape or dtype, is refused with a clear error."""
    hidden, weight, labels = make_inputs(scale=2.5 if softcap else 1.0)
    buf = torch.full((V, H), float("nan"))  # stale contents must never leak into a result
    w_buf, w_new, w_ref = leaf(weight), leaf(weight), leaf(weight)
    for step in range(3):
        hs = [leaf(hidden * (1 + step)) for _ in range(3)]
        out = chunked_cross_entropy(hs[0], w_buf, labels, softcap=softcap, chunk_size=8, reduction="mean",
                                    weight_grad_buffer=buf)
        new = chunked_cross_entropy(hs[1], w_new, labels, softcap=softcap, chunk_size=8, reduction="mean")
        ref = naive_cross_entropy(hs[2], w_ref, labels, softcap=softcap, reduction="mean")
        for t in (out, new, ref):
            t.backward()
        assert w_buf.grad.data_ptr() == buf.data_ptr() and w_buf.grad.shape == buf.shape
        assert torch.equal(out, new) and torch.equal(w_buf.grad, w_new.grad) and torch.equal(hs[0].grad, hs[1].grad)
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(w_buf.grad, w_ref.grad, **TOL)
        if step == 0:
            with pytest.raises(ValueError, match="holds weight.grad"):
                chunked_cross_entropy(leaf(hidden), w_buf, labels, weight_grad_buffer=buf)
        for w in (w_buf, w_new, w_ref):
            w.grad = None
    with pytest.raises(ValueError, match=r"weight_grad_buffer must be a contiguous fp32 \[%d, %d\]" % (V, H)):
        chunked_cross_entropy(leaf(hidden), w_buf, labels, weight_grad_buffer=torch.empty(V, H + 1))
    with pytest.raises(ValueError, match="float64"):
        chunked_cross_entropy(leaf(hidden), w_buf, labels, weight_grad_buffer=buf.double())


def test_ce_logits_buffer_is_the_chunk_workspace():
    """``logits_buffer``: a frozen head's chunk logits are formed in the given workspace (stale
    contents never leak), results equal a fresh workspace's bitwise; a buffer smaller than
    chunk_size * V is refused."""
    hidden, weight, labels = make_inputs(scale=1.0)
    ws = torch.full((8 * V,), float("nan"))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.mm and kwargs.get("out") is not None:
                seen.append(kwargs["out"].untyped_storage().data_ptr())
            if func in (torch.Tensor.copy_, torch.Tensor.add_):  # oneDNN's products (ops.cpu_gemm) land by copy
                seen.append(args[0].untyped_storage().data_ptr())
            return func(*args, **kwargs)

    h1, h2 = leaf(hidden), leaf(hidden)
    with Spy():
        out = chunked_cross_entropy(h1, weight, labels, chunk_size=8, reduction="mean", logits_buffer=ws)
    ref = chunked_cross_entropy(h2, weight, labels, chunk_size=8, reduction="mean")
    out.backward()
    ref.backward()
    assert ws.data_ptr() in seen and torch.equal(out, ref) and torch.equal(h1.grad, h2.grad)
    with pytest.raises(ValueError, match="logits_buffer must be"):
        chunked_cross_entropy(leaf(hidden), weight, labels, chunk_size=8, logits_buffer=ws[: 8 * V - 1])


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_ce_weight_without_grad(reduction, softcap):
    """LoRA-style: the LM head is frozen, only hidden needs a gradient."""
    hidden, weight, labels = make_inputs(scale=2.5 if softcap else 1.0)
    h1, h2 = leaf(hidden), leaf(hidden)
    out = chunked_cross_entropy(h1, weight, labels, softcap=softcap, chunk_size=6, reduction=reduction)
    ref = naive_cross_entropy(h2, weight, labels, softcap=softcap, reduction=reduction)
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    assert weight.grad is None


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ce_hidden_without_grad(reduction):
    hidden, weight, labels = make_inputs()
    w1, w2 = leaf(weight), leaf(weight)
    out = chunked_cross_entropy(hidden, w1, labels, softcap=5.0, chunk_size=7, reduction=reduction)
    ref = naive_cross_entropy(hidden, w2, labels, softcap=5.0, reduction=reduction)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)


def test_ce_no_grad_mode():
    hidden, weight, labels = make_inputs()
    h, w = leaf(hidden), leaf(weight)
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, labels, chunk_size=8)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, naive_cross_entropy(hidden, weight, labels), **TOL)


def test_ce_all_labels_ignored():
    hidden, weight, _ = make_inputs()
    labels = torch.full((N,), -100)
    for reduction in ("sum", "mean", "none"):
        h1, w1 = leaf(hidden), leaf(weight)
        h2, w2 = leaf(hidden), leaf(weight)
        out = chunked_cross_entropy(h1, w1, labels, chunk_size=8, reduction=reduction)
        ref = naive_cross_entropy(h2, w2, labels, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)
        g1 = torch.autograd.grad(out.sum(), (h1, w1))
        g2 = torch.autograd.grad(ref.sum(), (h2, w2))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
            assert torch.all(a == 0)
    assert chunked_cross_entropy(hidden, weight, labels).item() == 0.0
    assert math.isnan(chunked_cross_entropy(hidden, weight, labels, reduction="mean").item())


def test_ce_custom_ignore_index_and_batch_dims():
    hidden, weight, labels = make_inputs(n=36)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)  # 7 is ignored now
    hb, lb = hidden.view(4, 9, H), labels.view(4, 9)
    for reduction in ("sum", "mean", "none"):
        h1, h2 = leaf(hb), leaf(hb)
        out = chunked_cross_entropy(h1, weight, lb, chunk_size=10, reduction=reduction, ignore_index=7)
        ref = naive_cross_entropy(h2, weight, lb, reduction=reduction, ignore_index=7)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, **TOL)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(h1.grad, h2.grad, **TOL)


def test_ce_tied_embedding_and_grad_accumulation():
    """weight is also the embedding; two micro-batches accumulate into .grad."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (2, N), generator=g)
    mix = torch.randn(H, H, generator=g)
    labels = torch.randint(0, V, (2, N), generator=g)
    labels[:, ::5] = -100
    grads = []
    for fn in (chunked_cross_entropy, naive_cross_entropy):
        w = leaf(weight)
        for mb in range(2):
            hidden = torch.tanh(F.embedding(ids[mb], w) @ mix) * 3.0
            kwargs = {"chunk_size": 9} if fn is chunked_cross_entropy else {}
            loss = fn(hidden, w, labels[mb], softcap=5.0, **kwargs) / 50.0
            loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_ce_fused_single_backward_only_but_none_can_retain():
    hidden, weight, labels = make_inputs()
    h = leaf(hidden)
    out = chunked_cross_entropy(h, weight, labels, chunk_size=8)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()
    h2 = leaf(hidden)
    out = chunked_cross_entropy(h2, weight, labels, chunk_size=8, reduction="none").sum()
    out.backward(retain_graph=True)
    g = h2.grad.clone()
    out.backward()
    torch.testing.assert_close(h2.grad, 2 * g)


def test_ce_bad_arguments():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden[:-1], weight, labels)
    bad = labels.clone()
    bad[0] = V
    with pytest.raises(IndexError):
        chunked_cross_entropy(hidden, weight, bad)


# --------------------------------------------------------------------------- #
# log-probs and entropy
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 6, 64])
def test_logprobs_entropy_and_grads_match_naive(softcap, temperature, chunk_size):
    hidden, weight, _ = make_inputs(scale=2.5 if softcap else 1.0)
    if softcap is not None:
        assert (hidden @ weight.t()).abs().max() > 4 * softcap  # saturating regime
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    h1, w1 = leaf(hidden), leaf(weight)
    h2, w2 = leaf(hidden), leaf(weight)
    lp, ent = chunked_logprobs(
        h1, w1, targets, softcap=softcap, temperature=temperature, chunk_size=chunk_size, return_entropy=True
    )
    lp_ref, ent_ref = naive_logprobs(h2, w2, targets, softcap=softcap, temperature=temperature, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, **TOL)
    torch.testing.assert_close(ent, ent_ref, **TOL)
    gen = torch.Generator().manual_seed(7)
    g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    # through both outputs
    g1 = torch.autograd.grad((lp, ent), (h1, w1), (g_lp, g_ent), retain_graph=True)
    g2 = torch.autograd.grad((lp_ref, ent_ref), (h2, w2), (g_lp, g_ent), retain_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)
    # through the entropy only
    g1 = torch.autograd.grad(ent, (h1, w1), g_ent, retain_graph=True)
    g2 = torch.autograd.grad(ent_ref, (h2, w2), g_ent, retain_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)
    # through the log-probs only
    g1 = torch.autograd.grad(lp, (h1, w1), g_lp)
    g2 = torch.autograd.grad(lp_ref, (h2, w2), g_lp)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)


def test_logprobs_without_entropy_and_frozen_weight():
    hidden, weight, _ = make_inputs()
    targets = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(5))
    hidden = hidden[:33].reshape(3, 11, H)
    h1, h2 = leaf(hidden), leaf(hidden)
    lp = chunked_logprobs(h1, weight, targets, softcap=5.0, temperature=0.9, chunk_size=4)
    ref = naive_logprobs(h2, weight, targets, softcap=5.0, temperature=0.9)
    assert lp.shape == targets.shape
    torch.testing.assert_close(lp, ref, **TOL)
    (lp * 2).sum().backward()
    (ref * 2).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    assert weight.grad is None


def test_logprobs_matches_cross_entropy():
    hidden, weight, _ = make_inputs(ignore=False)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    lp = chunked_logprobs(hidden, weight, targets, softcap=5.0, chunk_size=8)
    ce = chunked_cross_entropy(hidden, weight, targets, softcap=5.0, chunk_size=8, reduction="none")
    torch.testing.assert_close(-lp, ce, **TOL)


# --------------------------------------------------------------------------- #
# memory: nothing of size N*V is ever allocated
# --------------------------------------------------------------------------- #
class MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.n_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n_ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


MEM_N, MEM_H, MEM_V, MEM_CHUNK = 1000, 8, 257, 64  # N*H, V*H <= CHUNK*V << N*V


def _mem_inputs():
    hidden, weight, labels = make_inputs(n=MEM_N, h=MEM_H, v=MEM_V, seed=11)
    return leaf(hidden), leaf(weight), labels


def test_memory_probe_catches_naive():
    h, w, labels = _mem_inputs()
    with MaxNumel() as mode:
        loss = naive_cross_entropy(h, w, labels)
        torch.autograd.grad(loss, (h, w))
    assert mode.max_numel >= MEM_N * MEM_V


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_ce_peak_does_not_scale_with_n(reduction, softcap):
    h, w, labels = _mem_inputs()
    with MaxNumel() as mode:
        loss = chunked_cross_entropy(h, w, labels, softcap=softcap, chunk_size=MEM_CHUNK, reduction=reduction)
        torch.autograd.grad(loss.sum(), (h, w))  # backward ops are seen by the mode, too
    assert mode.n_ops > 0
    assert mode.max_numel <= MEM_CHUNK * MEM_V < MEM_N * MEM_V


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logprobs_peak_does_not_scale_with_n(softcap):
    h, w, _ = _mem_inputs()
    targets = torch.randint(0, MEM_V, (MEM_N,))
    with MaxNumel() as mode:
        lp, ent = chunked_logprobs(
            h, w, targets, softcap=softcap, temperature=0.8, chunk_size=MEM_CHUNK, return_entropy=True
        )
        torch.autograd.grad((lp, ent), (h, w), (torch.ones(MEM_N), torch.ones(MEM_N)))
    assert mode.max_numel <= MEM_CHUNK * MEM_V < MEM_N * MEM_V


# --------------------------------------------------------------------------- #
# low precision
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_inputs(softcap):
    hidden, weight, labels = make_inputs(n=64, h=32, v=203, seed=4, scale=2.5 if softcap else 1.0)
    hb, wb = leaf(hidden.bfloat16()), leaf(weight.bfloat16())
    out = chunked_cross_entropy(hb, wb, labels, softcap=softcap, chunk_size=10)
    assert out.dtype == torch.float32
    # fp32 math on the bf16 values: only fp32 rounding separates them
    hx, wx = leaf(hb.detach().float()), leaf(wb.detach().float())
    exact = naive_cross_entropy(hx, wx, labels, softcap=softcap)
    torch.testing.assert_close(out, exact, **TOL)
    # and within bf16 tolerance of the fp32 computation on the unrounded inputs
    ref32 = naive_cross_entropy(hidden, weight, labels, softcap=softcap)
    torch.testing.assert_close(out, ref32, rtol=2e-2, atol=1e-1)
    # the sum is accumulated in fp32 (a bf16 accumulator would be off by ~1e-2 relative)
    tok = chunked_cross_entropy(hb, wb, labels, softcap=softcap, chunk_size=10, reduction="none")
    assert tok.dtype == torch.float32
    torch.testing.assert_close(out, tok.double().sum().float(), **TOL)
    gh, gw = torch.autograd.grad(out, (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # gradients: fp32 computation, rounded once to bf16 at the end
    rh, rw = torch.autograd.grad(exact, (hx, wx))
    torch.testing.assert_close(gh.float(), rh, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw.float(), rw, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh, rh.bfloat16(), rtol=1e-2, atol=1e-4)

    lp, ent = chunked_logprobs(hb, wb, labels.clamp(min=0), softcap=softcap, temperature=0.8, return_entropy=True)
    lp_ref, ent_ref = naive_logprobs(
        hb.detach().float(), wb.detach().float(), labels.clamp(min=0), softcap=softcap, temperature=0.8,
        return_entropy=True,
    )
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, **TOL)
    torch.testing.assert_close(ent, ent_ref, **TOL)
    gh, gw = torch.autograd.grad((lp.sum() + ent.sum()), (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_does_not_change_the_fp32_loss(reduction):
    """Under a caller's bf16 autocast (the GPU training default) the chunked loss and its gradients
    stay fp32 and equal the run without autocast (regression: mm under autocast returned bf16)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(24, 16, generator=g), torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (24,), generator=g)
    y[3] = -100

    def run(autocast):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = chunked_cross_entropy(hh, ww, y, softcap=5.0, chunk_size=7, reduction=reduction)
        loss.sum().backward()
        return loss.detach(), hh.grad, ww.grad

    for a, b in zip(run(True), run(False)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
