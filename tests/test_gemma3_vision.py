"""Gemma 3 vision (SigLIP + multimodal projector + the whole Gemma3ForConditionalGeneration) against
transformers 5.23 on tiny random configs, fp32: vision features, projected embeddings and logits for
one and two images, padded and packed; the HF dir round trip; the strict key map."""

import json

import pytest
import torch

import gemmaforge
from gemmaforge.errors import CheckpointError, InputError
from gemmaforge.formats.hf import save_hf

import transformers  # noqa: E402  (the dev extra)

IMG, BOI, EOI = 511, 509, 510  # the tiny preset's image / start / end tokens


def tiny(seed=0):
    m = gemmaforge.from_config("gemma-3-tiny-vision", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norm weights (zero-init norms would hide a wrong norm formula)
        for n, p in m.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "vision_tower" in n else 0.0))
            elif p.dim() == 1 and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def hf_of(model):
    """transformers' Gemma3ForConditionalGeneration with the same config and weights (eager attention)."""
    d = model.config.to_hf()
    cfg = transformers.Gemma3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    from gemmaforge.formats.hf import hf_module_name

    missing, unexpected = hf.load_state_dict({hf_module_name(model, k): v for k, v in model.state_dict().items()},
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf


def image_block():
    return [BOI] + [IMG] * 4 + [EOI]


def doc(*parts):
    out = [2]
    for p in parts:
        out += image_block() if p == "img" else list(p)
    return out


@pytest.fixture(scope="module")
def pair():
    m = tiny()
    return m, hf_of(m)


def test_vision_features_and_projection_match(pair):
    m, hf = pair
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=px).last_hidden_state
        ours = m.model.vision_tower(px)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.image_features(px), hf.model.get_image_features(px).pooler_output,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_one_row(pair, n_images):
    m, hf = pair
    parts = [[5, 6], "img", [7, 8, 9]] + (["img", [10, 11]] if n_images == 2 else [])
    ids = torch.tensor([doc(*parts)])
    px = torch.randn(n_images, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, token_type_ids=(ids == IMG).long()).logits
        ours = m(ids, pixel_values=px)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_logits_padded_batch_two_images(pair):
    m, hf = pair
    a = doc([5, 6], "img", [7, 8, 9, 10, 11])
    b = doc([12], "img", [13])
    S = len(a)
    ids = torch.zeros(2, S, dtype=torch.long)
    mask = torch.zeros(2, S, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, S - len(b):], mask[1, S - len(b):] = torch.tensor(b), 1  # left padding
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = m(ids, attention_mask=mask, pixel_values=px)
        for r, row in enumerate((a, b)):
            one = torch.tensor([row])
            ref = hf(input_ids=one, pixel_values=px[r:r + 1], token_type_ids=(one == IMG).long()).logits[0]
            torch.testing.assert_close(ours[r][mask[r].bool()], ref, atol=1e-4, rtol=1e-4)


