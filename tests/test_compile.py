"""``--compile``: torch.compile per decoder block (``transforms.parallel.compile_blocks``, which
``parallelize`` and ``gemmaforge train --compile`` use) gives the eager model's loss and gradients.

Backend: ``aot_eager``. Inductor on this 2-core CPU needs over a minute to compile even the 2-layer
tiny model (measured 63 s for forward+backward, 90 s for the 4-layer one), so the test runs
dynamo's capture of each block, functionalization and AOTAutograd's joint forward/backward graph
and partition, with eager kernels: everything but inductor's code generation.
"""

import pytest
import torch

import gemmaforge
from gemmaforge.models.registry import preset
from gemmaforge.data import Document, collate_rows, pack_documents
from gemmaforge.ops.head_loss import chunked_cross_entropy
from gemmaforge.parallel.compile import compile_blocks


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches():
    """Two packed rows with different document layouts (documents longer than the sliding window)."""
    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(1, 512, (n,), generator=g).tolist()) for n in (5, 19, 3, 11, 26, 7, 13)]
    rows = pack_documents(docs, 32, strategy="greedy")
    assert len(rows) >= 2 and not torch.equal(rows[0].cu_seqlens, rows[1].cu_seqlens)
    return [collate_rows([r]) for r in rows[:2]]


def _loss_and_grads(model, batch):
    """The trainer's loss (final hidden states -> chunked cross-entropy sum / valid tokens) and its gradients."""
    model.zero_grad(set_to_none=True)
    hidden = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], return_hidden=True)
    loss = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                 batch["labels"].reshape(-1), chunk_size=16, reduction="sum")
    loss = loss / batch["num_valid_labels"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = preset("gemma-3-tiny", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    eager = gemmaforge.from_config(cfg, seed=0).train()
    compiled = gemmaforge.from_config(cfg, seed=0).train()
    for m in (eager, compiled):
        m.attn_backend = "eager"  # a mask built from cu_seqlens in-graph: one graph per block, no graph break
    compile_blocks(compiled, backend="aot_eager")
    assert list(dict(compiled.named_parameters())) == list(dict(eager.named_parameters()))  # names unchanged
    for batch in _batches():
        ref_loss, ref_grads = _loss_and_grads(eager, batch)
        loss, grads = _loss_and_grads(compiled, batch)
        assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
        for n, g in ref_grads.items():
            scale = g.abs().max().item()
            assert scale > 0, n
            d = (grads[n] - g).abs().max().item()
            assert d <= 1e-5 * max(scale, 1.0), f"{n}: grad differs by {d:.3g} (scale {scale:.3g})"
    # it really ran compiled: one captured graph per block (sliding / full), no graph breaks
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
