"""gemmaforge.score: chunked per-token log-probs vs transformers, gradients, policy losses, GRPO, CLI."""

import json

import pytest
import torch
from conftest import hf_model_like, run_cli

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.data.packing import Document, collate_rows, pack_documents
from gemmaforge.rl.score import (
    RolloutBatch,
    grpo_advantages,
    pack_rollouts,
    policy_loss,
    score,
    token_document_ids,
)

CAP = 5.0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and stalls badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = from_config(preset("gemma-3-tiny", final_logit_softcapping=CAP, **kw))
    for p in m.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, 0, 0.3)
    with torch.no_grad():
        m.model.norm.weight.fill_(12.0)  # logits of several units: the soft-cap's tanh is far from linear
    return m


LENGTHS = [1, 7, 13, 2, 9]  # a 1-token document (nothing to predict), one longer than the window (8)


def _packed(vocab, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


@pytest.fixture(scope="module")
def tiny():
    m = _model()
    return m, hf_model_like(m)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_transformers_per_document(tiny, temperature):
    m, hf = tiny
    ids, cu = _packed(m.config.vocab_size)
    with torch.no_grad():
        out = score(m, ids, cu, temperature=temperature, return_entropy=True, chunk_size=5)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == ids.shape == out.valid.shape
    checked = 0
    for i in range(len(LENGTHS)):
        s, e = int(cu[i]), int(cu[i + 1])
        with torch.no_grad():
            logits = hf(ids[s:e][None], use_cache=False).logits[0].float()  # each document alone
        assert logits.abs().max() > 0.6 * CAP  # the soft-cap matters for this check
        logp = torch.log_softmax(logits / temperature, dim=-1)
        ref_lp = logp[:-1].gather(1, ids[s + 1:e, None]).squeeze(1)
        ref_ent = -(logp.exp() * logp).sum(-1)[:-1]
        assert out.valid[s:e - 1].all() and not out.valid[e - 1]
        assert out.logprobs[e - 1] == 0 and out.entropy[e - 1] == 0
        torch.testing.assert_close(out.logprobs[s:e - 1], ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[s:e - 1], ref_ent, atol=1e-5, rtol=0)
        checked += e - s - 1
    assert checked == sum(LENGTHS) - len(LENGTHS)


def test_labels_and_batched_rows_agree_with_the_plain_row():
    m = _model()
    g = torch.Generator().manual_seed(1)
    docs = [Document(torch.randint(0, 512, (n,), generator=g).tolist(), [False] * 3 + [True] * (n - 3))
            for n in (6, 11, 4, 9)]
    rows = pack_documents(docs, 16)
    batch = collate_rows(rows)
    with torch.no_grad():
        out = score(m, batch["input_ids"], batch["cu_seqlens"], labels=batch["labels"], return_entropy=True)
        for b, row in enumerate(rows):
            plain = score(m, row.input_ids, row.cu_seqlens, return_entropy=True)
            v = row.labels != -100
            assert torch.equal(out.valid[b], v)
            assert bool((plain.valid | ~v).all())  # every label is a next token of its document
            torch.testing.assert_close(out.logprobs[b][v], plain.logprobs[v], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.entropy[b][v], plain.entropy[v], atol=1e-5, rtol=0)
            assert bool((out.logprobs[b][~v] == 0).all())
        # [B, S] without cu_seqlens: one document per row, the last column predicts nothing
        ids = torch.randint(0, 512, (3, 7), generator=g)
        two = score(m, ids)
        assert not two.valid[:, -1].any() and two.valid[:, :-1].all()
        for b in range(3):
            torch.testing.assert_close(two.logprobs[b], score(m, ids[b]).logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_equal_the_naive_full_logits_path(temperature):
    m = _model(seed=3)
    ids, cu = _packed(m.config.vocab_size, seed=3)
    g = torch.Generator().manual_seed(5)
    # per-token weights of a mean-style loss (gradients O(1): the 1e-5 bound is absolute)
    w_lp, w_ent = torch.randn(2, len(ids), generator=g) / len(ids)

    out = score(m, ids, cu, temperature=temperature, return_entropy=True, chunk_size=4)  # several chunks
    ((out.logprobs * w_lp).sum() + (out.entropy * w_ent).sum()).backward()
    chunked = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    logits = m(ids, cu_seqlens=cu) / temperature  # [T, V], soft-capped by the model
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.zeros_like(ids)
    tgt[:-1] = ids[1:]
    lp = logp.gather(1, tgt[:, None]).squeeze(1) * out.valid
    ent = -(logp.exp() * logp).sum(-1) * out.valid
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    assert max(float(p.grad.abs().max()) for p in m.parameters()) > 1.0
    for n, p in m.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, atol=1e-5, rtol=0, msg=n)
    torch.testing.assert_close(out.logprobs.detach(), lp.detach(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- policy losses


def test_policy_loss_values_and_stats():
    lp = torch.tensor([-1.0, -0.5, -1.5, -3.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.0, -1.0, 50.0])  # the last one is outside the mask and absurd
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    loss, st = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    r = torch.exp(torch.tensor([0.0, 0.5, -0.5]))
    a = torch.tensor([1.0, 1.0, -1.0])
    want = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2)).mean()
    assert abs(float(loss.detach()) - float(want)) < 1e-6 and torch.isfinite(loss)
    # the clipped term is active for A > 0 with r > 1.2 and for A < 0 with r < 0.8
    assert st["tokens"] == 3 and abs(st["clip_frac"] - 2 / 3) < 1e-6
    assert abs(st["ratio_mean"] - float(r.mean())) < 1e-6
    d = torch.tensor([0.0, 0.5, -0.5])
    assert abs(st["approx_kl"] - float((torch.exp(-d) - 1 + d).mean())) < 1e-6
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[3] == 0
    assert lp.grad[0] != 0 and lp.grad[1] == 0 and lp.grad[2] == 0  # clipped tokens get no gradient
    # clip-higher: a larger upper bound un-clips an A > 0 token with r = exp(0.3)
    lp2 = torch.tensor([0.3], requires_grad=True)
    l_lo, s_lo = policy_loss(lp2, torch.zeros(1), torch.ones(1), torch.ones(1, dtype=torch.bool), clip_eps=0.2)
    l_hi, s_hi = policy_loss(lp2, torch.zeros(1), torch.ones(1), torch.ones(1, dtype=torch.bool), clip_eps=0.2,
                             clip_eps_high=0.5)
    assert s_lo["clip_frac"] == 1.0 and s_hi["clip_frac"] == 0.0
    assert abs(float(l_lo.detach()) + 1.2) < 1e-6
    assert abs(float(l_hi.detach()) + float(torch.exp(torch.tensor(0.3)))) < 1e-6


def test_policy_loss_kl_and_global_normaliser():
    torch.manual_seed(0)
    lp = torch.randn(2, 5) - 2
    ref = lp + 0.1 * torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.tensor([[1.0], [-0.5]])  # per sequence, broadcast to tokens
    for est in ("k1", "k2", "k3"):
        loss0, st0 = policy_loss(lp, lp, adv, mask, ref_logprobs=lp, kl_estimator=est)
        assert st0["kl"] == 0.0 and st0["approx_kl"] == 0.0 and st0["clip_frac"] == 0.0
    loss, st = policy_loss(lp, lp, adv, mask, kl_coef=0.5, ref_logprobs=ref)
    d = (ref - lp)[mask]
    k3 = (torch.exp(d) - d - 1).mean()
    pg = -(adv.expand(2, 5)[mask]).mean()
    assert abs(st["kl"] - float(k3)) < 1e-6 and abs(float(loss) - float(pg + 0.5 * k3)) < 1e-6
    half, _ = policy_loss(lp, lp, adv, mask, kl_coef=0.5, ref_logprobs=ref, num_tokens=16)
    assert abs(float(half) - float(loss) * 8 / 16) < 1e-6
    empty, st_e = policy_loss(lp, lp, adv, torch.zeros_like(mask))
    assert float(empty) == 0.0 and st_e["tokens"] == 0
    with pytest.raises(ValueError):
        policy_loss(lp, lp, adv, mask, kl_coef=0.1)


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = grpo_advantages(r, group_size=4)
    g0 = r[:4]
    torch.testing.assert_close(a[:4], (g0 - g0.mean()) / (g0.std() + 1e-6))
    assert bool((a[4:] == 0).all())  # all-equal group: no signal
    torch.testing.assert_close(grpo_advantages(r, 4), a)
    torch.testing.assert_close(grpo_advantages(r, group_size=4, normalize_std=False)[:4], g0 - 0.5)
    # interleaved group ids in any order give the same per-sample answer
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])
    ids = torch.tensor([0, 0, 0, 0, 9, 9, 9, 9])
    torch.testing.assert_close(grpo_advantages(r[perm], ids[perm]), a[perm])
    assert float(grpo_advantages([2.0], group_size=1)) == 0.0
    with pytest.raises(ValueError):
        grpo_advantages(r, group_size=3)


