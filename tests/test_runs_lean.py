"""Lean, reusable runs through the Trainer on the tiny model: what a run leaves on disk (checkpoints,
LoRA checkpoints without the frozen base, exports in bf16 / shards / without the merge), its
``recipe.toml``, resuming with more steps (a monotonic schedule), ``epochs``, tiny data sets, settings
that are refused in one line, runs that fail leaving no directory, and the logs (plain lines,
TensorBoard, wandb offline)."""

import dataclasses
import json
import math
import signal
import sys

import pytest
import torch
from test_train import ByteTok, corpus, tiny_model

from gemmaforge.errors import CheckpointError, ConfigError, GemmaforgeError
from gemmaforge.train import TrainConfig, Trainer, load_recipe, read_metrics
from gemmaforge.train.config import DTYPES, NOT_IN_RECIPE


def make_trainer(tmp_path, name="run", model=None, logs=None, **kw):
    """test_train's tiny trainer (``logs``: a list that collects the log lines)."""
    docs = corpus()
    base = dict(out=str(tmp_path / name), steps=12, lr=3e-3, warmup_steps=2, seq_len=64, batch_tokens=128,
                micro_batch_rows=1, eval_every=4, save_every=4, keep_last=3, progress=False, eval_rows=2, seed=1)
    base.update(kw)
    return Trainer(TrainConfig(**base), model=model or tiny_model(), tokenizer=ByteTok(), train_docs=docs[:34],
                   val_docs=docs[34:], log=logs.append if logs is not None else (lambda m: None))


def _stop_after(tr, step):
    """SIGTERM arrives during step ``step`` (the trainer saves after it and returns)."""
    orig = tr.train_step

    def train_step():
        row = orig()
        if tr.step == step:
            tr._stop_signal = signal.SIGTERM
        return row

    tr.train_step = train_step
    return tr


def _lrs(run_dir):
    return [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _ckpts(run_dir):
    d = run_dir / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ----------------------------------------------------------------------------- checkpoints on disk

def test_save_every_0_writes_no_checkpoint_even_when_stopped(tmp_path):
    logs = []
    tr = make_trainer(tmp_path, steps=4, save_every=0, keep_last=0)
    tr.log = logs.append
    tr.run()
    out = tmp_path / "run"
    assert not (out / "checkpoints").exists() and (out / "final" / "model.safetensors").exists()
    assert any("none (--save-every 0): this run cannot be resumed" in m for m in logs), logs
    # a signal: the run stops, still without a checkpoint, and says it cannot be resumed
    logs.clear()
    tr = _stop_after(make_trainer(tmp_path, "sig", steps=4, save_every=0), 2)
    tr.log = logs.append
    summary = tr.run()
    assert summary["exit_code"] == 128 + signal.SIGTERM and not (tmp_path / "sig" / "checkpoints").exists()
    assert any("no checkpoint (--save-every 0): this run cannot be resumed" in m for m in logs), logs


def test_default_keeps_the_newest_checkpoint_while_running_and_removes_it_when_complete(tmp_path):
    """keep_last 0 (the default): checkpoints only serve an interrupted run; it resumes exactly, and the
    completed run keeps its export, not the 3x-model-size optimizer state. keep_last >= 1 keeps the last
    step's checkpoint (to continue with more steps)."""
    full = make_trainer(tmp_path, "full", steps=6, save_every=2, keep_last=0)
    full.run()
    assert _ckpts(tmp_path / "full") == []
    part = _stop_after(make_trainer(tmp_path, "part", steps=6, save_every=2, keep_last=0), 5)
    assert part.run()["exit_code"] == 128 + signal.SIGTERM
    assert _ckpts(tmp_path / "part") == ["step-000005"]  # step 4's pruned: the newest only
    resumed = make_trainer(tmp_path, "x", model=tiny_model(seed=7), out=str(tmp_path / "part"),
                           resume=str(tmp_path / "part"), steps=6, save_every=2, keep_last=0)
    assert resumed.step == 5
    summary = resumed.run()
    assert _ckpts(tmp_path / "part") == [] and (tmp_path / "part" / "final" / "model.safetensors").exists()
    assert summary["final"] == str(tmp_path / "part" / "final")
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "full"), _losses(tmp_path / "part"))) <= 1e-6
    kept = make_trainer(tmp_path, "kept", steps=6, save_every=4, keep_last=1)
    kept.run()
    assert _ckpts(tmp_path / "kept") == ["step-000006"]
    # a finished run without checkpoints: resume says why, in one line
    with pytest.raises(CheckpointError, match="the run finished and kept none"):
        make_trainer(tmp_path, "again", out=str(tmp_path / "full2"), resume=str(tmp_path / "full"))


