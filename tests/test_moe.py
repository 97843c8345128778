"""Gemma 4 MoE: router and experts against transformers 5.23, every implementation, expert parallelism."""

import subprocess
import sys
import textwrap

import pytest
import torch

from gemmaforge.layers.moe import Gemma4Experts, Gemma4Router
from gemmaforge.ops.grouped_experts import _Rows, grouped_mm_available
from gemmaforge.parallel.ep import apply_expert_parallel

E, H, I, K = 8, 32, 24, 3


def _hf_cfg(num_experts=E, top_k=K, hidden=H, inter=I, impl="grouped_mm"):
    import transformers

    cfg = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, layer_types=["full_attention"], enable_moe_block=True,
        num_experts=num_experts, top_k_experts=top_k, moe_intermediate_size=inter)
    cfg._experts_implementation = impl
    return cfg


def _pair(seed=0, impl="grouped_mm", **kw):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

    cfg = _hf_cfg(impl=impl, **kw)
    g = torch.Generator().manual_seed(seed)
    hr, he = Gemma4TextRouter(cfg), Gemma4TextExperts(cfg)
    with torch.no_grad():
        hr.proj.weight.normal_(0, 1.0, generator=g)
        hr.scale.normal_(1, 0.3, generator=g)
        hr.per_expert_scale.normal_(1, 0.3, generator=g)
        he.gate_up_proj.normal_(0, 0.2, generator=g)
        he.down_proj.normal_(0, 0.2, generator=g)
    r = Gemma4Router(cfg.hidden_size, cfg.num_experts, cfg.top_k_experts)
    e = Gemma4Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    r.load_state_dict(hr.state_dict())
    e.load_state_dict(he.state_dict())
    return (r, e), (hr, he)


def _run(router, experts, x, dy):
    for m in (router, experts):
        m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    probs, w, idx = router(x)
    y = experts(x, idx, w)
    y.backward(dy)
    grads = {"x": x.grad, **{f"router.{n}": p.grad for n, p in router.named_parameters()},
             **{f"experts.{n}": p.grad for n, p in experts.named_parameters()}}
    return probs, w, idx, y.detach(), grads


def test_router_equals_reference_weights_and_indices():
    (r, _), (hr, _) = _pair()
    x = torch.randn(200, H) * 3
    probs, w, idx = r(x)
    hp, hw, hidx = hr(x)
    assert probs.dtype == torch.float32
    assert torch.equal(idx, hidx)
    torch.testing.assert_close(w, hw, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, hp, atol=1e-7, rtol=0)
    # weights are renormalised over the top-k BEFORE the per-expert scale
    torch.testing.assert_close(w / r.per_expert_scale[idx], hp.gather(1, idx) / hp.gather(1, idx).sum(-1, keepdim=True))


def test_router_bf16_matches_reference():
    (r, _), (hr, _) = _pair()
    r, hr = r.to(torch.bfloat16), hr.to(torch.bfloat16)
    x = torch.randn(64, H).to(torch.bfloat16)
    _, w, idx = r(x)
    _, hw, hidx = hr(x)
    assert torch.equal(idx, hidx) and torch.equal(w, hw)


@pytest.mark.parametrize("impl", ["grouped", "padded", "segments", "reference"])
@pytest.mark.parametrize("hf_impl", ["grouped_mm", "eager"])
def test_experts_forward_backward_equal_reference(impl, hf_impl):
    if impl == "grouped" and not grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    ours, ref = _pair(impl=hf_impl)
    ours[1].impl = impl
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(300, H, generator=g), torch.randn(300, H, generator=g)
    *_, y, grads = _run(*ours, x, dy)
    *_, y_ref, grads_ref = _run(*ref, x, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-5, msg=name)


def test_padded_plan_buckets_and_fallback():
    balanced = torch.tensor([10, 11, 9, 10, 12, 10, 9, 11])
    rows = _Rows("padded", balanced)
    assert rows.kind == "padded" and len(rows.buckets) == 1 and rows.R == 8 * 12
    # one hot expert: padding every expert to its count would triple the work -> more buckets
    skewed = torch.tensor([40, 1, 2, 1, 10, 11, 9, 10])
    rows = _Rows("padded", skewed)
    assert rows.kind == "segments" or rows.R <= 1.2 * int(skewed.sum())
    # an expert nobody picked, and positions inside the padded buffer are unique
    sparse = torch.tensor([5, 0, 5, 6, 5, 4, 5, 6])
    rows = _Rows("padded", sparse)
    sorted_e = torch.repeat_interleave(torch.arange(8), sparse)
    pos = rows.positions(sorted_e)
    assert pos.unique().numel() == pos.numel() and int(pos.max()) < rows.R