def test_logits_packed_several_images_per_document(pair):
    m, hf = pair
    docs = [doc([5], "img", [6, 7], "img", [8]), doc([9, 10, 11]), doc("img", [12, 13])]
    ids = torch.tensor(sum(docs, []))
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor([len(d) for d in docs]), 0)), dtype=torch.int32)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = m(ids, cu_seqlens=cu, pixel_values=px)
        k = 0
        for i, d in enumerate(docs):
            one = torch.tensor([d])
            n = int((one == BOI).sum())
            kw = dict(pixel_values=px[k:k + n], token_type_ids=(one == IMG).long()) if n else {}
            ref = hf(input_ids=one, **kw).logits[0]
            torch.testing.assert_close(ours[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=1e-4)
            k += n


def test_image_gradients_flow_to_the_tower(pair):
    m, _ = pair
    ids = torch.tensor([doc([5], "img", [6, 7])])
    m.zero_grad()
    m(ids, pixel_values=torch.randn(1, 3, 32, 32)).sum().backward()
    assert m.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert m.model.multi_modal_projector.mm_input_projection_weight.grad.abs().sum() > 0
    m.zero_grad()


def test_placeholder_count_mismatch_and_text_only_refusal(pair):
    m, _ = pair
    ids = torch.tensor([doc([5], "img", [6])])
    with pytest.raises(InputError, match="4 image placeholder tokens .* but 8 image feature vectors"):
        m(ids, pixel_values=torch.randn(2, 3, 32, 32))
    text = gemmaforge.from_config("gemma-3-tiny", seed=0)
    with pytest.raises(InputError, match="pixel_values given to a text-only model"):
        text(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError, match="reads 32x32 images"):
        m(ids, pixel_values=torch.randn(1, 3, 48, 48))


def test_hf_dir_round_trip(tmp_path, pair):
    m, _ = pair
    save_hf(m, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and cfg["vision_config"]["image_size"] == 32
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.tensor([doc([5], "img", [6, 7], "img", [8])])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, token_type_ids=(ids == IMG).long()).logits
        torch.testing.assert_close(m(ids, pixel_values=px), ref, atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own layout (vision_tower. without vision_model.)
    back = gemmaforge.from_pretrained(tmp_path / "hf")
    assert type(back).__name__ == "Gemma3ForConditionalGeneration"
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    save_hf(back, tmp_path / "again")
    hf2 = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=ids, pixel_values=px, token_type_ids=(ids == IMG).long()).logits,
                                   ref, atol=0, rtol=0)
    text = gemmaforge.from_pretrained(tmp_path / "hf", text_only=True)
    assert type(text).__name__ == "Gemma3ForCausalLM" and not any("vision" in k for k in text.state_dict())


def test_strict_tower_keys_named(tmp_path, pair):
    from safetensors.torch import load_file, save_file

    m, _ = pair
    save_hf(m, tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    sd = load_file(str(f))
    del sd["vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]
    sd["vision_tower.vision_model.encoder.layers.9.mlp.fc2.bias"] = torch.zeros(32)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        gemmaforge.from_pretrained(tmp_path / "d")
    msg = str(e.value)
    assert "missing 1 tensor(s): model.vision_tower.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected 1 tensor(s): model.vision_tower.encoder.layers.9.mlp.fc2.bias" in msg
    # --text-only does not read the towers at all
    assert type(gemmaforge.from_pretrained(tmp_path / "d", text_only=True)).__name__ == "Gemma3ForCausalLM"


def test_presets_build_on_meta():
    for name in ("gemma-3-4b-vision", "gemma-3-12b-vision", "gemma-3-27b-vision"):
        cfg = gemmaforge.preset(name)
        assert cfg.vision_config.num_hidden_layers == 27 and cfg.vision_config.hidden_size == 1152
        from gemmaforge.models.registry import build_model

        m = build_model(cfg, device="meta")
        n = sum(p.numel() for p in m.model.vision_tower.parameters())
        assert 410e6 < n < 420e6, n  # SigLIP so400m at 896 px


def test_gradients_match_transformers(pair):
    """The lean tower (recomputed norms and GELU) gives transformers' gradients."""
    m, hf = pair
    ids = torch.tensor([doc([5], "img", [6, 7], "img", [8])])
    px = torch.randn(2, 3, 32, 32)
    m.zero_grad()
    hf.zero_grad()
    m(ids, pixel_values=px).square().mean().backward()
    hf(input_ids=ids, pixel_values=px, token_type_ids=(ids == IMG).long()).logits.square().mean().backward()
    from gemmaforge.formats.hf import hf_module_name

    ref = dict(hf.named_parameters())
    for n, p in m.named_parameters():
        if "vision_tower" in n or "multi_modal_projector" in n:
            torch.testing.assert_close(p.grad, ref[hf_module_name(m, n)].grad, atol=1e-5, rtol=1e-4, msg=n)
    m.zero_grad()
    hf.zero_grad()
