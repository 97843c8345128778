"""DPO: the loss and its gradients against transformers, packing, the reference, the Trainer, the CLI, the real 270M."""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model_like, run_cli
from test_train import ByteTok

from gemmaforge import from_config, preset
from gemmaforge.adapters.lora import LoraConfig, adapters_disabled, apply_lora
from gemmaforge.rl import dpo_loss
from gemmaforge.rl.dpo import PreferencePair, collate_pairs, pack_pairs
from gemmaforge.train import TrainConfig, Trainer, read_metrics
from gemmaforge.train.objectives import DPOLoss
from gemmaforge.train.sources import Reference
from gemmaforge.train.step import StepLayout, micro_batch_loss

TOK = ByteTok()


def tiny(seed=0):
    torch.manual_seed(seed)
    m = from_config(preset("gemma-3-tiny", vocab_size=264, sliding_window=16))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                torch.nn.init.normal_(p, 0, 0.5)  # random norm weights: a wrong (1 + w) convention shows
    return m.train()


def make_pairs(n=40, seed=0):
    """``"{a} plus one is"`` -> the right sum preferred over a wrong one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a = int(torch.randint(0, 50, (1,), generator=g))
        wrong = a + int(torch.randint(2, 9, (1,), generator=g))
        out.append(PreferencePair(TOK.encode(f"{a} plus one is"), TOK.encode(f" {a + 1}.", add_bos=False) + [1],
                                  TOK.encode(f" {wrong} or so.", add_bos=False) + [1], f"pairs:{i + 1}"))
    return out


def hf_seq_logps(hf, pair: PreferencePair, which: str) -> torch.Tensor:
    """Summed log-probs of the completion, from transformers' logits of prompt + completion on its own."""
    comp = getattr(pair, which)
    ids = torch.tensor([pair.prompt + comp])
    logits = hf(ids).logits[0].float()
    lp = F.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[len(pair.prompt) - 1:].sum()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_transformers(loss_type):
    """Two pairs packed in one row (4 documents): the DPO / IPO loss and every weight gradient equal a
    direct computation from transformers' log-probs of each sequence run on its own (<= 1e-5)."""
    policy, ref = tiny(0), tiny(1)
    pairs = make_pairs(2, seed=3)
    rows = pack_pairs(pairs, 96)
    assert len(rows) == 1 and rows[0].num_pairs == 2
    batch = collate_pairs(rows)
    batch["ref_logprobs"] = Reference(policy, ref.eval()).logprobs(batch)
    obj = DPOLoss(beta=0.5, loss_type=loss_type)
    loss = micro_batch_loss(policy, batch, obj, StepLayout()) / obj.count(batch)
    loss.backward()

    hf, hf_ref = hf_model_like(policy), hf_model_like(ref)
    with torch.no_grad():
        rc = torch.stack([hf_seq_logps(hf_ref, p, "chosen") for p in pairs])
        rr = torch.stack([hf_seq_logps(hf_ref, p, "rejected") for p in pairs])
    pc = torch.stack([hf_seq_logps(hf, p, "chosen") for p in pairs])
    pr = torch.stack([hf_seq_logps(hf, p, "rejected") for p in pairs])
    if loss_type == "ipo":
        nc = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float32)
        nr = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float32)
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        direct = ((pc - rc) - (pr - rr) - 1 / (2 * 0.5)).square().mean()
    else:
        direct = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    direct.backward()
    torch.testing.assert_close(loss.detach(), direct.detach(), atol=1e-5, rtol=0)
    assert float(direct.detach()) > 0.05  # not a degenerate zero
    hp = dict(hf.named_parameters())
    n = 0
    for name, p in policy.named_parameters():
        g_hf = hp[name].grad if name in hp else hp["model.embed_tokens.weight"].grad
        torch.testing.assert_close(p.grad, g_hf, atol=1e-5, rtol=1e-4, msg=name)
        n += 1
    assert n > 10
    m = obj.pop_metrics()
    assert m["reward_chosen"][1] == 2 and abs(m["reward_chosen"][0] - float(0.5 * (pc - rc).sum())) < 1e-5


