"""The training engine on a tiny model: learning, exact resume, NaN handling, bad input."""

import json
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
                eval_every=4, save_every=4, keep_last=3, progress=False, eval_rows=2, seed=1)
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
    assert (out / "final" / "model.safetensors").exists() and (out / "config.json").exists()
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


def test_tied_embedding_gradient_accumulated_in_place_equals_autograd(tmp_path):
    """The Trainer's lean tied-embedding path (no second [V, H] gradient) gives the same losses and
    weights as letting autograd sum the head's and the lookup's gradients."""
    from gemmaforge.cpu_policy import TiedEmbeddingGrad

    runs = []
    for lean in (True, False):
        tr = make_trainer(tmp_path, name=f"lean{lean}", steps=3, micro_batch_rows=2, batch_tokens=256)
        assert (tr.tied_grad is not None) is True
        if not lean:
            tr.tied_grad = None
        losses = [tr.train_step()["loss"] for _ in range(3)]
        runs.append((losses, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    (l1, w1), (l2, w2) = runs
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-6, atol=1e-6)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], rtol=1e-6, atol=1e-6, msg=n)
    # the padding row keeps a zero gradient, as nn.Embedding's padding_idx does
    tr = make_trainer(tmp_path, name="pad", steps=1)
    ids = torch.tensor([[0, 5, 0, 7]])
    leaf = tr.tied_grad.leaf(ids)
    leaf.grad = torch.ones_like(leaf)
    tr.model.model.embed_tokens.weight.grad = None
    tr.tied_grad.accumulate(ids, leaf)
    g = tr.model.model.embed_tokens.weight.grad
    assert g[0].abs().sum() == 0 and g[5].abs().sum() > 0
    assert not TiedEmbeddingGrad.applies(from_config(preset("mistral-tiny")))


def test_return_freed_memory_trims_before_the_loss_and_when_backward_grows(tmp_path):
    """On Linux CPU the Trainer hands freed heap memory back (malloc_trim) once after the forward;
    as the backward reaches each decoder block it reads the resident size, the first block sets the
    mark and a later block trims only when the size exceeds mark + slack; a later forward trims
    after a block whose size exceeds that mark. Losses equal a run without any of it."""
    import sys

    from gemmaforge.cpu_policy import ReturnFreedMemory

    tr = make_trainer(tmp_path, name="trim", steps=3)
    if not sys.platform.startswith("linux"):
        assert tr.trim is None
        return
    assert isinstance(tr.trim, ReturnFreedMemory) and tr.trim.slack == ReturnFreedMemory.SLACK
    n_layers = tr.model.config.num_hidden_layers
    assert n_layers >= 2
    calls, sizes = [], []
    real = tr.trim._trim
    tr.trim._trim = lambda pad: calls.append(pad) or real(pad)
    tr.trim.slack = 100

    def growing():  # resident size grows by 1000 bytes per reading: every later block trims
        sizes.append(10_000 + 1000 * len(sizes))
        return sizes[-1]

    tr.trim._rss = growing
    losses = [tr.train_step()["loss"]]
    a = tr.cfg.accum
    assert a == 2
    # backward: before each loss, then every block after the first; forward: no mark before the
    # first backward, then every block of the later micro-batches (each reading is above the mark)
    assert len(calls) == a * (1 + n_layers - 1) + (a - 1) * n_layers
    assert len(sizes) == a * n_layers + (a - 1) * n_layers
    calls.clear()
    tr.trim._rss = lambda: 10_000  # flat, below the mark: neither pass trims
    losses.append(tr.train_step()["loss"])
    assert len(calls) == tr.cfg.accum  # only before each loss
    calls.clear()
    tr.trim._rss = ReturnFreedMemory(None)._rss  # the real /proc reading
    assert tr.trim._rss() > 0
    losses.append(tr.train_step()["loss"])
    # the real size is far above the flat step's mark: the first forward may trim at every block
    assert tr.cfg.accum <= len(calls) <= tr.cfg.accum * 2 * n_layers
    calls.clear()
    with torch.no_grad():  # no gradient: no hooks, no trims
        tr.model(torch.tensor([[3, 4, 5]]))
    assert calls == []
    plain = make_trainer(tmp_path, name="notrim", steps=3)
    plain.trim = None
    without = [plain.train_step()["loss"] for _ in range(3)]
    assert losses == without


