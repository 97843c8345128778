"""Gemma 3 against transformers 5.23 Gemma3ForCausalLM on tiny random configs (fp32)."""

import pytest
import torch
from conftest import hf_model_like

from gemmaforge import from_config
from gemmaforge.layers.rope import RopeSpec
from gemmaforge.models.common.config import FULL, SLIDING
from gemmaforge.models.registry import preset

CASES = {
    # GQA, head_dim != hidden/heads, qpas != head_dim, linear scaling on full layers, window 8 < seq 40
    "tiny": {},
    "softcaps": dict(attn_logit_softcapping=50.0, final_logit_softcapping=3.0),
    "mha_default_pattern": dict(num_key_value_heads=4, num_hidden_layers=7, layer_types=[],
                                rope={FULL: RopeSpec(1_000_000.0), SLIDING: RopeSpec(10_000.0)}),
    "mqa_window_1": dict(num_key_value_heads=1, sliding_window=1),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_match_transformers(case, backend):
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", **CASES[case]))
    for p in model.parameters():  # non-zero norms so (1+w) matters
        if p.dim() == 1:
            torch.nn.init.normal_(p, 0, 0.5)
    hf = hf_model_like(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        ours = model(ids, attn_backend=backend)
        ref = hf(ids, use_cache=False).logits
    assert ours.shape == ref.shape == (3, 40, model.config.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_final_softcap_is_applied():
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", final_logit_softcapping=0.5))
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        z = model(ids)
        ref = hf_model_like(model)(ids, use_cache=False).logits
    assert z.abs().max() <= 0.5
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=0)


def test_bf16_embed_scale_is_cast_first():
    model = from_config(preset("gemma-3-tiny", hidden_size=640, intermediate_size=64, num_attention_heads=4))
    model = model.to(torch.bfloat16)
    ids = torch.tensor([[5]])
    emb = model.embed(ids)
    expected = model.model.embed_tokens.weight[5] * torch.tensor(25.25, dtype=torch.bfloat16)
    torch.testing.assert_close(emb[0, 0], expected, atol=0, rtol=0)
    assert torch.tensor(640 ** 0.5).to(torch.bfloat16).item() == 25.25


def test_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny"))
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(64)
        outs = [model(ids[:, :7], cache=cache)]
        for t in range(7, 30):
            outs.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    # sliding layers keep at most the window (minus the slot of the next query)
    for i, t in enumerate(model.config.layer_types):
        if t == SLIDING:
            assert cache.stored_tokens(i) == model.config.sliding_window - 1
        else:
            assert cache.stored_tokens(i) == 30


def test_cpu_inference_head_in_vocabulary_blocks_equals_one_product(monkeypatch):
    """On CPU, 2..512 tokens' logits are formed in vocabulary blocks (faster than MKL's one
    ``h @ W.T`` over a 262k table there); logits and gradients equal ``F.linear``'s. One token or
    more tokens than the range take ``F.linear``; the model's forward uses the head."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    import gemmaforge.cpu_policy as B

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket == torch.ops.aten.mm:
                CountMM.n += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(B, "HEAD_VOCAB_BLOCK", 7)
    monkeypatch.setattr(B, "HEAD_BLOCKED_ROWS", (2, 40))
    torch.manual_seed(0)
    m = B.for_inference(from_config(preset("gemma-3-tiny")))
    assert isinstance(m.lm_head, B.CPUHead)
    w = m.lm_head.weight
    V, H = w.shape
    blocks = -(-V // 7)
    assert V % 7  # the last block is partial
    for rows, calls in ((1, 1), (2, blocks), (13, blocks), (40, blocks), (41, 1)):
        h = torch.randn(1, rows, H)
        CountMM.n = 0
        with torch.no_grad(), CountMM():
            got = B.head_product(h, w)
        assert CountMM.n == calls, (rows, CountMM.n)
        torch.testing.assert_close(got, F.linear(h, w), rtol=1e-6, atol=1e-6)
    h = torch.randn(1, 13, H, requires_grad=True)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(1, 13, V)
    B.head_product(h, w).backward(g)
    F.linear(h2, w2).backward(g)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, V, (1, 13))
    with torch.no_grad():
        blocked = m(ids)
        monkeypatch.setattr(B, "HEAD_BLOCKED_ROWS", (2, 1))  # an empty range: F.linear always
        plain = m(ids)
    torch.testing.assert_close(blocked, plain, rtol=1e-6, atol=1e-6)