def test_dpo_loss_function_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]))
    losses, c, r = dpo_loss(pc, pr, rc, rr, beta=0.2)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-0.2 * h)))
    torch.testing.assert_close(c, 0.2 * (pc - rc))
    torch.testing.assert_close(r, 0.2 * (pr - rr))


def test_packed_pair_equals_chosen_and_rejected_run_separately():
    """Chosen and rejected of a pair share a row with no attention between them: their sequence log-probs
    equal those of rows holding one sequence each (and of the pair packed beside another pair)."""
    model = tiny(0).eval()
    pairs = make_pairs(3, seed=5)
    obj = DPOLoss()
    zero = lambda b: {**b, "ref_logprobs": torch.zeros(b["input_ids"].shape)}  # noqa: E731

    def seq_logps(rows):
        b = zero(collate_pairs(rows))
        with torch.no_grad():
            h = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], return_hidden=True)
            return obj.sequence_logprobs(model, h.reshape(-1, h.shape[-1]), obj.targets(b))[0]

    packed = seq_logps(pack_pairs(pairs, 256))  # all three pairs in one row
    for k, p in enumerate(pairs):
        alone = seq_logps(pack_pairs([p], 64))
        torch.testing.assert_close(packed[2 * k:2 * k + 2], alone, atol=1e-5, rtol=0)
        for j, comp in enumerate((p.chosen, p.rejected)):
            ids = torch.tensor([p.prompt + comp])
            with torch.no_grad():
                lp = F.log_softmax(model.logits(model(ids, return_hidden=True))[0].float(), -1)
            direct = lp[:-1].gather(1, ids[0, 1:, None])[len(p.prompt) - 1:].sum()
            torch.testing.assert_close(alone[j], direct, atol=1e-5, rtol=0)


def test_disabled_adapter_reference_equals_a_frozen_copy():
    """With LoRA the reference is the same weights with the adapters disabled (a flag the modules read):
    its log-probs equal a frozen copy of the base model's, while the adapted policy's differ."""
    base = tiny(0)
    frozen = copy.deepcopy(base).eval()
    apply_lora(base, LoraConfig(rank=4))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # a trained-looking adapter (B starts at zero)
    batch = collate_pairs(pack_pairs(make_pairs(3, seed=2), 128))
    ref_a = Reference(base).logprobs(batch)
    ref_b = Reference(base, frozen).logprobs(batch)
    torch.testing.assert_close(ref_a, ref_b, atol=1e-6, rtol=0)
    with torch.no_grad():
        pol = Reference(base, base).logprobs(batch)  # the adapted weights, scored the same way
    assert (pol - ref_b).abs().max() > 1e-3
    assert all(m.adapter_enabled for n, m in base.named_modules() if hasattr(m, "adapter_enabled"))
    with adapters_disabled(base):
        assert not any(m.adapter_enabled for n, m in base.named_modules() if hasattr(m, "adapter_enabled"))


def dpo_trainer(tmp_path, name="run", model=None, pairs=None, log=None, reference="precompute", **kw):
    from gemmaforge.train.tasks import DPOTask

    pairs = pairs or make_pairs(40)
    base = dict(out=str(tmp_path / name), steps=6, lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=128,
                micro_batch_rows=2, eval_every=3, save_every=3, keep_last=2, progress=False, dtype="float32", seed=1,
                log_every=1)
    base.update(kw)
    return Trainer(TrainConfig(**base), model=model or tiny(0), tokenizer=TOK, train_docs=pairs[:32],
                   val_docs=pairs[32:], task=DPOTask(beta=0.1, reference=reference), log=log or (lambda m: None))


