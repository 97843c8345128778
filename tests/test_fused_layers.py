"""Memory-lean autograd paths of the shared layers equal plain autograd over the reference ops."""

import pytest
import torch

from gemmaforge.layers.mlp import GatedMLP
from gemmaforge.layers.norm import GemmaRMSNorm, RMSNorm
from gemmaforge.ops.rms_norm import rms as _rms


@pytest.mark.parametrize("cls,offset", [(GemmaRMSNorm, 1.0), (RMSNorm, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_forward_is_bit_identical_and_gradients_match(cls, offset, dtype):
    torch.manual_seed(0)
    norm = cls(64).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(3, 5, 64) * 7).to(dtype).requires_grad_()
    gy = torch.randn(3, 5, 64).to(dtype)
    y = norm(x)
    (y.float() * gy.float()).sum().backward()
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    ref = (_rms(x, norm.eps) * (offset + norm.weight.float())).type_as(x)  # the reference op sequence
    (ref.float() * gy.float()).sum().backward()
    assert y.dtype == dtype and torch.equal(y, ref)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx, x.grad, **tol)
    torch.testing.assert_close(gw, norm.weight.grad, **tol)


def test_norm_saves_less_for_backward():
    norm = GemmaRMSNorm(256)
    x = torch.randn(4, 128, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        norm(x)
    # x and the per-row 1/rms (the weight is a parameter): one copy of x, not four
    assert sum(saved) <= x.numel() + 4 * 128 + 256, saved


@pytest.mark.parametrize("autocast", [False, True])
def test_gated_mlp_lean_path_equals_the_hooked_path(autocast):
    """The lean path (``GatedDown``: recomputes act(g) and act(g) * u in the backward) gives the
    plain autograd path's output and gradients: bitwise in fp32; under bf16 autocast (the GPU
    default, here on CPU) within bf16 rounding, with fp32 weight gradients."""
    torch.manual_seed(0)
    mlp = GatedMLP(16, 40, "gelu_pytorch_tanh")
    x = torch.randn(2, 7, 16, requires_grad=True)
    outs, grads = [], []
    for hook in (None, lambda name, t: t):  # a hook forces the plain autograd path
        x.grad = None
        mlp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mlp(x, hook)
        (y.float() * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        if autocast:
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(a, b)


def test_gated_mlp_saves_gate_and_up_only():
    """Per layer the MLP keeps its input (for the gate/up weights) and gate and up outputs: not
    act(gate) nor the product that feeds the down projection (each as large as gate)."""
    mlp = GatedMLP(16, 40, "gelu_pytorch_tanh")
    x = torch.randn(2, 7, 16, requires_grad=True)
    saved = []
    params = {p.data_ptr() for p in mlp.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    storages = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.data_ptr() not in params}
    assert sum(storages.values()) == x.numel() + 2 * 2 * 7 * 40, [tuple(t.shape) for t in saved]


def test_gated_mlp_calls_a_hooked_down_projection():
    """A forward hook on ``down_proj`` (a user's, or the health check's per-module probe) sees the
    call: the lean path steps aside for a watched module, so the hook's output replacement counts."""
    mlp = GatedMLP(16, 40, "gelu_pytorch_tanh")
    x = torch.randn(2, 7, 16, requires_grad=True)
    seen = []
    handle = mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out * 0)
    y = mlp(x)
    assert seen == [(2, 7, 16)] and torch.equal(y, torch.zeros_like(y))
    # the watched module still gets the lean activation: act(g) is not saved, only g, u and the
    # product the down projection reads
    saved = []
    params = {p.data_ptr() for p in mlp.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    storages = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.data_ptr() not in params}
    assert sum(storages.values()) == x.numel() + 3 * 2 * 7 * 40
    handle.remove()
    assert mlp(x).abs().sum() > 0 and len(seen) == 2

