"""Gemma 3 multimodal image masks against transformers 5.23 (Gemma3ForConditionalGeneration, token_type_ids).

The reference (``create_masks_for_vision_model``) composes, per layer type:
full layers ``OR(causal, blockwise)``; sliding layers ``AND(sliding_window, OR(causal, blockwise))``,
the window one-sided (``kv > q - w``), so a later token of the same image stays visible however far.
Ours: ``doc AND (causal OR same_group) AND window`` on every Gemma 3 layer, with the document mask
keeping images of different packed documents apart. The tiny config has a window of 8; the images
below are 11 tokens long, so they straddle the window edge.
"""

import pytest
import torch

from gemmaforge import from_config
from gemmaforge.models.common.config import FULL, SLIDING
from gemmaforge.models.registry import preset
from gemmaforge.errors import InputError
from gemmaforge.layers.attention import AttnCall, build_seq_info
from gemmaforge.multimodal import group_ids_from_token_types

IMAGE = 500  # an in-vocabulary placeholder id: the reference embeds it like any other token
S = 24


@pytest.fixture(scope="module")
def pair():
    """Ours (gemma-3-tiny, window 8) and transformers' Gemma3ForConditionalGeneration with the same text weights."""
    import transformers

    torch.manual_seed(0)
    m = from_config(preset("gemma-3-tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-zero norms so every (1 + w) matters; logits of order 10
            p.normal_(0, 0.5) if p.dim() == 1 else p.normal_(0, 0.1)
    text = {k: v for k, v in m.config.to_hf().items() if k not in ("architectures", "dtype")}
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), image_token_id=IMAGE,
                                    mm_tokens_per_image=4)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert not [k for k in missing if "language_model" in k]  # only the (unused) vision tower is left
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    return m, hf


def _row(n, images, seed):
    """Token ids [n] and token types [n] (1 = image) with images at the given (start, end) spans."""
    g = torch.Generator().manual_seed(seed)
    ids, types = torch.randint(3, 400, (n,), generator=g), torch.zeros(n, dtype=torch.long)
    for s, e in images:
        ids[s:e], types[s:e] = IMAGE, 1
    return ids, types


def _ref(hf, ids, types):
    with torch.no_grad():
        return hf(input_ids=ids[None], token_type_ids=types[None], use_cache=False).logits[0]


# ----------------------------------------------------------------------------- the masks themselves

def test_group_ids_from_token_types_follow_the_reference():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    types = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1]])
    torch.testing.assert_close(group_ids_from_token_types(types), get_block_sequence_ids_for_mask(types))
    assert group_ids_from_token_types(types)[0].tolist() == [-1, 0, 0, -1, 1, -1, -1, 2]
    # Gemma 4 counts video (2) as vision too; audio (3) stays text
    assert group_ids_from_token_types(torch.tensor([0, 1, 2, 3, 2]), (1, 2)).tolist() == [-1, 0, 0, -1, 1]