def test_dpo_trainer_logs_rewards_and_resumes_exactly_after_sigterm(tmp_path):
    """The Trainer with the DPO task: metrics rows carry the rewards (training and held-out), rewards.png is
    written; a run stopped by SIGTERM after step 2 and resumed gives the uninterrupted run's losses and
    weights; a resume with another beta is refused."""
    full = dpo_trainer(tmp_path, "full", lora_rank=4)
    summary = full.run()
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6
    for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        assert all(math.isfinite(r[k]) for r in steps) and f"val_{k}" in summary["val_after"]
    assert (tmp_path / "full" / "rewards.png").stat().st_size > 1000
    assert (tmp_path / "full" / "loss.png").exists() and (tmp_path / "full" / "adapter").is_dir()

    def log(msg):
        if msg.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    part = dpo_trainer(tmp_path, "part", lora_rank=4, log=log)
    s = part.run()
    assert s["interrupted"] and s["exit_code"] == 128 + signal.SIGTERM and part.step == 2
    resumed = dpo_trainer(tmp_path, "part-b", lora_rank=4, model=tiny(0), out=str(tmp_path / "part"),
                          resume=str(tmp_path / "part"))
    assert resumed.step == 2
    resumed.run()
    la = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6, (la, lb)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    from gemmaforge.errors import CheckpointError
    from gemmaforge.train.tasks import DPOTask

    with pytest.raises(CheckpointError, match="beta"):
        Trainer(TrainConfig(out=str(tmp_path / "part"), resume=str(tmp_path / "part"), steps=8, lr=3e-3,
                            warmup_steps=1, seq_len=64, batch_tokens=128, micro_batch_rows=2, dtype="float32",
                            seed=1, lora_rank=4, eval_every=3, save_every=3, keep_last=2, progress=False),
                model=tiny(0), tokenizer=TOK, train_docs=make_pairs(40)[:32], val_docs=make_pairs(40)[32:],
                task=DPOTask(beta=0.3), log=lambda m: None)


def test_dpo_full_fine_tune_with_activation_checkpointing_uses_a_frozen_reference(tmp_path):
    """Without LoRA the reference is a frozen copy (no gradient, unchanged by the steps); with activation
    checkpointing the first step's loss and gradients equal the run without it."""
    a = dpo_trainer(tmp_path, "a", steps=2, reference="live")
    b = dpo_trainer(tmp_path, "b", steps=2, activation_checkpointing=True)
    assert a.ref_model is not None and not any(p.requires_grad for p in a.ref_model.parameters())
    before = {n: p.clone() for n, p in a.ref_model.named_parameters()}
    grads = {}
    for name, tr in (("a", a), ("b", b)):
        res = tr._micro_batches()
        from gemmaforge.train.step import forward_backward

        r = forward_backward(tr.model, res, tr.objective, tr.layout)
        grads[name] = (r.loss, {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    assert abs(grads["a"][0] - grads["b"][0]) < 1e-6
    for n, g in grads["a"][1].items():
        torch.testing.assert_close(g, grads["b"][1][n], atol=1e-6, rtol=1e-5)
    a.model.zero_grad()
    a.run()
    for n, p in a.ref_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_dpo_precomputed_reference_equals_the_live_copy_frees_it_and_resumes(tmp_path):
    """The default full fine-tune precomputes the reference's log-probs and frees the frozen copy: the
    losses, rewards (training and held-out) and weights equal the run whose copy scores each batch; a run
    stopped after step 2 and resumed (the log-probs computed again from the base) gives the same losses."""
    import gc

    live = dpo_trainer(tmp_path, "live", reference="live")
    assert live.ref_model is not None
    pre = dpo_trainer(tmp_path, "pre")
    assert pre.ref_model is None
    runs = [tr.run() for tr in (live, pre)]
    rows = [[r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("live", "pre")]
    assert len(rows[0]) == len(rows[1]) == 6
    for a, b in zip(*rows):
        for k in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)
    for k, v in runs[0]["val_after"].items():
        assert abs(v - runs[1]["val_after"][k]) <= 1e-5, k
    for (n, p), q in zip(live.model.named_parameters(), pre.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=n)

    def log(msg):
        if msg.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    part = dpo_trainer(tmp_path, "part", log=log)
    assert part.run()["interrupted"] and part.step == 2
    resumed = dpo_trainer(tmp_path, "part-b", out=str(tmp_path / "part"), resume=str(tmp_path / "part"))
    assert resumed.step == 2 and resumed.ref_model is None
    resumed.run()
    lb = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert len(lb) == 6 and max(abs(r["loss"] - y) for r, y in zip(rows[1], lb)) <= 1e-6, lb
    # nothing keeps the freed copy alive: the trainer adds no model object to those that exist
    def models():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.nn.Module) and type(o) is type(part.model))

    m = tiny(0)
    before = models()
    tr = dpo_trainer(tmp_path, "freed", model=m, steps=1)
    assert tr.ref_model is None and models() == before
    tr_live = dpo_trainer(tmp_path, "kept", model=tiny(0), steps=1, reference="live")
    assert models() == before + 2 and tr_live.ref_model is not None  # the check can fail: the live copy counts


