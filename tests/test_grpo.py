"""GRPO: the objective against transformers, the Trainer with rollouts (metrics, resume), FSDP2 x 2 against one
process, bad input through the CLI, and the real 270M learning a toy verifiable reward."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model_like, run_cli
from test_train import ByteTok

from gemmaforge import from_config, preset
from gemmaforge.rl.grpo import PromptItem, collate_rollouts, rollout_rows
from gemmaforge.rl.rewards import has_number
from gemmaforge.rl.score import grpo_advantages
from gemmaforge.train import TrainConfig, Trainer, read_metrics
from gemmaforge.train.objectives import GRPOLoss
from gemmaforge.train.sources import Reference
from gemmaforge.train.step import StepLayout, micro_batch_loss
from gemmaforge.train.tasks import GRPOTask

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))


class Tok(ByteTok):
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode(errors="replace")


TOK = Tok()


def tiny(seed=0):
    torch.manual_seed(seed)
    m = from_config(preset("gemma-3-tiny", vocab_size=264, sliding_window=16))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                torch.nn.init.normal_(p, 0, 0.5)
    return m.train()


def prompts(n=6):
    return [PromptItem(f"prompts:{i + 1}", {"prompt": f"{i} plus one is", "answer": str(i + 1)}, f"{i} plus one is",
                       TOK.encode(f"{i} plus one is")) for i in range(n)]


def fixed_generate(model, prompts, *, max_new_tokens, temperature, seeds, stop_ids):
    """Rollouts that depend only on the seeds (the same at every layout): digits or letters."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) % 2**31)
        n = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
        base = 52 if int(torch.randint(0, 2, (1,), generator=g)) else 101  # '0'+4 or 'a'+4
        out.append([base + int(x) for x in torch.randint(0, 9, (n,), generator=g)])
    return out


def test_grpo_objective_equals_a_direct_computation_from_transformers():
    """Packed rollouts of two groups: the clipped policy loss with the k3 KL (old log-probs off the current
    policy, so ratios and clipping matter) and its gradients equal a per-sequence computation from
    transformers' log-probs (<= 1e-5)."""
    policy, ref, old = tiny(0), tiny(1).eval(), tiny(2).eval()
    items = prompts(2)
    ps = [it.ids for it in items for _ in range(3)]
    cs = fixed_generate(None, ps, max_new_tokens=6, temperature=1.0, seeds=range(6), stop_ids=set())
    rewards = [has_number("", TOK.decode(c), {}) for c in cs]
    adv = grpo_advantages([r + 0.1 * k for k, r in enumerate(rewards)], group_size=3)
    rows = rollout_rows(ps, cs, adv, 128)
    assert len(rows) == 1
    batch = collate_rollouts(rows)
    batch["ref_logprobs"] = Reference(policy, ref, temperature=0.8).logprobs(batch)
    batch["old_logprobs"] = Reference(policy, old, temperature=0.8).logprobs(batch)
    obj = GRPOLoss(beta=0.1, clip_eps=0.2, temperature=0.8)
    loss = micro_batch_loss(policy, batch, obj, StepLayout()) / obj.count(batch)
    loss.backward()

    hf, hf_ref, hf_old = hf_model_like(policy), hf_model_like(ref), hf_model_like(old)
    total, n, clipped = 0.0, 0, 0
    for k, (p, c) in enumerate(zip(ps, cs)):
        ids = torch.tensor([p + c])

        def lps(m):
            lp = F.log_softmax(m(ids).logits[0, :-1].float() / 0.8, -1).gather(1, ids[0, 1:, None])[:, 0]
            return lp[len(p) - 1:]

        lp = lps(hf)
        with torch.no_grad():
            lr_, lo = lps(hf_ref), lps(hf_old)
        ratio = torch.exp(lp - lo)
        a = float(adv[k])
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        clipped += int(((-a * ratio.clamp(0.8, 1.2)) > (-a * ratio)).sum())
        kl = torch.exp(lr_ - lp) - (lr_ - lp) - 1
        total = total + (pg + 0.1 * kl).sum()
        n += len(c)
    direct = total / n
    direct.backward()
    assert obj.count(batch) == n and clipped > 0
    torch.testing.assert_close(loss.detach(), direct.detach(), atol=1e-5, rtol=0)
    hp = dict(hf.named_parameters())
    for name, p in policy.named_parameters():
        g = hp[name].grad if name in hp else hp["model.embed_tokens.weight"].grad
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)
    m = obj.pop_metrics()
    assert m["kl"][1] == n and m["kl"][0] > 0 and m["entropy"][0] / n > 1