def test_lora_checkpoint_holds_the_adapter_and_its_optimizer_state_never_the_base(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    full = make_trainer(tmp_path, "full", steps=6, lora_rank=4, save_every=2)
    full.run()
    part = _stop_after(make_trainer(tmp_path, "part", steps=6, lora_rank=4, save_every=2), 3)
    part.run()
    ck = tmp_path / "part" / "checkpoints" / "step-000003"
    md = FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    model_keys = [k for k in md if k.startswith("model.")]
    optim_keys = [k for k in md if k.startswith("optim.state.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    assert optim_keys and all(".lora_A." in k or ".lora_B." in k for k in optim_keys), optim_keys
    # the model's bytes in the shard are the adapter's (plus DCP's few hundred bytes per tensor), not the base's
    base_bytes = sum(p.numel() * 4 for p in part.model.parameters() if not p.requires_grad)
    lora_bytes = sum(p.numel() * 4 for p in part.model.parameters() if p.requires_grad)
    stored = FileSystemReader(str(ck)).read_metadata().storage_data
    model_bytes = sum(v.length for k, v in stored.items() if k.fqn.startswith("model."))
    assert lora_bytes <= model_bytes <= lora_bytes + 2048 * len(model_keys) < base_bytes, (model_bytes, lora_bytes)
    assert json.loads((ck / "meta.json").read_text())["trainable_only"] is True
    # the base comes from the model source again: the resumed run equals the uninterrupted one
    resumed = make_trainer(tmp_path, "x", out=str(tmp_path / "part"), resume=str(tmp_path / "part"), steps=6,
                           lora_rank=4, save_every=2)
    resumed.run()
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "full"), _losses(tmp_path / "part"))) <= 1e-6
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    # a checkpoint without its base is tied to that base: another base model is refused in one line
    part2 = _stop_after(make_trainer(tmp_path, "part2", steps=6, lora_rank=4, save_every=2), 2)
    part2.run()
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: base_model") as e:
        make_trainer(tmp_path, "y", model=tiny_model(seed=5), out=str(tmp_path / "part2"),
                     resume=str(tmp_path / "part2"), steps=6, lora_rank=4, save_every=2)
    assert "\n" not in str(e.value)