# ----------------------------------------------------------------------------- CLI: bad input

@pytest.mark.parametrize("line, needle", [
    ({"prompt": "a", "chosen": "b"}, 'bad.jsonl:2: preference pair lacks "rejected"'),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, 'bad.jsonl:2: "chosen" and "rejected" are identical'),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, 'bad.jsonl:2: "prompt" must be a string'),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": {"role": "user", "content": "x"}, "rejected": "y"},
     'bad.jsonl:2: "chosen" must be an assistant'),
])
def test_dpo_cli_bad_rows_are_one_line_naming_the_line(tmp_path, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n" + json.dumps(line) + "\n")
    r = run_cli("dpo", "--data", str(f), "--out", str(tmp_path / "run"), "--steps", "1")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_dpo_cli_bad_settings_are_one_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    r = run_cli("dpo", "--data", str(f), "--beta", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.strip() == "gemmaforge: error: --beta must be positive (got 0.0)", r.stderr
    r = run_cli("dpo", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr and len(r.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- the real 270M

def real_preferences(tokenizer, n: int, seed: int = 0) -> list[PreferencePair]:
    """Paragraphs of CPython's language reference: the prompt is a paragraph's opening, the chosen
    completion its real continuation, the rejected one the same words shuffled."""
    import random

    from pydoc_data.topics import topics

    rng = random.Random(seed)
    out = []
    for key in sorted(topics):
        words = " ".join(topics[key].split()).split(" ")
        if len(words) < 60:
            continue
        start = rng.randrange(0, len(words) - 40)
        prompt = " ".join(words[start:start + 16])
        cont = words[start + 16:start + 28]
        shuffled = cont[:]
        while shuffled == cont:
            rng.shuffle(shuffled)
        out.append(PreferencePair(list(tokenizer.encode(prompt, add_bos=True)),
                                  list(tokenizer.encode(" " + " ".join(cont), add_bos=False)),
                                  list(tokenizer.encode(" " + " ".join(shuffled), add_bos=False)), key))
        if len(out) == n:
            break
    return out


@pytest.mark.slow  # ~2-3 min of fp32 270M steps on 2 cores (11 min with the machine shared 5-fold)
def test_real_270m_dpo_raises_held_out_reward_accuracy(real_model, tmp_path):
    """The real Gemma 3 270M, LoRA rank 8, 8 DPO steps of 4 pairs (real continuation preferred over its
    words shuffled), fp32: held-out reward accuracy goes from 0 (all rewards 0 at the start) to well above
    0.5 on 16 held-out pairs, and the reward curve PNG is written."""
    from gemmaforge.train.tasks import DPOTask

    model, tok = real_model
    pairs = real_preferences(tok, 48)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=8, lr=2e-3, warmup_steps=1, seq_len=256, batch_tokens=512,
                      micro_batch_rows=2, eval_every=0, save_every=0, progress=False, dtype="float32", seed=0,
                      lora_rank=8, eval_rows=100, no_merge=True)
    tr = Trainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_docs=pairs[:32], val_docs=pairs[32:],
                 task=DPOTask(beta=0.1), log=lambda m: None)
    s = tr.run()
    before, after = s["val_before"], s["val_after"]
    assert before["val_reward_accuracy"] == 0.0
    assert after["val_reward_accuracy"] >= 0.8, after
    assert after["val_reward_margin"] > 0.1 and after["val_loss"] < before["val_loss"]
    assert (tmp_path / "run" / "rewards.png").stat().st_size > 1000
