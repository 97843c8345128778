"""Encoder features spliced next to token embeddings: scaling rule, gradients, training signal."""

import torch

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.multimodal import Projector, placeholder_positions


def _model():
    torch.manual_seed(0)
    return from_config(preset("gemma-3-tiny"))


def test_scaled_embeddings_spliced_reproduce_token_logits_exactly():
    m = _model()
    ids = torch.randint(10, 512, (2, 15))
    pos = torch.tensor([[3, 4, 5], [0, 7, 14]])
    feats = m.embed(ids.gather(1, pos))  # scaled embeddings of the tokens at those positions
    other = ids.clone()
    other.scatter_(1, pos, 1)  # placeholder tokens where the features go
    with torch.no_grad():
        torch.testing.assert_close(m(other, extra_embeds=feats, extra_positions=pos), m(ids), atol=0, rtol=0)
        # unscaled features are NOT scaled by the model: they differ
        raw = m.model.embed_tokens.weight[ids.gather(1, pos)]
        assert not torch.allclose(m(other, extra_embeds=raw, extra_positions=pos), m(ids))


def test_packed_row_splice_and_placeholder_helper():
    m = _model()
    ids = torch.randint(10, 512, (20,))
    ids[[2, 3, 12]] = 5
    pos = placeholder_positions(ids, 5)
    assert pos.tolist() == [2, 3, 12]
    feats = torch.randn(3, 64)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    with torch.no_grad():
        out = m(ids, cu_seqlens=cu, extra_embeds=feats, extra_positions=pos)
        alone = m(ids[8:][None], extra_embeds=feats[2:][None], extra_positions=torch.tensor([[4]]))
    torch.testing.assert_close(out[8:], alone[0], atol=1e-5, rtol=0)


def test_gradients_reach_the_projector_and_training_lowers_loss():
    m = _model()
    for p in m.parameters():
        p.requires_grad_(False)
    proj = Projector(16, 64, kind="mlp", out_scale=8.0)
    opt = torch.optim.AdamW(proj.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 16, generator=g)
    targets = torch.tensor([100, 200, 300, 400])
    losses = []
    for step in range(60):
        cls = torch.randint(0, 4, (8,), generator=g)
        feats = protos[cls][:, None, :] + 0.1 * torch.randn(8, 2, 16, generator=g)  # 2 "frames" per sample
        ids = torch.full((8, 4), 7)
        ids[:, 0] = 2
        # the class is read at the last feature frame's own position
        logits = m(ids, extra_embeds=proj(feats), extra_positions=torch.tensor([[2, 3]] * 8))
        loss = torch.nn.functional.cross_entropy(logits[:, -1], targets[cls])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
            assert all(p.grad is None for p in m.parameters())
        opt.step()
        losses.append(float(loss))
    # a frozen random head caps how confident the model can get; the fall itself is the signal
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
