"""The CPU policy (gemmaforge.cpu_policy): kept LM-head buffers, the in-place tied-embedding gradient,
allocator trims, blocked logits: each changes no number of a training step."""

import sys

import torch

from gemmaforge import cpu_policy, from_config
from gemmaforge.cpu_policy import HeadGradBuffer, LeanTiedEmbedding, ReturnFreedMemory
from gemmaforge.layers.embedding import ScaledEmbedding
from gemmaforge.layers.head import LMHead
from gemmaforge.models.registry import preset
from test_train import make_trainer, tiny_model


def test_tied_embedding_gradient_accumulated_in_place_equals_autograd(tmp_path):
    """The Trainer's lean tied-embedding path (no second [V, H] gradient) gives the same losses and
    weights as letting autograd sum the head's and the lookup's gradients."""
    runs = []
    for lean in (True, False):
        tr = make_trainer(tmp_path, name=f"lean{lean}", steps=3, micro_batch_rows=2, batch_tokens=256)
        assert isinstance(tr.model.model.embed_tokens, LeanTiedEmbedding)
        if not lean:
            tr.cpu.remove()
            assert type(tr.model.model.embed_tokens) is ScaledEmbedding and type(tr.model.lm_head) is LMHead
        losses = [tr.train_step()["loss"] for _ in range(3)]
        runs.append((losses, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    (l1, w1), (l2, w2) = runs
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-6, atol=1e-6)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], rtol=1e-6, atol=1e-6, msg=n)
    # the padding row keeps a zero gradient, as nn.Embedding's padding_idx does
    tr = make_trainer(tmp_path, name="pad", steps=1)
    emb = tr.model.model.embed_tokens
    ids = torch.tensor([[0, 5, 0, 7]])
    emb.weight.grad = None
    emb(ids).sum().backward()
    g = emb.weight.grad
    assert g[0].abs().sum() == 0 and g[5].abs().sum() > 0  # the lookup's rows, added into the weight's own grad
    m = from_config(preset("mistral-tiny")).train()  # untied: autograd's embedding
    policy = cpu_policy.for_training(m)
    assert type(m.model.embed_tokens) is not LeanTiedEmbedding and isinstance(m.lm_head, cpu_policy.CPUHead)
    policy.remove()


def test_return_freed_memory_trims_before_the_loss_and_when_backward_grows(tmp_path):
    """On Linux CPU the Trainer hands freed heap memory back (malloc_trim) once after the forward;
    as the backward reaches each decoder block it reads the resident size, the first block sets the
    mark and a later block trims only when the size exceeds mark + slack; a later forward trims
    after a block whose size exceeds that mark. Losses equal a run without any of it."""

    tr = make_trainer(tmp_path, name="trim", steps=3)
    trim = tr.cpu.trim
    if not sys.platform.startswith("linux"):
        assert trim is None
        return
    assert isinstance(trim, ReturnFreedMemory) and trim.slack == ReturnFreedMemory.SLACK
    n_layers = tr.model.config.num_hidden_layers
    assert n_layers >= 2
    calls, sizes = [], []
    real = trim._trim
    trim._trim = lambda pad: calls.append(pad) or real(pad)
    trim.slack = 100

    def growing():  # resident size grows by 1000 bytes per reading: every later block trims
        sizes.append(10_000 + 1000 * len(sizes))
        return sizes[-1]

    trim._rss = growing
    losses = [tr.train_step()["loss"]]
    a = tr.cfg.accum
    assert a == 2
    # backward: before each loss, then every block after the first; forward: no mark before the
    # first backward, then every block of the later micro-batches (each reading is above the mark)
    assert len(calls) == a * (1 + n_layers - 1) + (a - 1) * n_layers
    assert len(sizes) == a * n_layers + (a - 1) * n_layers
    calls.clear()
    trim._rss = lambda: 10_000  # flat, below the mark: neither pass trims
    losses.append(tr.train_step()["loss"])
    assert len(calls) == tr.cfg.accum  # only before each loss
    calls.clear()
    trim._rss = ReturnFreedMemory(None)._rss  # the real /proc reading
    assert trim._rss() > 0
    losses.append(tr.train_step()["loss"])
    # the real size is far above the flat step's mark: the first forward may trim at every block
    assert tr.cfg.accum <= len(calls) <= tr.cfg.accum * 2 * n_layers
    calls.clear()
    with torch.no_grad():  # no gradient: no hooks, no trims
        tr.model(torch.tensor([[3, 4, 5]]))
    assert calls == []
    plain = make_trainer(tmp_path, name="notrim", steps=3)
    plain.cpu.head.trim = None  # no trim before the loss, no trim hooks on the blocks
    for h in plain.cpu._hooks:
        h.remove()
    without = [plain.train_step()["loss"] for _ in range(3)]
    assert losses == without


def test_return_freed_memory_only_where_most_weights_train():
    """The heap grows from gradients landing above freed activations: the Trainer trims for a full
    fine-tune, not for adapters (LoRA), whose trims cost page faults and saved little."""
    import sys

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
    tr = make_trainer(tmp_path, name="buf", steps=3)
    head_grad = tr.cpu.head.buffers
    assert isinstance(head_grad, HeadGradBuffer) and tr.cfg.accum == 2
    w = tr.model.lm_head.weight
    seen = []
    orig_step = tr.optimizer.step

    def step_and_look(*a, **k):
        seen.append(w.grad.data_ptr())
        return orig_step(*a, **k)

    tr.optimizer.step = step_and_look
    losses = [tr.train_step()["loss"] for _ in range(3)]
    assert head_grad.buf is not None and seen == [head_grad.buf.data_ptr()] * 3
    plain = make_trainer(tmp_path, name="nobuf", steps=3)
    plain.cpu.head.buffers = None  # a fresh gradient and logits workspace each step
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