def test_exports_bf16_sharded_and_lora_without_merge(tmp_path):
    import gemmaforge
    from safetensors import safe_open

    tr = make_trainer(tmp_path, "full", steps=2, save_every=0, save_dtype="bf16", max_shard_size="100KB")
    tr.run()
    final = tmp_path / "full" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (final / "model.safetensors").exists()
    for f in files:
        assert (final / f).stat().st_size <= 100_000 + 64 * 1024  # a part holds at most the limit (+ header)
        with safe_open(str(final / f), "pt") as st:
            assert all(st.get_tensor(k).dtype == torch.bfloat16 for k in st.keys())
    back = gemmaforge.from_pretrained(str(final)).state_dict()
    for k, v in tr.model.state_dict().items():
        if k in back:
            assert torch.equal(back[k].to(torch.bfloat16), v.detach().to(torch.bfloat16)), k
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final))
    assert hf.dtype == torch.bfloat16
    lora = make_trainer(tmp_path, "lora", steps=2, save_every=0, lora_rank=2, no_merge=True, save_dtype="bf16")
    summary = lora.run()
    assert not (tmp_path / "lora" / "final").exists()
    assert summary["final"] == str(tmp_path / "lora" / "adapter")
    with safe_open(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"), "pt") as st:
        assert st.keys() and all(st.get_tensor(k).dtype == torch.bfloat16 for k in st.keys())


# ----------------------------------------------------------------------------- recipes and settings

def test_recipe_toml_is_the_resolved_configuration_and_loads_back(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("1 plus one is 2. 2 plus one is 3.\n" * 40)
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=2, seq_len=64, batch_tokens=128,
                      save_every=0, progress=False, lora_rank=2, lora_targets=["q_proj", "v_proj"], lr=3e-3,
                      epochs=None, log_every=3)
    Trainer(cfg, model=tiny_model(), tokenizer=ByteTok(), log=lambda m: None).run()
    text = (tmp_path / "run" / "recipe.toml").read_text()
    assert "\nout =" not in text and "resume =" not in text and "progress =" not in text and "\nseq-len = 64\n" in text
    values = load_recipe(tmp_path / "run")  # a run dir stands for its recipe.toml
    again = TrainConfig(**values)
    for f in dataclasses.fields(cfg):
        if f.name not in NOT_IN_RECIPE:
            assert getattr(again, f.name) == getattr(cfg, f.name), f.name
    # epochs: the recipe holds epochs, the resolved steps as a comment (a recipe sets one of the two)
    e = TrainConfig(out=str(tmp_path / "ep"), epochs=1.5, seq_len=64, batch_tokens=128, save_every=0, progress=False)
    tr = Trainer(e, model=tiny_model(), tokenizer=ByteTok(), train_docs=corpus()[:34], val_docs=corpus()[34:],
                 log=lambda m: None)
    tr.run()
    values = load_recipe(tmp_path / "ep" / "recipe.toml")
    assert values["epochs"] == 1.5 and "steps" not in values
    assert f"# steps = {tr.cfg.steps}" in (tmp_path / "ep" / "recipe.toml").read_text()
    # an older run's config.json loads as a recipe (its own out/resume left out)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "resume": None}))
    values = load_recipe(old / "config.json")
    assert "out" not in values and values["seq_len"] == 64 and values["lora_targets"] == ["q_proj", "v_proj"]
    assert load_recipe(old) == values


@pytest.mark.parametrize("text,needle", [
    ('lr = "fast"\n', 'r.toml: lr must be a number (got "fast")'),
    ("steps = 2.5\n", "r.toml: steps must be an integer (got 2.5)"),
    ("data = 3\n", "r.toml: data must be a list of strings (got 3)"),
    ('activation-checkpointing = "yes"\n', 'r.toml: activation_checkpointing must be true or false (got "yes")'),
    ("steps = 3\nepochs = 1\n", "r.toml: steps and epochs both set"),
    ("stepz = 3\n", "r.toml: unknown key 'stepz'"),
    ("steps = \n", "r.toml: not valid TOML"),
])
def test_a_wrong_recipe_is_one_line(tmp_path, text, needle):
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(dtype="foo"), "--dtype foo: use auto, float32 (fp32) or bfloat16 (bf16)"),
    (dict(batch_tokens=100, seq_len=128), "--batch-tokens 100 is less than one row (--seq-len 128)"),
    (dict(batch_tokens=300, seq_len=128), "--batch-tokens 300 is not a multiple of --seq-len 128"),
    (dict(lr="fast"), '--lr must be a number (got "fast")'),
    (dict(save_dtype="fp16"), "--save-dtype fp16: use fp32 or bf16"),
    (dict(log=["mlflow"]), "--log mlflow"),
    (dict(no_merge=True), "--no-merge skips the merged final/ of a LoRA run: it needs --lora-rank"),
    (dict(epochs=0.0), "--epochs must be positive"),
    (dict(max_shard_size="big"), "--max-shard-size big"),
    (dict(keep_last=-1), "--keep-last must be 0 or more"),
])
def test_bad_settings_are_one_line(kw, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_settings():
    for d in DTYPES:  # bfloat16 stays accepted on CPU (training computes in fp32 there)
        TrainConfig(dtype=d).validate()
    c = TrainConfig(lr=1, max_shard_size="2GiB")  # an integer where a number is expected
    c.validate()
    assert isinstance(c.lr, float)
    # micro_batch_rows is a ceiling that divides the step's rows: 3 rows of 128 -> 3 micro-batches of 1
    c = TrainConfig(batch_tokens=384, seq_len=128, micro_batch_rows=2)
    assert (c.rows_per_micro_batch, c.accum) == (1, 3)


# ----------------------------------------------------------------------------- steps, epochs, the schedule

def test_resume_with_more_steps_keeps_a_monotonic_schedule(tmp_path):
    """A finished 3-step run (its last step kept) resumed with 5 steps stays at its final rate (it never
    rises again); a run resumed mid-way with more steps decays from its current rate to the final one at
    the new end; an extended run that is interrupted and resumed again follows the same curve."""
    kw = dict(steps=3, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1, save_every=1, keep_last=1)
    make_trainer(tmp_path, "short", **kw).run()
    logs = []
    make_trainer(tmp_path, "x", **{**kw, "steps": 5}, out=str(tmp_path / "short"), resume=str(tmp_path / "short"),
                 logs=logs).run()
    lrs = _lrs(tmp_path / "short")
    assert len(lrs) == 5 and lrs[2] == pytest.approx(1e-2)
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3)
    assert any("stays at its final 0.001" in m for m in logs), logs
    # mid-way: 8 steps, interrupted after step 3, resumed with 12
    mid = _stop_after(make_trainer(tmp_path, "mid", **{**kw, "steps": 8}), 3)
    mid.run()
    make_trainer(tmp_path, "x", **{**kw, "steps": 12}, out=str(tmp_path / "mid"), resume=str(tmp_path / "mid")).run()
    lrs = _lrs(tmp_path / "mid")
    assert len(lrs) == 12
    assert all(a >= b - 1e-15 for a, b in zip(lrs[1:], lrs[2:])), lrs  # never up after the warm-up
    assert lrs[-1] > 1e-3 and lrs[-1] < lrs[3]
    # the same extension, interrupted at step 6 and resumed with the run's steps: the same curve
    mid2 = _stop_after(make_trainer(tmp_path, "mid2", **{**kw, "steps": 8}), 3)
    mid2.run()
    ext = _stop_after(make_trainer(tmp_path, "x", **{**kw, "steps": 12}, out=str(tmp_path / "mid2"),
                                   resume=str(tmp_path / "mid2")), 6)
    ext.run()
    make_trainer(tmp_path, "x", **{**kw, "steps": 12}, out=str(tmp_path / "mid2"), resume=str(tmp_path / "mid2")).run()
    assert _lrs(tmp_path / "mid2") == pytest.approx(lrs, rel=1e-12, abs=0)
    # fewer steps than the checkpoint's: one line
    with pytest.raises(ConfigError, match="--steps 2: the checkpoint .* is at step 12 already"):
        make_trainer(tmp_path, "x", **{**kw, "steps": 2}, out=str(tmp_path / "z"), resume=str(tmp_path / "mid2"))