def test_return_freed_memory_only_where_most_weights_train():
    """The heap grows from gradients landing above freed activations: the Trainer trims for a full
    fine-tune, not for adapters (LoRA), whose trims cost page faults and saved little."""
    import sys

    from gemmaforge.cpu_policy import ReturnFreedMemory

    model = tiny_model()
    if not sys.platform.startswith("linux"):
        assert ReturnFreedMemory.for_model(model) is None
        return
    assert isinstance(ReturnFreedMemory.for_model(model), ReturnFreedMemory)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    for p in sorted(params, key=lambda p: -p.numel()):  # freeze the largest until under a quarter trains
        if 4 * sum(q.numel() for q in params if q.requires_grad) < total:
            break
        p.requires_grad_(False)
    assert ReturnFreedMemory.for_model(model) is None
    for p in params:
        p.requires_grad_(True)
    assert ReturnFreedMemory.for_model(model) is not None


def test_return_freed_memory_keeps_the_forward_below_the_backward_mark():
    """The forward trims only where the resident size passes the last backward's mark (the size
    just after the loss, reached anyway): never before the first backward, never below the mark."""
    from gemmaforge.cpu_policy import ReturnFreedMemory

    calls, size = [], [0]
    r = ReturnFreedMemory(calls.append, slack=50, rss=lambda: size[0])
    size[0] = 10**6
    r.during_forward()
    assert calls == []  # no backward yet: no mark
    size[0] = 1000
    r.during_backward()  # first block of a backward: the mark
    size[0] = 1040
    r.during_backward()
    size[0] = 1051
    r.during_backward()
    assert calls == [0]  # above mark + slack
    r._mark = None  # a new forward (the first block's hook resets the backward's mark)
    size[0] = 999
    r.during_forward()
    size[0] = 1000
    r.during_forward()
    assert calls == [0]
    size[0] = 1001
    r.during_forward()
    assert calls == [0, 0]


def test_head_grad_buffer_is_reused_across_steps_and_changes_nothing(tmp_path):
    """On CPU the Trainer gives the LM-head loss one [V, H] buffer for the tied head's gradient,
    every step (no fresh 671 MB gradient to page-fault in on the 270M): the weight's gradient lives
    in it after the backward, second micro-batches accumulate as usual, and losses and final
    weights equal a run that allocates a fresh gradient each step, bitwise."""
    from gemmaforge.cpu_policy import HeadGradBuffer

    tr = make_trainer(tmp_path, name="buf", steps=3)
    assert isinstance(tr.head_grad, HeadGradBuffer) and tr.cfg.accum == 2
    w = tr.model.lm_head.weight
    seen = []
    orig_step = tr.optimizer.step

    def step_and_look(*a, **k):
        seen.append(w.grad.data_ptr())
        return orig_step(*a, **k)

    tr.optimizer.step = step_and_look
    losses = [tr.train_step()["loss"] for _ in range(3)]
    assert tr.head_grad.buf is not None and seen == [tr.head_grad.buf.data_ptr()] * 3
    plain = make_trainer(tmp_path, name="nobuf", steps=3)
    plain.head_grad = None
    assert [plain.train_step()["loss"] for _ in range(3)] == losses
    for (n, p), q in zip(tr.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n
    # only while the weight's gradient is unset, trainable fp32, with gradients on
    hb = HeadGradBuffer()
    w2 = torch.nn.Parameter(torch.zeros(4, 3))
    assert hb.get(w2).shape == (4, 3)
    w2.grad = torch.zeros(4, 3)
    assert hb.get(w2) is None
    w2.grad = None
    with torch.no_grad():
        assert hb.get(w2) is None
    assert hb.get(torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))) is None
    assert hb.get(torch.zeros(4, 3)) is None  # frozen
    # a frozen head gets the chunk-logits workspace instead, the same one each step
    frozen = torch.zeros(4, 3)
    ws = hb.logits(frozen, 5)
    assert ws.shape == (5 * 4,) and ws.dtype == torch.float32 and hb.logits(frozen, 5) is ws
    assert hb.logits(w2, 5) is None  # a trained head's logits live in get()'s buffer
    with torch.no_grad():
        assert hb.logits(frozen, 5) is None


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
