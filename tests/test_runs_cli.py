"""`gemmaforge train` runs that are reused: resuming as the printed hint says (the run's own settings),
more steps on resume, a run's recipe.toml as --config, plain log lines, and the one-line errors (exit 2)
of settings that used to pass silently or end in a traceback; a failed run leaves no directory."""

import subprocess
import sys

import pytest
from conftest import run_cli
from test_train_cli import _one_line_exit_2, corpus, small_dir  # noqa: F401 - module fixtures

from gemmaforge.train import load_recipe, read_metrics


def _lrs(run_dir):
    return [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_as_printed_restores_the_run_and_more_steps_keep_the_schedule_monotonic(small_dir, corpus, tmp_path):
    a = tmp_path / "a"
    r = run_cli("train", "--model", str(small_dir), "--data", str(corpus), "--steps", "3", "--seq-len", "64",
                "--batch-tokens", "128", "--eval-every", "2", "--save-every", "1", "--keep-last", "1", "--lr", "1e-3",
                "--warmup-steps", "2", "--out", str(a), "--no-progress")
    assert r.returncode == 0, r.stderr
    # no terminal: one plain line per step (and no bar: text mode reads its carriage returns as newlines)
    assert "%|" not in r.stderr and all(f"step {i}/3  loss " in r.stderr for i in (1, 2, 3)), r.stderr
    assert (a / "checkpoints" / "step-000003").is_dir()
    # the run's own model, data, --seq-len 64 ... come back from a/recipe.toml; --steps 5 extends it
    r = run_cli("train", "--resume", str(a), "--steps", "5")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "never rises again" in r.stderr, r.stderr
    lrs = _lrs(a)
    assert len(lrs) == 5 and lrs[1] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:])), lrs
    assert load_recipe(a)["steps"] == 5 and load_recipe(a)["seq_len"] == 64
    # the recipe starts a new run; --progress shows the bar even on a pipe; --save-every 0: no checkpoint
    b = tmp_path / "b"
    r = run_cli("train", "--config", str(a / "recipe.toml"), "--out", str(b), "--steps", "1", "--save-every", "0",
                "--progress")
    assert r.returncode == 0, r.stderr
    assert "training: 100%|" in r.stderr and "cannot be resumed" in r.stderr
    assert not (b / "checkpoints").exists() and (b / "final" / "model.safetensors").exists()
    assert load_recipe(b)["seq_len"] == 64 and load_recipe(b)["lr"] == 1e-3


def test_settings_that_passed_silently_are_one_line_and_leave_no_directory(small_dir, corpus, tmp_path):
    base = ["train", "--model", str(small_dir), "--data", str(corpus), "--steps", "1", "--no-progress"]
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\n')
    cases = [
        (["--dtype", "foo"], "--dtype foo: use auto, float32 (fp32) or bfloat16 (bf16)"),
        (["--batch-tokens", "100", "--seq-len", "128"], "--batch-tokens 100 is less than one row (--seq-len 128)"),
        (["--seq-len", "100000", "--batch-tokens", "100000"], "--seq-len 100000 is longer than the model's context"),
        (["--config", str(bad)], f'{bad}: lr must be a number (got "fast")'),
        (["--epochs", "1"], "--steps and --epochs both given"),
        (["--resume"], "--resume without a path continues --out's run: give --out RUN_DIR"),
        (["--no-merge"], "--no-merge skips the merged final/ of a LoRA run"),
        (["--log", "mlflow"], "--log mlflow"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"o{i}" / "run"
        argv = [*base, *args] + ([] if args == ["--resume"] else ["--out", str(out)])
        _one_line_exit_2(run_cli(*argv), needle)
        assert not (tmp_path / f"o{i}").exists(), args
    # without --out (runs/<timestamp>): a run that fails on its data leaves neither the run dir nor runs/
    r = subprocess.run([sys.executable, "-m", "gemmaforge", "train", "--model", str(small_dir), "--data",
                        str(tmp_path / "missing.jsonl"), "--no-progress"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    _one_line_exit_2(r, "missing.jsonl")
    assert not (tmp_path / "runs").exists()