def test_epochs_set_the_steps_and_a_tiny_data_set_is_reported(tmp_path):
    docs = corpus()
    logs = []
    tr = Trainer(TrainConfig(out=str(tmp_path / "e"), epochs=2, seq_len=64, batch_tokens=256, micro_batch_rows=2,
                             save_every=0, progress=False),
                 model=tiny_model(), tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:], log=logs.append)
    rows = len(tr.train_rows)
    assert tr.cfg.steps == math.ceil(2 * rows / 4) and not tr.warnings
    assert any(f"--epochs 2: {tr.cfg.steps} steps ({rows} packed rows, 4 per step)" in m for m in logs), logs
    # 2 short documents: one packed row, a step takes 4 of them
    logs.clear()
    tiny = Trainer(TrainConfig(out=str(tmp_path / "t"), steps=2, seq_len=256, batch_tokens=1024, save_every=0,
                               progress=False),
                   model=tiny_model(), tokenizer=ByteTok(), train_docs=docs[:2], val_docs=docs[34:], log=logs.append)
    assert len(tiny.train_rows) == 1
    summary = tiny.run()
    assert any("data: 1 packed row but a step takes 4" in w for w in summary["warnings"]), summary
    assert any(m.startswith("warning: data: 1 packed row") for m in logs), logs


