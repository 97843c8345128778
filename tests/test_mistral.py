"""Mistral against transformers 5.23 MistralForCausalLM on tiny random configs (fp32)."""

import pytest
import torch
from conftest import hf_model_like

import gemmaforge
from gemmaforge import from_config
from gemmaforge.formats.hf import save_hf
from gemmaforge.models.registry import preset


def _model(**kw):
    torch.manual_seed(0)
    m = from_config(preset("mistral-tiny", **kw))
    for p in m.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.3)
    return m


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_match_transformers(window, backend):
    m = _model(sliding_window=window)
    hf = hf_model_like(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attn_backend=backend), hf(ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_packed_and_padded_match_transformers_per_document():
    m = _model(sliding_window=5)
    hf = hf_model_like(m)
    docs = [torch.randint(0, 320, (n,)) for n in (9, 1, 14)]
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
    mask = torch.tensor([[1] * 9 + [0] * 5, [0] * 13 + [1], [1] * 14])
    padded = torch.zeros(3, 14, dtype=torch.long)
    padded[0, :9], padded[1, 13:], padded[2] = docs[0], docs[1], docs[2]
    with torch.no_grad():
        packed = m(torch.cat(docs), cu_seqlens=cu)
        pad_out = m(padded, attention_mask=mask)
        for i, d in enumerate(docs):
            ref = hf(d[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(pad_out[i][mask[i].bool()], ref, atol=1e-4, rtol=0)


def test_hf_roundtrip(tmp_path):
    import transformers

    m = _model(sliding_window=6)
    save_hf(m, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(hf).__name__ == "MistralForCausalLM"
    ids = torch.randint(0, 320, (1, 12))
    back = gemmaforge.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, m(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)


def test_generation_with_cache_equals_full_forward():
    m = _model(sliding_window=4)
    ids = torch.randint(0, 320, (1, 15))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(32)
        steps = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
