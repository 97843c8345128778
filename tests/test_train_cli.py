"""`gemmaforge train` end to end: outputs, signals + exact resume, one-line errors (exit 2)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli

from gemmaforge import from_config
from gemmaforge.formats.hf import save_hf
from gemmaforge.models.registry import preset
from gemmaforge.formats.gguf import gguf_tokenizer
from gemmaforge.train import read_metrics


@pytest.fixture(scope="module")
def small_dir(real_gguf, tmp_path_factory):
    """A small random Gemma 3 with the real 262k vocabulary and tokenizer: CLI runs take seconds."""
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", vocab_size=262_144, hidden_size=32, intermediate_size=64,
                               head_dim=16, num_attention_heads=2, num_key_value_heads=1))
    d = tmp_path_factory.mktemp("small") / "model"
    save_hf(model, d, tokenizer=gguf_tokenizer(real_gguf))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times."})
             for i in range(60)]
    (d / "pre.jsonl").write_text("\n".join(lines) + "\n")
    return d / "pre.jsonl"


COMMON = ["--seq-len", "64", "--batch-tokens", "128", "--eval-every", "2", "--save-every", "2", "--lr", "1e-3",
          "--no-progress"]


def test_train_writes_everything_and_final_model_loads(small_dir, corpus, tmp_path):
    import transformers

    out = tmp_path / "run"
    r = run_cli("train", "--model", str(small_dir), "--data", str(corpus), "--steps", "4", "--out", str(out), *COMMON)
    assert r.returncode == 0, r.stderr
    assert "validation before" in r.stderr and "validation after" in r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= x.keys() for x in rows if "loss" in x)
    assert any("val_loss" in x for x in rows)
    assert (out / "loss.png").stat().st_size > 1000 and (out / "recipe.toml").exists()
    # --keep-last 0 (the default): the checkpoint of step 2 was there to resume an interrupted run; the
    # completed run removed it once final/ was written
    assert not (out / "checkpoints").exists() and "checkpoints removed" in r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert hf.config.vocab_size == 262_144
    g = run_cli("generate", "--model", str(out / "final"), "--prompt", "The quick", "--max-new-tokens", "3")
    assert g.returncode == 0, g.stderr


def _uninterrupted(small_dir, corpus, tmp_path, steps):
    out = tmp_path / "full"
    r = run_cli("train", "--model", str(small_dir), "--data", str(corpus), "--steps", str(steps), "--out", str(out),
                *COMMON)
    assert r.returncode == 0, r.stderr
    return [x["loss"] for x in read_metrics(out / "metrics.jsonl") if "loss" in x]


def test_sigterm_saves_and_bare_resume_continues_the_same_curve(small_dir, corpus, tmp_path):
    """SIGTERM saves a checkpoint; ``train --out RUN --resume`` (no other flag: the run's own model, data
    and settings come from RUN/recipe.toml) continues it to the uninterrupted run's curve."""
    steps = 14
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "gemmaforge", "train", "--model", str(small_dir), "--data", str(corpus),
           "--steps", str(steps), "--out", str(out), *COMMON]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and sum(1 for x in read_metrics(metrics) if "loss" in x) >= 3:
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    done = [x for x in read_metrics(metrics) if "loss" in x]
    if p.returncode == 0:  # finished before the signal landed: nothing to resume, nothing tested
        pytest.fail("the run finished before SIGTERM; make it longer")
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in err and len(done) < steps
    assert f"resume with: gemmaforge train --resume {out}" in err
    r = run_cli("train", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    # stderr is a pipe: plain lines, no bar (text mode reads a bar's carriage returns as newlines)
    assert "resumed from" in r.stderr and f"step {steps}/{steps}  loss" in r.stderr and "%|" not in r.stderr
    resumed = [x["loss"] for x in read_metrics(metrics) if "loss" in x]
    full = _uninterrupted(small_dir, corpus, tmp_path, steps)
    assert len(resumed) == len(full) == steps
    assert max(abs(a - b) for a, b in zip(resumed, full)) <= 1e-6, (resumed, full)


def _one_line_exit_2(r, needle):
    """Exit code 2 and exactly one error line naming the problem (progress lines before it are fine)."""
    errors = [l for l in r.stderr.splitlines() if l.startswith("gemmaforge: error:")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_bad_inputs(small_dir, corpus, tmp_path):
    base = ["train", "--model", str(small_dir), "--steps", "1", *COMMON]
    _one_line_exit_2(run_cli(*base, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o1")),
                     "missing.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(run_cli(*base, "--data", str(empty), "--out", str(tmp_path / "o2")), str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{not json\n')
    _one_line_exit_2(run_cli(*base, "--data", str(bad), "--out", str(tmp_path / "o3")), f"{bad}:3")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    _one_line_exit_2(run_cli(*base, "--data", str(nofield), "--out", str(tmp_path / "o4")), f"{nofield}:2")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    _one_line_exit_2(run_cli(*base, "--data", str(corpus), "--out", str(blocker / "x")), "not writable")
    # a checkpoint of a different training shape
    ok = tmp_path / "ok"
    r = run_cli("train", "--model", str(small_dir), "--data", str(corpus), "--steps", "2", "--out", str(ok),
                "--keep-last", "1", *COMMON)
    assert r.returncode == 0, r.stderr
    _one_line_exit_2(run_cli("train", "--model", str(small_dir), "--data", str(corpus), "--steps", "4",
                             "--resume", str(ok), "--no-progress", "--seq-len", "32"), "incompatible checkpoint")
    _one_line_exit_2(run_cli(*base, "--data", str(corpus), "--lr", "-1", "--out", str(tmp_path / "o5")), "--lr")


@pytest.mark.slow
def test_default_job_on_the_embedded_model(tmp_path):
    """What `make run` runs (the embedded 270M on CPython's language reference), shortened to 2 steps."""
    out = tmp_path / "default"
    r = run_cli("train", "--steps", "2", "--seq-len", "64", "--batch-tokens", "64", "--eval-rows", "1",
                "--out", str(out), "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "validation before" in r.stderr and "validation after" in r.stderr
    assert (out / "loss.png").exists() and (out / "final" / "model.safetensors").exists()
    assert len([x for x in read_metrics(out / "metrics.jsonl") if "loss" in x]) == 2
