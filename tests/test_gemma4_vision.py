"""Gemma 4 vision against transformers 5.23 (Gemma4ForConditionalGeneration), tiny random configs, fp32:
the tower's soft tokens, the projected embeddings and the logits for one and two images, padded and
packed, on an E2B-like config (clipped linears, PLE, KV sharing) and a 31B-like one (image tokens
bidirectional on sliding layers, standardised tower)."""

import pytest
import torch
from _gemma4_mm import hf_like, mm_model, patches, prompt

from gemmaforge.errors import InputError

CASES = ["gemma-4-tiny-e2b-mm", "gemma-4-tiny-31b-mm"]


def _vision_case(name):
    m = mm_model(name)
    v = m.config.vision_config
    g = torch.Generator().manual_seed(1)
    # two images of different aspect ratios, padded to 8 soft tokens: 4x6 patches (6 tokens), 2x4 (2)
    pix, pos, n_soft = patches([(4, 6), (2, 4)], v.patch_size, v.pooling_kernel_size, 8, g)
    return m, hf_like(m), pix, pos, n_soft, g


@pytest.mark.parametrize("name", CASES)
def test_vision_features_and_projection_match_transformers(name):
    m, hf, pix, pos, n_soft, _ = _vision_case(name)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=pix, pixel_position_ids=pos).last_hidden_state
        feats, counts = m.model.vision_tower(pix, pos)
        ref_proj = hf.model.get_image_features(pix, pos).pooler_output
        proj = m.image_features(pix, pos)
    assert counts.tolist() == n_soft and feats.shape == ref.shape == (sum(n_soft), m.config.vision_config.hidden_size)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(proj, torch.cat(ref_proj), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_logits_one_image_match_transformers(name):
    m, hf, pix, pos, n_soft, g = _vision_case(name)
    ids, types = prompt(m.config, [("text", 5), ("image", n_soft[0]), ("text", 9)], g)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pix[:1], image_position_ids=pos[:1], mm_token_type_ids=types[None],
                 use_cache=False).logits
        ours = m(ids[None], pixel_values=pix[:1], image_position_ids=pos[:1])
        text_only = m(ids[None])
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (text_only - ref)[0, 6:].abs().max() > 1e-3  # the image changed what follows it


@pytest.mark.parametrize("name", CASES)
def test_logits_two_images_padded_batch_match_transformers(name):
    """Row 0 holds both images, row 1 none (padded on the left): images go in row-major order."""
    m, hf, pix, pos, n_soft, g = _vision_case(name)
    a, ta = prompt(m.config, [("text", 3), ("image", n_soft[0]), ("text", 4), ("image", n_soft[1]), ("text", 5)], g)
    b, tb = prompt(m.config, [("text", 10)], g)
    pad = len(a) - len(b)
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    types = torch.stack([ta, torch.cat([torch.zeros(pad, dtype=torch.long), tb])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pix, image_position_ids=pos,
                 mm_token_type_ids=types, use_cache=False).logits
        ours = m(ids, attention_mask=mask, pixel_values=pix, image_position_ids=pos)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, pad:], ref[1, pad:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_packed_documents_with_images_match_each_alone(name):
    """Two documents packed in one row (cu_seqlens), one image each: every document's logits equal the
    reference's on that document alone."""
    m, hf, pix, pos, n_soft, g = _vision_case(name)
    d0, t0 = prompt(m.config, [("text", 4), ("image", n_soft[0]), ("text", 6)], g)
    d1, t1 = prompt(m.config, [("image", n_soft[1]), ("text", 7)], g)
    ids = torch.cat([d0, d1])
    cu = torch.tensor([0, len(d0), len(ids)], dtype=torch.int32)
    with torch.no_grad():
        out = m(ids, cu_seqlens=cu, pixel_values=pix, image_position_ids=pos)
        for i, (d, t) in enumerate(((d0, t0), (d1, t1))):
            ref = hf(input_ids=d[None], pixel_values=pix[i:i + 1], image_position_ids=pos[i:i + 1],
                     mm_token_type_ids=t[None], use_cache=False).logits[0]
            torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=0)


def test_image_tokens_see_each_other_on_vision_bidirectional_configs():
    m, hf, pix, pos, n_soft, g = _vision_case("gemma-4-tiny-31b-mm")
    ids, _ = prompt(m.config, [("text", 2), ("image", n_soft[0]), ("text", 3)], g)
    with torch.no_grad():
        ours = m(ids[None], pixel_values=pix[:1], image_position_ids=pos[:1])
        ref_causal = hf(input_ids=ids[None], pixel_values=pix[:1], image_position_ids=pos[:1], use_cache=False).logits
    # without the token types the reference is causal: the first image token then differs from ours
    assert (ours[0, 3] - ref_causal[0, 3]).abs().max() > 1e-3


def test_image_count_mismatch_is_one_line():
    m, _, pix, pos, n_soft, g = _vision_case("gemma-4-tiny-e2b-mm")
    ids, _ = prompt(m.config, [("text", 2), ("image", n_soft[0]), ("text", 3)], g)
    with pytest.raises(InputError, match="image placeholder tokens"):
        m(ids[None], pixel_values=pix, image_position_ids=pos)  # two images, one placeholder run
    with pytest.raises(InputError, match="image_position_ids"):
        m(ids[None], pixel_values=pix[:1])


def test_text_only_model_refuses_pixels():
    from gemmaforge import from_config
    from gemmaforge.models.registry import preset

    m = from_config(preset("gemma-4-tiny-e2b-mm").text_only())
    _, _, pix, pos, _, _ = _vision_case("gemma-4-tiny-e2b-mm")
    with pytest.raises(InputError, match="text-only"):
        m(torch.tensor([[5, 6]]), pixel_values=pix, image_position_ids=pos)


def test_vision_gradients_reach_the_tower():
    m, _, pix, pos, n_soft, g = _vision_case("gemma-4-tiny-e2b-mm")
    ids, _ = prompt(m.config, [("text", 2), ("image", n_soft[0]), ("text", 3)], g)
    m.train()
    m(ids[None], pixel_values=pix[:1], image_position_ids=pos[:1]).sum().backward()
    for n in ("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
              "model.vision_tower.patch_embedder.position_embedding_table", "model.embed_vision.embedding_projection.weight"):
        assert m.get_parameter(n).grad.abs().sum() > 0, n


def test_released_tower_presets_have_the_published_sizes():
    """31B's vision tower: 569,550,384 tensors' values in the published extraction (parameters plus the
    standardisation buffers); E2B hears (audio tower, 1536-wide output), 31B does not."""
    from gemmaforge.models.registry import build_model, preset

    m = build_model(preset("gemma-4-31b-mm"), device="meta")
    tower = m.model.vision_tower
    assert sum(t.numel() for t in tower.state_dict().values()) == 569_550_384
    assert not hasattr(m.model, "audio_tower")
    e2b = preset("gemma-4-e2b-mm")
    assert e2b.audio_config.output_proj_dims == 1536 and e2b.vision_config.hidden_size == 768
