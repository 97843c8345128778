"""CPU bf16 training (issue B item 8): the dtype rule of ``--dtype auto`` and the correctness of the bf16
path (fused loss over an fp32 head, norms, a whole step) on tiny configs.

The bf16 path is forced on through ``head_loss.native_bf16`` where this CPU lacks native bf16, so these
checks run (slowly, on tiny shapes) on every machine; the speed is measured in bench/bench_cpu_bf16.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import ByteTok, corpus, tiny_model

from gemmaforge import cpu_policy
from gemmaforge.errors import ConfigError
from gemmaforge.ops import cpu_caps, head_loss
from gemmaforge.ops.head_loss import chunked_cross_entropy
from gemmaforge.ops.rms_norm import scaled_rms_norm
from gemmaforge.train import Trainer, TrainConfig
from gemmaforge.train.objectives import CausalLMLoss
from gemmaforge.train.step import forward_backward
from gemmaforge.data import collate_rows, pack_documents


@pytest.fixture
def bf16_path(monkeypatch):
    """The CPU bf16 loss path on, whatever this CPU is."""
    monkeypatch.setattr(head_loss, "native_bf16", lambda: True)


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("name,want", [("float32", None), ("fp32", None), ("bfloat16", torch.bfloat16),
                                       ("bf16", torch.bfloat16), ("BF16", torch.bfloat16)])
def test_forced_dtypes(name, want):
    assert cpu_policy.training_dtype(name, "cpu") is want


def test_auto_follows_native_bf16_on_cpu_and_is_bf16_on_cuda(monkeypatch):
    assert cpu_policy.training_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(cpu_policy, "native_bf16", lambda: True)
    assert cpu_policy.training_dtype("auto", "cpu") is torch.bfloat16
    assert cpu_policy.training_dtype(None, "cpu") is torch.bfloat16
    monkeypatch.setattr(cpu_policy, "native_bf16", lambda: False)
    assert cpu_policy.training_dtype("auto", "cpu") is None
    assert "fp32" in cpu_policy.describe_dtype("auto", "cpu", None)


def test_a_wrong_dtype_is_one_clear_error():
    with pytest.raises(ConfigError, match="--dtype float16: choose auto"):
        cpu_policy.training_dtype("float16", "cpu")


@pytest.mark.parametrize("flags,cap,mkldnn,probe,want", [
    ([], "AVX512", True, 4.0, False),  # no bf16 instructions: emulated, ~300x slower
    (["avx512_bf16"], "AVX2", True, 4.0, False),  # ATen capped below AVX512
    (["amx_bf16"], "AVX512", False, 4.0, False),  # no oneDNN in the build
    (["amx_bf16"], "AVX512", True, 0.5, False),  # flags reported, but bf16 measured slower
    (["amx_bf16", "avx512_bf16"], "AVX512", True, 4.0, True),
])
def test_native_bf16_needs_flags_vector_width_onednn_and_a_faster_probe(monkeypatch, flags, cap, mkldnn, probe, want):
    monkeypatch.setattr(cpu_caps, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(cpu_caps, "_bf16_probe", lambda: probe)
    cpu_caps.native_bf16.cache_clear()
    try:
        assert cpu_caps.native_bf16() is want
    finally:
        cpu_caps.native_bf16.cache_clear()


def test_flags_come_from_the_cpu():
    flags = cpu_caps.cpu_bf16_flags()
    assert set(flags) <= set(cpu_caps.BF16_FLAGS)
    with open("/proc/cpuinfo") as f:
        line = next((l for l in f if l.startswith("flags")), "")
    assert set(flags) == set(line.split(":", 1)[-1].split()) & set(cpu_caps.BF16_FLAGS)


# ----------------------------------------------------------------------------- the parts

def test_fused_loss_bf16_hidden_over_fp32_head_matches_the_bf16_rounded_reference(bf16_path):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 64, 1000
    hid = (torch.randn(n, h, generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = -100
    loss = chunked_cross_entropy(hid, w, y, softcap=30.0, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and hid.grad.dtype == torch.bfloat16
    # reference: the same bf16 operands multiplied exactly in fp32
    hr = hid.detach().float().requires_grad_()
    wr = w.detach().bfloat16().float().requires_grad_()
    z = 30.0 * torch.tanh((hr @ wr.T) / 30.0)
    ref = torch.nn.functional.cross_entropy(z, y, reduction="sum")
    ref.backward()
    # the logits round once to bf16 (2^-9 relative): the sum over 36 tokens within a few 1e-3
    torch.testing.assert_close(loss, ref, rtol=3e-3, atol=0)
    torch.testing.assert_close(w.grad, wr.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(hid.grad.float(), hr.grad, rtol=2e-2, atol=2e-2)


def test_fused_loss_without_native_bf16_multiplies_in_fp32(monkeypatch):
    monkeypatch.setattr(head_loss, "native_bf16", lambda: False)
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(9, 32, generator=g).bfloat16()
    w = torch.randn(50, 32, generator=g)
    y = torch.randint(0, 50, (9,), generator=g)
    loss = chunked_cross_entropy(hid, w, y)
    ref = torch.nn.functional.cross_entropy(hid.float() @ w.T, y, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_norm_rounds_once_under_cpu_autocast():
    x = torch.randn(3, 8)
    w = torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the fp32 residual stream's norm feeds matmuls: bf16 out
        assert scaled_rms_norm(x, w, 1e-6, 1.0).dtype == torch.bfloat16
        # a bf16 matmul output's norm feeds the fp32 residual: fp32 out (no second rounding)
        out = scaled_rms_norm(x.bfloat16(), w, 1e-6, 1.0)
        assert out.dtype == torch.float32
    assert scaled_rms_norm(x, w, 1e-6, 1.0).dtype == torch.float32  # outside autocast: unchanged
    ref = x.bfloat16().float()
    ref = ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_kept_bf16_head_is_cast_once_per_step_and_refreshed_after_the_update(bf16_path):
    buffers = cpu_policy.HeadGradBuffer()
    w = torch.nn.Parameter(torch.randn(40, 16))
    h = torch.randn(4, 16).bfloat16()
    a = buffers.lowp(h, w)
    assert a is not None and a.dtype == torch.bfloat16 and torch.equal(a, w.detach().bfloat16())
    assert buffers.lowp(h, w) is a  # the same step: reused
    w.grad = None
    (w.sum()).backward()  # a gradient arrives: the optimizer may change the weight next
    with torch.no_grad():
        w.add_(1.0)
    b = buffers.lowp(h, w)
    assert torch.equal(b, w.detach().bfloat16())
    assert buffers.lowp(h.float(), w) is None  # an fp32 step keeps nothing


def test_a_bf16_step_tracks_the_fp32_step_and_keeps_fp32_master_weights(bf16_path):
    rows = pack_documents(corpus(12), 64)
    batches = [collate_rows(rows[i:i + 1]) for i in range(2)]
    results, grads = {}, {}
    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        model = tiny_model()
        head = cpu_policy.for_training(model)
        res = forward_backward(model, batches, CausalLMLoss(), autocast=dt)
        results[name] = res.loss
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        del head
    assert abs(results["bf16"] - results["fp32"]) / results["fp32"] < 1e-2
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos > 0.99, float(cos)


def test_trainer_bf16_on_cpu_trains_prints_and_saves_the_choice(tmp_path, bf16_path):
    logs = []
    docs = corpus()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=6, lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=128,
                      micro_batch_rows=1, eval_every=0, save_every=0, progress=False, eval_rows=2, seed=1,
                      dtype="bfloat16")
    tr = Trainer(cfg, model=tiny_model(), tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:],
                 log=logs.append)
    assert tr.autocast is torch.bfloat16
    summary = tr.run()
    assert summary["compute_dtype"] == "bfloat16"
    assert summary["val_after"]["val_loss"] < summary["val_before"]["val_loss"]
    assert any("bf16 autocast" in m for m in logs)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["compute_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


def test_trainer_float32_is_plain_fp32(tmp_path):
    docs = corpus()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, seq_len=64, batch_tokens=128, micro_batch_rows=1,
                      eval_every=0, save_every=0, progress=False, eval_rows=1, dtype="float32")
    tr = Trainer(cfg, model=tiny_model(), tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:],
                 log=lambda m: None)
    assert tr.autocast is None and tr.run()["compute_dtype"] == "float32"