def test_pack_rollouts_layout():
    pairs = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9]), ([10, 11], []), ([12, 13, 14, 15, 16, 17], [18, 19])]
    batches = list(pack_rollouts(pairs, max_tokens=8))
    assert [b.num_tokens for b in batches] == [5, 6, 8]  # in order, never split, oversize pairs alone
    seen = []
    for b in batches:
        for span in b.spans:
            k, start, p, c = span
            sl = RolloutBatch.completion_slice(span)
            assert b.labels[sl].tolist() == pairs[k][1] and b.input_ids[start:start + p].tolist() == pairs[k][0]
            seen.append(k)
        assert int((b.labels != -100).sum()) == sum(s[3] for s in b.spans)
    assert seen == [0, 1, 2, 3]
    cu = batches[1].cu_seqlens
    assert token_document_ids(cu).tolist() == [0, 0, 0, 0, 1, 1]


# --------------------------------------------------------------------------- a GRPO loop learns


def _sample(model, prompt, n_new, G, gen):
    """G sampled continuations of one prompt (full forward per step: the model is tiny)."""
    x = torch.tensor(prompt)[None].repeat(G, 1)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(x)[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            x = torch.cat([x, nxt], 1)
    return x[:, len(prompt):].tolist()


def test_grpo_steps_increase_a_toy_reward():
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", vocab_size=16, final_logit_softcapping=CAP))
    model.train()
    target, G, n_new, steps = 3, 8, 6, 10
    prompts = [[1, 5, 7], [1, 9, 2, 4]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    mean_rewards = []
    for _ in range(steps):
        pairs, rewards, groups = [], [], []
        for gi, p in enumerate(prompts):
            for c in _sample(model, p, n_new, G, gen):
                pairs.append((p, c))
                rewards.append(sum(t == target for t in c) / n_new)
                groups.append(gi)
        mean_rewards.append(sum(rewards) / len(rewards))
        adv = grpo_advantages(rewards, groups)
        (b,) = pack_rollouts(pairs, max_tokens=10_000)
        tok_adv = adv[torch.tensor([s[0] for s in b.spans])][token_document_ids(b.cu_seqlens)]
        with torch.no_grad():
            old = score(model, b.input_ids, b.cu_seqlens, labels=b.labels).logprobs
        for _ in range(2):  # two updates per batch: the ratio moves away from 1
            out = score(model, b.input_ids, b.cu_seqlens, labels=b.labels)
            loss, st = policy_loss(out.logprobs, old, tok_adv, out.valid, clip_eps=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert st["tokens"] == len(pairs) * n_new and torch.isfinite(loss)
    first, last = sum(mean_rewards[:3]) / 3, sum(mean_rewards[-3:]) / 3
    assert last > first + 0.1, mean_rewards


# --------------------------------------------------------------------------- CLI

def _score_cli(*args):
    """`gemmaforge score ...` in a subprocess (one thread: tiny tensors, busy machines)."""
    return run_cli("score", *args, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def small_dir(real_gguf, tmp_path_factory):
    """A small random Gemma 3 with the real 262k vocabulary and tokenizer: CLI runs take seconds."""
    from gemmaforge.formats.hf import save_hf
    from gemmaforge.formats.gguf import gguf_tokenizer

    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", vocab_size=262_144, hidden_size=32, intermediate_size=64,
                               head_dim=16, num_attention_heads=2, num_key_value_heads=1))
    d = tmp_path_factory.mktemp("small_score") / "model"
    save_hf(model, d, tokenizer=gguf_tokenizer(real_gguf))
    return d


ROLLOUTS = [
    {"prompt": "The capital of France is", "completion": " Paris, of course.", "id": "a"},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"prompt_ids": [2, 651, 6037], "completion_ids": [529, 7001, 236761, 1]},
    {"prompt": "Say nothing:", "completion": ""},
    {"prompt": "Once upon a time", "completion": " there was a fox who jumped over the lazy dog " * 3},
]


def _expected(model, tok, rows, temperature=1.0):
    out = []
    for r in rows:
        if "prompt" in r:
            p, c = tok.encode(r["prompt"], add_bos=True), tok.encode(r["completion"], add_bos=False)
        else:
            p, c = r["prompt_ids"], r["completion_ids"]
        ids = torch.tensor(p + c)
        with torch.no_grad():
            res = score(model, ids, temperature=temperature, return_entropy=True)
        out.append((res.logprobs[len(p) - 1:len(p) - 1 + len(c)], res.entropy[len(p) - 1:len(p) - 1 + len(c)]))
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n" + "".join(json.dumps(r) + "\n"
                                                                                      for r in rows[2:]))


