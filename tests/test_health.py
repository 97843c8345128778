"""Numerical health: cheap non-finite detection and the exact origin of the first NaN/Inf."""

import pytest
import torch
import torch.nn.functional as F

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.train.health import NonFiniteReport, grad_norm_and_finite, locate_nonfinite


def grads_finite(params):
    return grad_norm_and_finite(params)[1]
from gemmaforge.parallel.checkpointing import apply_activation_checkpointing


def _model():
    torch.manual_seed(0)
    return from_config(preset("gemma-3-tiny")).train()


def _batch(m):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, m.config.vocab_size, (20,), generator=g)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    return ids, cu


def _run(m):
    ids, cu = _batch(m)

    def run():
        logits = m(ids, cu_seqlens=cu)
        return F.cross_entropy(logits[:-1], ids[1:])

    return run


def _hook_count(m):
    n = 0
    for mod in m.modules():
        n += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
        n += len(mod._backward_pre_hooks)
    return n


def _once(fn):
    """A hook that fires only on the first call (the poisoned module runs once per micro-batch)."""
    state = {"n": 0}

    def hook(*args):
        state["n"] += 1
        return fn(*args) if state["n"] == 1 else None

    return hook, state


# ----------------------------------------------------------------------------- grads_finite

def test_grads_finite_detects_nan_and_inf_without_false_alarms():
    a, c = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(500, dtype=torch.float16))
    assert grads_finite([a, b, c])  # no grads at all
    a.grad = torch.ones(5)
    b.grad = torch.full((500,), 60000.0, dtype=torch.float16)  # an L2 norm would overflow fp16
    assert grads_finite([a, b, c])
    b.grad[3] = float("nan")
    assert not grads_finite([a, b, c])
    b.grad[3] = 1.0
    a.grad[0] = float("-inf")
    assert not grads_finite([a, b, c])
    assert grads_finite([b, c])
    m = torch.nn.Linear(3, 3)
    m(torch.ones(1, 3)).sum().backward()
    assert grads_finite(m)
    m.weight.grad[0, 0] = float("inf")
    assert not grads_finite(m) and not grads_finite(m.parameters())


