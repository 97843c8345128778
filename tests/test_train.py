"""The training engine on a tiny model: learning, exact resume, NaN handling, bad input."""

import math

import pytest
import torch

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.data import Document
from gemmaforge.train import TrainConfig, Trainer, TrainingStopped, read_metrics


class ByteTok:
    """Enough of a tokenizer for the trainer: bytes shifted past the specials."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [b + 4 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 4 for i in ids if i >= 4).decode(errors="replace")

    def save(self, d):
        pass


def corpus(n_docs=40, seed=0):
    """Synthetic, learnable: repeated arithmetic-progression 'sentences'."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    tok = ByteTok()
    for _ in range(n_docs):
        a = int(torch.randint(0, 5, (1,), generator=g))
        text = " ".join(f"{a + i} plus one is {a + i + 1}." for i in range(int(torch.randint(2, 6, (1,), generator=g))))
        docs.append(Document(tok.encode(text) + [tok.eos_id]))
    return docs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return from_config(preset("gemma-3-tiny", vocab_size=264, sliding_window=16)).train()


def make_trainer(tmp_path, name="run", model=None, **kw):
    docs = corpus()
    base = dict(out=str(tmp_path / name), steps=12, lr=3e-3, warmup_steps=2, seq_len=64, batch_tokens=128, micro_batch_rows=1,
                eval_every=4, save_every=4, keep_last=3, progress=False, eval_rows=2, seed=1,
                dtype="float32")  # exact comparisons; the bf16 path: test_cpu_bf16.py
    base.update(kw)
    return Trainer(TrainConfig(**base), model=model or tiny_model(), tokenizer=ByteTok(),
                   train_docs=docs[:34], val_docs=docs[34:], log=lambda m: None)


def test_training_lowers_validation_loss_and_writes_outputs(tmp_path):
    tr = make_trainer(tmp_path, steps=20)
    summary = tr.run()
    before, after = summary["val_before"]["val_loss"], summary["val_after"]["val_loss"]
    assert after < before - 0.5, (before, after)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys() and math.isfinite(r["loss"])
    assert any("val_loss" in r for r in steps)  # evaluation rows
    out = tmp_path / "run"
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "final" / "model.safetensors").exists() and (out / "recipe.toml").exists()
    assert len(list((out / "checkpoints").iterdir())) <= 3


def test_loss_is_mean_over_all_valid_tokens_of_the_step(tmp_path):
    """Accumulating 2 micro-batches gives the same loss and update as one batch of 2 rows."""
    a = make_trainer(tmp_path, "a", steps=1, micro_batch_rows=1, batch_tokens=128)
    b = make_trainer(tmp_path, "b", steps=1, micro_batch_rows=2, batch_tokens=128)
    grads = {}
    for name, tr in (("a", a), ("b", b)):
        def capture(name=name, tr=tr):
            grads[name] = [p.grad.clone() for p in tr.model.parameters()]
        tr.optimizer.step = capture  # look at the gradients the optimizer would apply
    ra, rb = a.train_step(), b.train_step()
    assert ra["valid_tokens"] == rb["valid_tokens"] > 0
    assert abs(ra["loss"] - rb["loss"]) < 1e-6
    for ga, gb in zip(grads["a"], grads["b"]):
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-5)


def test_resume_reproduces_the_uninterrupted_curve(tmp_path):
    full = make_trainer(tmp_path, "full")
    full.run()
    part = make_trainer(tmp_path, "part")
    for _ in range(5):  # interrupted after step 5 (last checkpoint at step 4 + this explicit save)
        part._write_metrics(part.train_step())
    part.save_checkpoint()
    del part
    resumed = make_trainer(tmp_path, "part2", model=tiny_model(seed=123), out=str(tmp_path / "part"),
                           resume=str(tmp_path / "part"))
    assert resumed.step == 5
    resumed.run()
    la = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert len(la) == len(lb) == 12
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6, (la, lb)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_injected_nan_is_skipped_named_and_weights_untouched(tmp_path):
    logs = []
    tr = make_trainer(tmp_path, steps=4)
    tr.log = logs.append
    target = tr.model.model.layers["1"].mlp.down_proj
    calls = {"n": 0, "poison_step": 2}

    def poison(mod, inp, out):
        if tr.step + 1 == calls["poison_step"]:
            return out * float("nan")
        return out

    h = target.register_forward_hook(poison)
    tr._write_metrics(tr.train_step())
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    row = tr.train_step()  # step 2: poisoned
    assert row.get("skipped") is True
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert any("model.layers.1.mlp.down_proj" in m and "forward" in m for m in logs), logs
    row = tr.train_step()  # step 3: healthy again, weights move
    assert not row.get("skipped")
    assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
    h.remove()


def test_consecutive_bad_steps_stop_the_run(tmp_path):
    tr = make_trainer(tmp_path, steps=10, max_bad_steps=2)
    tr.model.model.layers["0"].self_attn.o_proj.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(TrainingStopped, match="2 consecutive non-finite steps.*model.layers.0.self_attn.o_proj"):
        tr.run()


def test_resume_incompatible_checkpoint(tmp_path):
    from gemmaforge.errors import CheckpointError

    tr = make_trainer(tmp_path, steps=1)
    tr.train_step()
    tr.save_checkpoint()
    with pytest.raises(CheckpointError, match="checkpoint"):
        make_trainer(tmp_path, "other", resume=str(tmp_path / "run"), seq_len=32)


def test_unwritable_out(tmp_path):
    from gemmaforge.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        make_trainer(tmp_path, out=str(blocker / "sub"))


def test_recipe_toml_and_unknown_key(tmp_path):
    from gemmaforge.errors import ConfigError
    from gemmaforge.train import load_recipe

    p = tmp_path / "r.toml"
    p.write_text('steps = 7\nseq-len = 32\nlr = 0.01\n')
    assert load_recipe(p) == {"steps": 7, "seq_len": 32, "lr": 0.01}
    p.write_text('stepz = 7\n')
    with pytest.raises(ConfigError, match="r.toml: unknown key 'stepz'"):
        load_recipe(p)


def test_default_step_is_one_forward_and_micro_batches_never_exceed_the_step():
    """The default step (batch_tokens 512 = 2 rows of 256) runs as one forward: a second micro-batch
    would hold a second [V, H] gradient of the tied head. micro_batch_rows is a ceiling: a step never
    takes more rows than batch_tokens // seq_len."""
    c = TrainConfig()
    assert (c.rows_per_micro_batch, c.accum) == (2, 1) and c.batch_tokens == 2 * c.seq_len
    assert (TrainConfig(micro_batch_rows=1).rows_per_micro_batch, TrainConfig(micro_batch_rows=1).accum) == (1, 2)
    small = TrainConfig(batch_tokens=64, seq_len=64)
    assert (small.rows_per_micro_batch, small.accum) == (1, 1)
    big = TrainConfig(batch_tokens=2048, seq_len=256, micro_batch_rows=4)
    assert (big.rows_per_micro_batch, big.accum) == (4, 2)