def test_score_cli_matches_the_api_and_reports_bad_lines(small_dir, tmp_path):
    import gemmaforge

    data, out = tmp_path / "rollouts.jsonl", tmp_path / "scores.jsonl"
    _write(data, ROLLOUTS)  # with a blank line in the middle (skipped)
    r = _score_cli("--model", str(small_dir), "--data", str(data), "--out", str(out), "--batch-tokens", "24",
                   "--temperature", "0.8")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(ROLLOUTS)
    model, tok = gemmaforge.from_pretrained(str(small_dir)), gemmaforge.load_tokenizer(str(small_dir))
    for row, got, (lp, ent) in zip(ROLLOUTS, lines, _expected(model, tok, ROLLOUTS, 0.8)):
        assert got["num_tokens"] == len(got["logprobs"]) == lp.numel()
        assert got.get("id") == row.get("id")
        assert max((abs(a - b) for a, b in zip(got["logprobs"], lp.tolist())), default=0) <= 1e-5
        assert abs(got["logprob_sum"] - sum(got["logprobs"])) <= 1e-6 * max(1, lp.numel())
        if lp.numel():
            assert all(x <= 0 for x in got["logprobs"]) and abs(got["entropy_mean"] - float(ent.mean())) <= 1e-5
        else:
            assert got["entropy_mean"] is None and got["logprob_sum"] == 0
    assert lines[2]["num_tokens"] == 4 and lines[1]["num_tokens"] == len(tok.encode(" 4", add_bos=False))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROLLOUTS[0]) + "\n" + json.dumps(ROLLOUTS[1]) + "\n" + '{"prompt": "x"}\n')
    r = _score_cli("--model", str(small_dir), "--data", str(bad), "--out", str(tmp_path / "o.jsonl"))
    errors = [x for x in r.stderr.splitlines() if x.startswith("gemmaforge: error:")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and f"{bad}:3" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_score_cli_with_a_lora_adapter(small_dir, tmp_path):
    import gemmaforge
    from gemmaforge.adapters.lora import LoraConfig, apply_lora
    from gemmaforge.formats.peft import save_adapter

    model = gemmaforge.from_pretrained(str(small_dir))
    apply_lora(model, LoraConfig(rank=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    rows = ROLLOUTS[:3]
    data, out = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _score_cli("--model", str(small_dir), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    tok = gemmaforge.load_tokenizer(str(small_dir))
    base = gemmaforge.from_pretrained(str(small_dir))
    for got, (lp, _), (lp0, _) in zip(lines, _expected(model, tok, rows), _expected(base, tok, rows)):
        assert max(abs(a - b) for a, b in zip(got["logprobs"], lp.tolist())) <= 1e-5
        assert max(abs(a - b) for a, b in zip(got["logprobs"], lp0.tolist())) > 1e-3  # the adapter is applied


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "hi"}', 'expected "prompt"+"completion"'),
    ('{"prompt": "p"}', 'lacks "completion"'),
    ('{"prompt": "p", "completion": 3}', '"completion" must be a string'),
    ('{"prompt_ids": [2], "completion_ids": ["x"]}', "list of integers"),
    ('{"prompt_ids": [], "completion_ids": [5]}', '"prompt_ids" is empty'),
    ('{"prompt": "p", "completion": "c", "prompt_ids": [2]}', "ambiguous"),
    ('{"prompt_ids": [2], "completion_ids": [512]}', "outside the vocabulary"),
    ('{"prompt_ids": [2], "completion_ids": [5, 6, 7]}', "longer than the model's context"),
])
def test_score_data_errors_name_file_and_line(tmp_path, line, needle):
    from gemmaforge.errors import DataError
    from gemmaforge.rl.rollouts import encode_rollouts, parse_rollouts

    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt_ids": [2, 3], "completion_ids": [4]}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        encode_rollouts(parse_rollouts(f), vocab=512, max_len=3, get_tokenizer=None)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and needle in msg and "\n" not in msg, msg


def test_score_cli_module_registers_without_side_effects():
    import argparse

    from gemmaforge.cli import score as score_cli

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    score_cli.register(sub)
    a = p.parse_args(["score", "--data", "d.jsonl", "--out", "o.jsonl", "--adapter", "ad", "--temperature", "0.5",
                      "--batch-tokens", "100"])
    assert a.func is score_cli.cmd_score and a.adapter == "ad" and a.temperature == 0.5 and a.batch_tokens == 100