def grpo_trainer(tmp_path, name="run", log=None, model=None, task_kw=None, **kw):
    base = dict(out=str(tmp_path / name), steps=4, lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=128,
                micro_batch_rows=2, eval_every=0, save_every=2, keep_last=2, progress=False, dtype="float32", seed=1,
                log_every=1)
    base.update(kw)
    task = GRPOTask(has_number, **{**dict(group_size=4, max_new_tokens=8, prompts_per_step=2, updates_per_batch=2,
                                          generate=fixed_generate), **(task_kw or {})})
    return Trainer(TrainConfig(**base), model=model or tiny(0), tokenizer=TOK, train_docs=prompts(), task=task,
                   log=log or (lambda m: None))


def test_grpo_trainer_logs_rollout_metrics_and_resumes_exactly_mid_batch(tmp_path):
    """Two updates per rollout batch: a run stopped by SIGTERM after step 1 (its batch's second update still
    to come: the rollouts, old and reference log-probs are in the checkpoint) and resumed equals the
    uninterrupted run; metrics carry the reward, KL, entropy, clip fraction and completion length; reward.png."""
    full = grpo_trainer(tmp_path, "full")
    full.run()
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4
    for k in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "completion_len"):
        assert all(math.isfinite(r[k]) for r in rows), k
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0  # the first update starts at the reference
    assert (tmp_path / "full" / "reward.png").stat().st_size > 1000

    def log(msg):
        if msg.startswith("step 1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    part = grpo_trainer(tmp_path, "part", log=log)
    s = part.run()
    assert s["exit_code"] == 128 + signal.SIGTERM and part.step == 1
    resumed = grpo_trainer(tmp_path, "x", out=str(tmp_path / "part"), resume=str(tmp_path / "part"))
    assert resumed.step == 1
    resumed.run()
    la = [r["loss"] for r in rows]
    lb = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6, (la, lb)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_grpo_with_lora_and_checkpointing_samples_real_rollouts(tmp_path):
    """The batched generator samples the rollouts (the seeds give the same ones again); LoRA's reference is
    the adapter-disabled policy (no frozen copy); activation checkpointing trains."""
    a = grpo_trainer(tmp_path, "a", steps=1, lora_rank=4, activation_checkpointing=True,
                     task_kw=dict(generate=None, updates_per_batch=1))
    b = grpo_trainer(tmp_path, "b", steps=1, lora_rank=4, task_kw=dict(generate=None, updates_per_batch=1))
    assert a.ref_model is None
    ra, rb = a.train_step(), b.train_step()
    assert [x["completion"] for x in a.source.last_rollouts] == [x["completion"] for x in b.source.last_rollouts]
    assert abs(ra["loss"] - rb["loss"]) < 1e-6 and ra["completion_len"] > 0


def test_grpo_and_dpo_under_fsdp2_x2_equal_one_process(tmp_path):
    """The same rollouts (seeded per step and rollout) under FSDP2 x 2, the frozen reference sharded too:
    every step's loss, KL and the trained weights equal one process's (<= 1e-5); real sampling under
    FSDP2 runs (both ranks generate the step's rollouts in lockstep and get the same ones). DPO likewise:
    losses, rewards (training and held-out) and weights equal one process's."""
    import grpo_workers

    from gemmaforge.parallel.process import launch

    single = grpo_workers.run(str(tmp_path / "single"), fsdp=False)
    res = launch(grpo_workers.run_fsdp, 2, str(tmp_path / "fsdp"))
    assert res[0]["sampled"] == res[1]["sampled"] and len(res[0]["sampled"]) == 8
    rows_a, rows_b = single["metrics"], res[0]["metrics"]
    assert len(rows_a) == len(rows_b) == 3
    for a, b in zip(rows_a, rows_b):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["kl"] - b["kl"]) <= 1e-5, (a, b)
        assert a["valid_tokens"] == b["valid_tokens"]
    for k, v in single["weights"].items():
        torch.testing.assert_close(res[0]["weights"][k], v, atol=1e-5, rtol=0, msg=k)
    # DPO in the same launch: its pairs split over the ranks, the frozen reference sharded too
    dpo_single = grpo_workers.run_dpo(str(tmp_path / "dpo-single"), fsdp=False)
    a_rows, b_rows = dpo_single["metrics"], res[0]["dpo"]["metrics"]
    keys = ("loss", "val_loss", "reward_margin", "val_reward_margin", "reward_accuracy")
    assert len(a_rows) == len(b_rows) and sum("loss" in r for r in a_rows) == 3
    for a, b in zip(a_rows, b_rows):
        for k in keys:
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)
    for k, v in dpo_single["weights"].items():
        torch.testing.assert_close(res[0]["dpo"]["weights"][k], v, atol=1e-5, rtol=0, msg=k)