# ----------------------------------------------------------------------------- failures

def test_a_run_that_fails_at_once_leaves_no_directory(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(GemmaforgeError):
        Trainer(TrainConfig(out=str(out), data=[str(tmp_path / "missing.jsonl")], seq_len=64, batch_tokens=128,
                            progress=False), model=tiny_model(), tokenizer=ByteTok(), log=lambda m: None)
    assert not (tmp_path / "a").exists()
    # the model's context: one line naming --seq-len, before the data is packed
    with pytest.raises(ConfigError, match=r"--seq-len 4096 is longer than the model's context \(1024 tokens\)"):
        make_trainer(tmp_path, "ctx", seq_len=4096, batch_tokens=4096)
    assert not (tmp_path / "ctx").exists()
    # an incompatible resume into a new directory removes it; an existing directory stays
    make_trainer(tmp_path, "src", steps=2, save_every=1, keep_last=1).run()
    with pytest.raises(CheckpointError, match="incompatible checkpoint: lr"):
        make_trainer(tmp_path, "x", out=str(tmp_path / "fork"), resume=str(tmp_path / "src"), steps=4, lr=1.0)
    assert not (tmp_path / "fork").exists()
    with pytest.raises(CheckpointError):
        make_trainer(tmp_path, "x", out=str(tmp_path / "src"), resume=str(tmp_path / "src"), steps=4, lr=1.0)
    assert (tmp_path / "src" / "checkpoints" / "step-000002").exists()


# ----------------------------------------------------------------------------- logs

def test_plain_log_lines_without_a_progress_bar(tmp_path):
    logs = []
    tr = make_trainer(tmp_path, steps=8, eval_every=4, save_every=0, log_every=3)
    tr.log = logs.append
    tr.run()
    lines = [m for m in logs if m.startswith("step ")]
    # every 3rd step, the first and the last, and the steps that validated
    assert [int(m.split()[1].split("/")[0]) for m in lines] == [1, 3, 4, 6, 8], lines
    assert all("/8  loss " in m and " lr " in m and "tok/s" in m and "left" in m for m in lines), lines
    assert "val_loss" in lines[2]


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, steps=3, eval_every=2, save_every=0, log=["tensorboard"]).run()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 3]
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert all(abs(e.value - rows[e.step]["loss"]) < 1e-5 for e in acc.Scalars("train/loss"))
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/ppl"} <= set(acc.Tags()["scalars"])


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (not a gemmaforge dependency; --log wandb needs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_trainer(tmp_path, steps=2, save_every=0, log=["wandb"]).run()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "run" / "wandb").iterdir())


@pytest.mark.parametrize("name,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_one_line(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    tr = make_trainer(tmp_path, steps=1, save_every=0, log=[name])
    with pytest.raises(ConfigError, match=f"--log {name} needs the .* package"):
        tr.run()
    assert not (tmp_path / "run").exists()  # nothing of the run was left
