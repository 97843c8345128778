"""The real embedded Gemma 3 270M against transformers loading the same GGUF (gguf_file=)."""

import pytest
import torch
from conftest import run_cli

from gemmaforge.errors import InputError
from gemmaforge.inference.generate import generate_ids

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, 3 little pigs",
    "Ünïcödé and emoji 🚀 work:",
]

pytestmark = pytest.mark.slow


def test_encode_equals_transformers_tokenizer(real_model, hf_gguf_tok):
    _, tok = real_model
    for p in PROMPTS:
        assert tok.encode(p) == hf_gguf_tok.encode(p), p
        assert tok.encode(p)[0] == 2  # BOS first


def test_greedy_32_tokens_equal_transformers(real_model, hf_gguf_model):
    model, tok = real_model
    for p in PROMPTS[:3]:
        ids = tok.encode(p)
        ours = generate_ids(model, ids, max_new_tokens=32, stop_ids=set()).ids
        with torch.inference_mode():
            ref = hf_gguf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == ref, (p, tok.decode(ours), tok.decode(ref))


def test_logits_equal_transformers(real_model, hf_gguf_model):
    model, tok = real_model
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_gguf_model(ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_sampling_is_seeded(real_model):
    from gemmaforge import generate

    model, tok = real_model
    a = generate(model, tok, PROMPTS[0], max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = generate(model, tok, PROMPTS[0], max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a == b and len(a) > 0


def test_ids_outside_vocab(real_model):
    model, _ = real_model
    with pytest.raises(InputError, match="token id 262144 is outside the vocabulary"):
        model(torch.tensor([[2, 262144]]))


def test_cli_generate_and_bad_inputs(real_gguf, tmp_path):
    r = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens/s" in r.stderr
    # a prompt longer than the model's context (32768 tokens)
    r = run_cli("generate", "--prompt", "a " * 40000, "--max-new-tokens", "1")
    assert r.returncode == 2 and "longer than the model's context" in r.stderr and "Traceback" not in r.stderr
    # a truncated GGUF
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(real_gguf.read_bytes()[: 50_000_000])
    r = run_cli("generate", "--model", str(bad), "--prompt", "hi")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], r.stderr
