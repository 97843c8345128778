"""fp32 products through oneDNN (ops.cpu_gemm): equal to ATen's within fp32 rounding for every operand
layout the fused ops pass (transposed views included), with gradients equal to autograd's; ATen's
own product wherever oneDNN does not apply."""

import pytest
import torch
import torch.nn.functional as F

from gemmaforge.ops import cpu_gemm
from gemmaforge.ops.act_linear import GeluLinear
from gemmaforge.ops.norm_linear import LayerNormLinears

pytestmark = pytest.mark.skipif(not cpu_gemm.ops_present(),
                                reason="this torch build has no oneDNN linear ops (mkldnn)")


def test_products_equal_aten_for_every_layout(onednn):
    torch.manual_seed(0)
    a, b = torch.randn(37, 53), torch.randn(53, 29)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        assert cpu_gemm.applies(x, y)
        torch.testing.assert_close(cpu_gemm.mm(x, y), x @ y, rtol=1e-5, atol=1e-5)
    g, h = torch.randn(41, 37), torch.randn(41, 29)
    torch.testing.assert_close(cpu_gemm.mm(g.t(), h), g.t() @ h, rtol=1e-5, atol=1e-5)
    x3, w, bias = torch.randn(2, 5, 53), torch.randn(29, 53), torch.randn(29)
    torch.testing.assert_close(cpu_gemm.linear(x3, w, bias), F.linear(x3, w, bias), rtol=1e-5, atol=1e-5)
    # not fp32, or not CPU tensors: ATen's product itself
    assert not cpu_gemm.applies(a.double(), b.double())
    assert torch.equal(cpu_gemm.mm(a.double(), b.double()), a.double() @ b.double())


def test_linear_function_gradients_equal_autograd(onednn):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 7, 16)
    y = cpu_gemm.Linear.apply(x, w, b)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_y = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_y, (x, w, b), gy)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_onednn", [True, False])
def test_fused_tower_ops_equal_autograd(monkeypatch, use_onednn):
    """LayerNormLinears and GeluLinear (SigLIP's fused ops) give autograd's outputs and gradients with
    either library's products."""
    monkeypatch.setattr(cpu_gemm, "onednn_pays", lambda: use_onednn)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    nw, nb = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    ws = [torch.randn(n, 32, requires_grad=True) for n in (24, 8)]
    bs = [torch.randn(n, requires_grad=True) for n in (24, 8)]
    outs = LayerNormLinears.apply(x, nw, nb, 1e-6, ws[0], bs[0], ws[1], bs[1])
    y = F.layer_norm(x, (32,), nw, nb, 1e-6)
    refs = [F.linear(y, w, b) for w, b in zip(ws, bs)]
    gys = [torch.randn_like(r) for r in refs]
    leaves = (x, nw, nb, *ws, *bs)
    got = torch.autograd.grad(outs, leaves, gys)
    want = torch.autograd.grad(refs, leaves, gys)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    h = torch.randn(2, 9, 40, requires_grad=True)
    w2, b2 = torch.randn(32, 40, requires_grad=True), torch.randn(32, requires_grad=True)
    out = GeluLinear.apply(h, w2, b2, "tanh")
    ref = F.linear(F.gelu(h, approximate="tanh"), w2, b2)
    gy = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (h, w2, b2), gy), torch.autograd.grad(ref, (h, w2, b2), gy)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 24, 40), (24, 40, 300), (12, 500, 16)])  # row, column, contraction blocks
@pytest.mark.parametrize("accumulate", [False, True])
def test_head_loss_products_in_blocks_equal_aten(onednn, monkeypatch, shape, accumulate):
    """The LM-head loss's ``out (+)= a @ b`` through oneDNN in small blocks (here 1 KiB, so every
    blocking mode runs many blocks), over transposed views too, equals ATen's product."""
    monkeypatch.setattr(cpu_gemm, "BLOCK_BYTES", 1024)
    torch.manual_seed(0)
    m, k, n = shape
    for a, b in ((torch.randn(m, k), torch.randn(k, n)), (torch.randn(k, m).t(), torch.randn(n, k).t())):
        base = torch.randn(m, n)
        out = base.clone()
        cpu_gemm.mm_into(a, b, out, accumulate)
        want = base + a @ b if accumulate else a @ b
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    # where oneDNN does not apply (float64): ATen's own product, bit for bit
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    out = torch.zeros(m, n, dtype=torch.float64)
    cpu_gemm.mm_into(a, b, out, False)
    assert torch.equal(out, a @ b)