# ----------------------------------------------------------------------------- CLI: bad input

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small random Gemma 3 with the real vocabulary and tokenizer: CLI runs take seconds."""
    import gemmaforge
    from gemmaforge.formats.hf import save_hf

    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", vocab_size=262_144, hidden_size=32, intermediate_size=64,
                               head_dim=16, num_attention_heads=2, num_key_value_heads=1))
    d = tmp_path_factory.mktemp("small") / "model"
    save_hf(model, d, tokenizer=gemmaforge.load_tokenizer("gemma-3-270m"))
    return d


def _prompts_file(tmp_path, lines):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


@pytest.mark.parametrize("reward, needle", [
    ("no_such_module_xyz:fn", "--reward no_such_module_xyz:fn: cannot import no_such_module_xyz"),
    ("gemmaforge.rl.rewards:nope", "--reward gemmaforge.rl.rewards:nope: gemmaforge.rl.rewards has no attribute"),
    ("gemmaforge.rl.rewards", "expected module:function"),
])
def test_grpo_cli_unimportable_reward_is_one_line(tmp_path, reward, needle):
    f = _prompts_file(tmp_path, [{"prompt": "hi"}])
    r = run_cli("grpo", "--data", str(f), "--reward", reward, "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_grpo_cli_bad_rows_and_rewards_name_the_line(tmp_path, small_dir):
    """A prompt line without "prompt" fails before the model loads; a reward returning a non-number or
    raising is one line naming the reward and the prompt's file:line."""
    bad = _prompts_file(tmp_path, [{"prompt": "a"}, {"question": "b"}])
    r = run_cli("grpo", "--data", str(bad), "--reward", "gemmaforge.rl.rewards:has_number")
    assert r.returncode == 2 and 'prompts.jsonl:2: line lacks "prompt"' in r.stderr, r.stderr
    (tmp_path / "rw.py").write_text("def text(prompt, completion, row):\n    return 'high'\n")
    f = _prompts_file(tmp_path, [{"prompt": "Hello"}, {"prompt": "Bye"}])
    common = ["--data", str(f), "--model", str(small_dir), "--steps", "1", "--group-size", "2",
              "--max-new-tokens", "2", "--prompts-per-step", "1", "--seq-len", "32", "--batch-tokens", "64",
              "--save-every", "0", "--no-progress"]
    r = run_cli("grpo", "--reward", f"{tmp_path / 'rw.py'}:text", "--out", str(tmp_path / "r1"), *common)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "prompts.jsonl:" in last and "returned 'high' (str), not a finite number" in last, r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("grpo", "--reward", "gemmaforge.rl.rewards:exact_match", "--out", str(tmp_path / "r2"), *common)
    assert r.returncode == 2 and "raised KeyError" in r.stderr and '"answer"' in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the real 270M

REAL_PROMPTS = ["The year the war ended was", "The price of the ticket was", "My favourite animal is the",
                "Today I went to the", "The population of the town is", "The score at half time was"]


@pytest.mark.slow  # sampling + updates of the fp32 270M: ~2 min on 2 idle cores (8 min a step with them shared 8-fold)
def test_real_270m_grpo_learns_a_verifiable_reward(real_model, tmp_path):
    """The real Gemma 3 270M (LoRA rank 16), reward "the completion holds a digit", which the base model
    meets in some of its samples of these prompts (none for some prompts, most for others): the mean
    reward of the last 2 of 6 steps clearly exceeds the first step's (the base policy's samples); KL and
    entropy are logged at every step. Measured (this machine, shared): step 1 reward 0.278 (entropy 3.04,
    KL 0), step 2 reward 1.0 (KL 0.305, entropy 1.63; every completion holds a digit, so the advantages
    vanish). An earlier 10-step run with lr 1e-2 on number prompts went 0.667 -> 1.0 after one update
    (KL 2.2, entropy 2.71 -> 1.74)."""
    import copy

    model, tok = real_model
    items = [PromptItem(f"real:{i}", {"prompt": p}, p, list(tok.encode(p))) for i, p in enumerate(REAL_PROMPTS)]
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=6, lr=5e-3, warmup_steps=0, seq_len=32, batch_tokens=64,
                      micro_batch_rows=4, eval_every=0, save_every=0, progress=False, dtype="float32", seed=0,
                      lora_rank=16, no_merge=True, schedule="constant", clip=1.0)
    task = GRPOTask(has_number, group_size=6, max_new_tokens=6, prompts_per_step=3, beta=0.04, temperature=1.0)
    tr = Trainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_docs=items, task=task, log=print)
    tr.run()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    first = rows[0]["reward_mean"]  # the base policy's samples (before any update)
    last = sum(r["reward_mean"] for r in rows[-2:]) / 2
    print("reward first step", first, "last 2 steps", last, [round(r["reward_mean"], 3) for r in rows])
    assert all(math.isfinite(r["kl"]) and r["entropy"] > 0 for r in rows)
    assert last >= first + 0.3, (first, last)
    assert (tmp_path / "run" / "reward.png").exists()