@pytest.mark.parametrize("impl", ["padded", "segments"])
def test_unbalanced_routing_and_unused_experts(impl):
    """All tokens on two experts: the others get exactly zero gradient, results match the reference."""
    ours, ref = _pair(seed=3)
    ours[1].impl = impl
    for router in (ours[0], ref[0]):
        with torch.no_grad():
            router.proj.weight.zero_()
            router.proj.weight[2] = 5.0
            router.proj.weight[5] = 4.0
            router.proj.weight[6] = -3.0
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(64, H, generator=g).abs(), torch.randn(64, H, generator=g)
    *_, idx, y, grads = _run(*ours, x, dy)
    *_, y_ref, grads_ref = _run(*ref, x, dy)
    used = set(idx.flatten().tolist())
    assert len(used) < E
    for e in set(range(E)) - used:
        assert grads["experts.gate_up_proj"][e].abs().max() == 0
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-5, msg=name)


def test_frozen_experts_and_bf16():
    (r, e), _ = _pair()
    e.requires_grad_(False)
    x = torch.randn(40, H, requires_grad=True)
    _, w, idx = r(x)
    e(x, idx, w).sum().backward()
    assert x.grad is not None and r.proj.weight.grad is not None and e.gate_up_proj.grad is None
    eb = Gemma4Experts(E, H, I)
    eb.load_state_dict(e.state_dict())
    eb = eb.to(torch.bfloat16)
    with torch.no_grad():
        y32 = e(x, idx, w)
        y16 = eb(x.to(torch.bfloat16), idx, w)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05 * float(y32.abs().max()), rtol=0)


# ----------------------------------------------------------------------------- expert parallelism

_EP_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from gemmaforge.layers.moe import Gemma4Experts, Gemma4Router
    from gemmaforge.parallel.ep import apply_expert_parallel
    rank, world, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    E, H, I, K, T = 8, 32, 24, 3, 90
    router, experts = Gemma4Router(H, E, K), Gemma4Experts(E, H, I)
    with torch.no_grad():
        router.proj.weight.normal_(0, 1.0)
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x, dy = torch.randn(T, H), torch.randn(T, H)
    holder = torch.nn.Module()
    holder.router, holder.experts = router, experts
    apply_expert_parallel(holder, dist.group.WORLD)
    assert tuple(holder.experts.gate_up_proj.shape) == (E // world, 2 * I, H)
    lo, hi = rank * T // world, (rank + 1) * T // world  # this rank's tokens (uneven pair counts)
    xs = x[lo:hi].clone().requires_grad_(True)
    _, w, idx = holder.router(xs)
    y = holder.experts(xs, idx, w)
    y.backward(dy[lo:hi])
    g_router = holder.router.proj.weight.grad.clone()
    dist.all_reduce(g_router)  # replicated weight: data-parallel sum
    torch.save({"y": y.detach(), "dx": xs.grad, "g_router": g_router,
                "g_gate_up": holder.experts.gate_up_proj.grad, "g_down": holder.experts.down_proj.grad},
               f"{tmp}/rank{rank}.pt")
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    os._exit(0)  # the result is saved: no interpreter teardown (gloo's threads sometimes abort it)
''')


def test_expert_parallel_two_process_gloo_equals_one_process(tmp_path):
    script = tmp_path / "ep_worker.py"
    script.write_text(_EP_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    T = 90
    router, experts = Gemma4Router(H, E, K), Gemma4Experts(E, H, I)
    with torch.no_grad():
        router.proj.weight.normal_(0, 1.0)
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x, dy = torch.randn(T, H), torch.randn(T, H)
    _, _, _, y, grads = _run(router, experts, x, dy)
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), grads["x"], atol=1e-5, rtol=0)
    torch.testing.assert_close(res[0]["g_router"], grads["router.proj.weight"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["g_gate_up"] for r in res]), grads["experts.gate_up_proj"],
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["g_down"] for r in res]), grads["experts.down_proj"],
                               atol=1e-4, rtol=1e-5)


def test_expert_parallel_rejects_indivisible_experts(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    m = torch.nn.Module()
    m.experts = Gemma4Experts(6, 8, 4)
    with pytest.raises(ValueError, match="not divisible"):
        apply_expert_parallel(m, object())


@pytest.mark.parametrize("impl", ["grouped", "padded", "segments"])
def test_no_tokens_and_unaligned_sizes(impl):
    """Zero tokens (an empty micro-batch or EP rank) and sizes the grouped kernel cannot take (I=6)."""
    e = Gemma4Experts(4, 8, 6)
    torch.nn.init.normal_(e.gate_up_proj)
    torch.nn.init.normal_(e.down_proj)
    e.impl = impl
    ref = Gemma4Experts(4, 8, 6)
    ref.load_state_dict(e.state_dict())
    ref.impl = "reference"
    for T in (0, 7):
        g = torch.Generator().manual_seed(T)
        x, idx = torch.randn(T, 8, generator=g), torch.randint(0, 4, (T, 2), generator=g)
        w = torch.rand(T, 2, generator=g)
        torch.testing.assert_close(e(x, idx, w), ref(x, idx, w), atol=1e-5, rtol=0)
    assert e.resolve_impl(x) != "grouped"