def test_total_norm_is_clip_grad_norms_and_overflow_is_not_a_nan():
    """The Trainer's one pass: the total L2 norm equals what clip_grad_norm_ computes (bitwise), and a
    norm that overflows on finite fp32 gradients (elements 1e20) still counts as finite, while a NaN
    or Inf does not."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in ((7, 5), (300,), (2, 3, 4))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    n, ok = grad_norm_and_finite(ps)
    assert ok and torch.equal(n, torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0))
    assert torch.equal(n, torch.nn.utils.clip_grad_norm_(ps, 1e9))
    assert grad_norm_and_finite([torch.nn.Parameter(torch.zeros(2))]) == (None, True)
    ps[1].grad[:] = 1e20  # finite, but the sum of squares overflows fp32
    n, ok = grad_norm_and_finite(ps)
    assert not torch.isfinite(n) and ok and grads_finite(ps)
    ps[1].grad[5] = float("nan")
    assert grad_norm_and_finite(ps)[1] is False and not grads_finite(ps)
    ps[1].grad[5] = 1.0
    ps[0].grad[1, 1] = float("inf")
    assert grad_norm_and_finite(ps)[1] is False


# ----------------------------------------------------------------------------- locate_nonfinite

def test_clean_model_reports_nothing_and_cleans_up():
    m = _model()
    before = _hook_count(m)
    assert locate_nonfinite(m, _run(m)) is None
    assert _hook_count(m) == before
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("target", ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.k_norm",
                                    "model.layers.0", "model.embed_tokens"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_forward_poison_names_exactly_that_module(target, value):
    m = _model()

    def poison(mod, args, out):
        out = out.clone(memory_format=torch.contiguous_format)
        out.view(-1)[5] = value
        return out

    hook, state = _once(poison)
    handle = m.get_submodule(target).register_forward_hook(hook)
    r = locate_nonfinite(m, _run(m))
    assert isinstance(r, NonFiniteReport) and not r.ok
    assert (r.phase, r.where) == ("forward", target)
    kind = "nan" if value != value else "inf"
    assert r.kind == kind and r.count == 1
    assert r.message == f"non-finite ({kind}) in forward of {target}"
    assert state["n"] == 1
    handle.remove()
    assert _hook_count(m) == 0
    assert all(p.grad is None for p in m.parameters())


def test_forward_nonfinite_in_a_modules_own_code_blames_that_module():
    m = _model()
    # NaN appears between submodule calls: the input of layer 3's pre-attention norm is poisoned
    # by the layer's own code (simulated with a pre-hook that rewrites the argument)
    target = m.model.layers["3"].input_layernorm

    def poison(mod, args):
        x = args[0].clone()
        x[0, 0, 0] = float("nan")
        return (x,)

    hook, _ = _once(poison)
    target.register_forward_pre_hook(hook)
    r = locate_nonfinite(m, _run(m))
    assert (r.phase, r.where) == ("forward", "model.layers.3")
    assert "before calling model.layers.3.input_layernorm" in r.message


def test_backward_poison_names_exactly_that_module():
    m = _model()
    target = "model.layers.1.mlp.down_proj"

    def poison(mod, grad_input, grad_output):
        g = grad_input[0].clone()
        g.view(-1)[7] = float("nan")
        return (g,)

    hook, state = _once(poison)
    m.get_submodule(target).register_full_backward_hook(hook)
    r = locate_nonfinite(m, _run(m))
    assert (r.phase, r.where, r.kind) == ("backward", target, "nan")
    assert r.message == f"non-finite (nan) in backward of {target}"
    assert state["n"] == 1
    assert all(p.grad is None for p in m.parameters())


def test_backward_poison_in_a_larger_module_with_checkpointing():
    # the same under activation checkpointing (forward hooks fire again during recomputation)
    m = apply_activation_checkpointing(_model())
    target = "model.layers.2.self_attn"

    def poison(mod, grad_input, grad_output):
        return (torch.full_like(grad_input[0], float("inf")), *grad_input[1:])  # (x, ctx)

    hook, _ = _once(poison)
    m.get_submodule(target).register_full_backward_hook(hook)
    r = locate_nonfinite(m, _run(m))
    assert (r.phase, r.where, r.kind) == ("backward", target, "inf")


def test_gradient_arriving_nonfinite_blames_the_enclosing_module():
    m = _model()

    def poison(mod, grad_output):  # the gradient handed to o_proj is bad: self_attn's code made it
        return (torch.full_like(grad_output[0], float("nan")),)

    hook, _ = _once(poison)
    m.model.layers["1"].self_attn.o_proj.register_full_backward_pre_hook(hook)
    r = locate_nonfinite(m, _run(m))
    assert (r.phase, r.where) == ("backward", "model.layers.1.self_attn")


def test_loss_and_parameter_grad_and_parameter():
    m = _model()
    ids, cu = _batch(m)
    r = locate_nonfinite(m, lambda: F.cross_entropy(m(ids, cu_seqlens=cu)[:-1], ids[1:]) * float("inf"))
    assert (r.phase, r.where, r.kind) == ("loss", "loss", "inf")
    assert r.message.startswith("non-finite (inf) in loss")

    # a loss whose own backward is non-finite (sqrt at 0): every module is fine, the loss is not
    r = locate_nonfinite(m, lambda: (m(ids, cu_seqlens=cu).sum() * 0).sqrt())
    assert (r.phase, r.where) == ("backward", "loss")
    # d sqrt(0) = inf, times the 0 factor = nan: the gradient reaching the model is already bad
    assert r.message == "non-finite (nan) in backward of the loss (the gradient reaching Gemma3ForCausalLM)"

    # only a parameter's accumulated gradient goes bad (a tensor hook on the weight)
    w = m.model.layers["0"].mlp.up_proj.weight
    h = w.register_hook(lambda g: g * float("nan"))
    r = locate_nonfinite(m, _run(m))
    h.remove()
    assert (r.phase, r.where) == ("parameter-grad", "model.layers.0.mlp.up_proj.weight")
    assert r.message.startswith("non-finite (nan) in gradient of parameter model.layers.0.mlp.up_proj.weight")

    # a parameter that is already non-finite is named before anything runs
    with torch.no_grad():
        m.model.layers["3"].post_feedforward_layernorm.weight[2] = float("-inf")
    r = locate_nonfinite(m, _run(m))
    assert (r.phase, r.where) == ("parameter", "model.layers.3.post_feedforward_layernorm.weight")
    assert _hook_count(m) == 0 and all(p.grad is None for p in m.parameters())


def test_hooks_removed_even_when_the_micro_batch_raises():
    m = _model()

    def run():
        m(torch.zeros(1, 4, dtype=torch.long))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        locate_nonfinite(m, run)
    assert _hook_count(m) == 0


def test_nonfinite_model_input_is_named_as_input():
    m = _model()
    emb = torch.randn(1, 6, m.config.hidden_size)
    emb[0, 2, 1] = float("nan")
    r = locate_nonfinite(m, lambda: m(inputs_embeds=emb).logsumexp(-1).mean())
    assert (r.phase, r.where) == ("input", "Gemma3ForCausalLM")
    assert r.message == "non-finite (nan) in the input of Gemma3ForCausalLM"