def test_masks_equal_the_reference_padded(pair):
    """Our boolean masks per layer type equal transformers' (eager) masks on every real query."""
    from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                            get_block_sequence_ids_for_mask)

    m, hf = pair
    types = torch.zeros(3, S, dtype=torch.long)
    types[0, 3:14] = 1  # 11 image tokens: longer than the window (8)
    types[0, 16:19] = 1
    types[1, 9:20] = 1  # left-padded row
    types[2, 0:4] = 1  # right-padded row, image first
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, 15:] = 0
    text_cfg = hf.config.get_text_config()
    ref = create_masks_for_vision_model(config=text_cfg, inputs_embeds=torch.zeros(3, S, 8), attention_mask=mask,
                                        past_key_values=None, position_ids=None,
                                        block_sequence_ids=get_block_sequence_ids_for_mask(types))
    info = build_seq_info(3, S, torch.device("cpu"), attention_mask=mask, groups=group_ids_from_token_types(types))
    real = mask.bool()
    for layer_type in (FULL, SLIDING):
        window = m.config.window_for(layer_type)
        ours = AttnCall(info, info.doc, info.idx, window, 1.0, None, True, bidirectional_groups=True).dense_mask(3)
        theirs = ref[layer_type] == 0  # additive float mask: 0 = may attend
        assert ours.shape == theirs.shape == (3, 1, S, S)
        for b in range(3):
            torch.testing.assert_close(ours[b, 0][real[b]], theirs[b, 0][real[b]], msg=f"{layer_type} row {b}")
    # the straddling image: on sliding layers its first token sees its last (10 keys ahead), but
    # its last token no longer sees its first (10 keys back, outside the window of 8)
    sl = AttnCall(info, info.doc, info.idx, 8, 1.0, None, True, bidirectional_groups=True).dense_mask(3)[0, 0]
    assert sl[3, 13] and not sl[13, 3] and sl[13, 6] and not sl[2, 3] and sl[14, 13]


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_logits_match_reference(pair, backend):
    m, hf = pair
    rows = [_row(S, [(3, 14), (16, 19)], 1), _row(S, [(10, 21)], 2)]
    ids, types = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, use_cache=False).logits
        ours = m(ids, mm_groups=group_ids_from_token_types(types), attn_backend=backend)
        causal = m(ids, attn_backend=backend)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (causal[0, 3:13] - ref[0, 3:13]).abs().max() > 1e-3  # earlier image tokens see later ones
    torch.testing.assert_close(causal[0, :3], ref[0, :3], atol=1e-4, rtol=0)  # text before the image: causal


def test_padded_rows_equal_their_unpadded_reference(pair):
    m, hf = pair
    specs = [(S, [(3, 14)], 0), (17, [(9, 13)], 5), (12, [(0, 11)], 0)]  # (length, images, left padding)
    ids = torch.zeros(3, S, dtype=torch.long)
    groups = torch.full((3, S), -1, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    rows = []
    for b, (n, images, left) in enumerate(specs):
        r_ids, r_types = _row(n, images, 10 + b)
        rows.append((r_ids, r_types))
        ids[b, left:left + n], mask[b, left:left + n] = r_ids, 1
        groups[b, left:left + n] = group_ids_from_token_types(r_types)
    for backend in ("eager", "sdpa"):
        with torch.no_grad():
            out = m(ids, attention_mask=mask, mm_groups=groups, attn_backend=backend)
        for b, (r_ids, r_types) in enumerate(rows):
            torch.testing.assert_close(out[b][mask[b].bool()], _ref(hf, r_ids, r_types), atol=1e-4, rtol=0,
                                       msg=f"{backend} row {b}")


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_packed_documents_equal_their_reference(pair, backend):
    m, hf = pair
    docs = [_row(19, [(2, 13)], 20), _row(5, [], 21), _row(10, [(0, 4), (6, 9)], 22)]
    ids = torch.cat([d[0] for d in docs])
    # group ids restart in every document: equal ids across documents must not meet
    groups = torch.cat([group_ids_from_token_types(d[1]) for d in docs])
    cu = torch.tensor([0, 19, 24, 34], dtype=torch.int32)
    with torch.no_grad():
        out = m(ids, cu_seqlens=cu, mm_groups=groups, attn_backend=backend)
    for i, (d_ids, d_types) in enumerate(docs):
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], _ref(hf, d_ids, d_types), atol=1e-4, rtol=0,
                                   msg=f"doc {i}")


def test_packed_pattern_puts_no_weight_on_another_documents_image(pair):
    m, _ = pair
    docs = [_row(12, [(2, 9)], 30), _row(12, [(0, 5)], 31)]
    ids = torch.cat([d[0] for d in docs])
    groups = torch.cat([group_ids_from_token_types(d[1]) for d in docs])  # both images are group 0
    cu = torch.tensor([0, 12, 24], dtype=torch.int32)
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, cu_seqlens=cu, mm_groups=groups,
                                    names_filter=lambda n: n.endswith("hook_pattern"))
    for i in range(m.config.num_hidden_layers):
        p = cache["pattern", i][0]  # (H, T, T)
        assert (p[:, 12:, :12] == 0).all() and (p[:, :12, 12:] == 0).all(), i  # neither way, image or text
        assert (p[:, 12, 12:17] > 0).all(), i  # doc 1's first image token sees its whole image
        assert (p[:, 2, 3:9] > 0).all() and (p[:, 2, 9:12] == 0).all(), i  # doc 0's image, then causal text
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_image_spliced_as_features_matches_reference_inputs_embeds(pair):
    """The usual multimodal path: projected features at the image positions (extra_embeds) + mm_groups."""
    m, hf = pair
    ids, types = _row(S, [(4, 15)], 40)
    pos = (types == 1).nonzero()[:, 0]
    feats = torch.randn(1, len(pos), m.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 8
    with torch.no_grad():
        ours = m(ids[None], extra_embeds=feats, extra_positions=pos[None], mm_groups=group_ids_from_token_types(types))
        embeds = m.embed(ids[None]).index_put((torch.zeros_like(pos), pos), feats[0])
        ref = hf(inputs_embeds=embeds, token_type_ids=types[None], use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_kv_cache_prefill_with_image_then_decode_equals_full_forward(pair):
    m, _ = pair
    ids, types = _row(S, [(3, 14)], 50)
    groups = group_ids_from_token_types(types)[None]
    with torch.no_grad():
        full = m(ids[None], mm_groups=groups)
        cache = m.new_cache(32)
        steps = [m(ids[None, :16], cache=cache, mm_groups=groups[:, :16])]
        steps += [m(ids[None, t:t + 1], cache=cache, mm_groups=groups[:, t:t + 1]) for t in range(16, S)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input

def test_bad_mm_groups_are_one_line_input_errors(pair):
    m, _ = pair
    ids = torch.randint(3, 400, (1, 6))
    cases = [(torch.zeros(1, 5, dtype=torch.long), "6 entries"),
             (torch.zeros(1, 6), "integer tensor"),
             (torch.full((1, 6), -2), "-1 \\(text\\) or a group id"),
             ]
    with torch.no_grad():
        for groups, msg in cases:
            with pytest.raises(InputError, match=msg) as e:
                m(ids, mm_groups=groups)
            assert "\n" not in str(e.value)
        cache = m.new_cache(16)
        m(ids, cache=cache)
        with pytest.raises(InputError, match="first call"):
            m(ids[:, :1], cache=cache, mm_groups=torch.zeros(1, 1, dtype=torch.long))
        mistral = from_config(preset("mistral-tiny"))
        with pytest.raises(InputError, match="mm_groups: MistralForCausalLM has no bidirectional"):
            mistral(torch.randint(0, 100, (1, 4)), mm_groups=torch.zeros(1, 4, dtype=torch.long))


def test_gemma4_packed_pattern_bidirectional_on_sliding_layers_only():
    """Gemma 4 ("vision" configs) shares the same mask code: images bidirectional on sliding layers only."""
    m = from_config(preset("gemma-4-tiny-31b", use_bidirectional_attention="vision"), seed=0)
    docs = [_row(10, [(2, 6)], 60), _row(8, [(0, 3)], 61)]
    ids = torch.cat([d[0] for d in docs])
    groups = torch.cat([group_ids_from_token_types(d[1]) for d in docs])
    cu = torch.tensor([0, 10, 18], dtype=torch.int32)
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, cu_seqlens=cu, mm_groups=groups,
                                    names_filter=lambda n: n.endswith("hook_pattern"))
    for i, layer_type in enumerate(m.config.layer_types):
        p = cache["pattern", i][0]
        assert (p[:, 10:, :10] == 0).all() and (p[:, :10, 10:] == 0).all(), i
        if layer_type == SLIDING:
            assert (p[:, 2, 3:6] > 0).all() and (p[:, 10, 11:13] > 0).all(), i
        else:
            assert (p[:, 2, 3:] == 0).all() and (p[:, 10, 11:] == 0).all(), i
