"""Gemma 4 audio against transformers 5.23, tiny random configs, fp32: the audio tower's soft tokens, the
projected embeddings and the logits (one clip, two clips of different lengths, audio and images in one
prompt, packed); the feature extractor and the image processor against transformers' on synthesised
audio and generated images; WAV reading; whole checkpoints both ways (tower keys included)."""

import io
import json
import wave

import numpy as np
import pytest
import torch
from _gemma4_mm import hf_like, hf_state, mm_model, patches, prompt

import gemmaforge
from gemmaforge.data.audio import Gemma4AudioFeatureExtractor, read_wav
from gemmaforge.data.gemma4_images import Gemma4ImageProcessor
from gemmaforge.errors import CheckpointError, InputError
from gemmaforge.formats.hf import save_hf

import transformers  # noqa: E402  (the dev extra)


def _clips(g, lengths=(37, 22)):
    """Two clips of log-mel-like features (16 bins, the tiny tower's width), padded to the longest."""
    T = max(lengths)
    feats = torch.randn(len(lengths), T, 16, generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    feats = feats * mask[..., None]
    return feats, mask, [int(m[::2][::2].sum()) for m in mask]


@pytest.fixture(scope="module")
def pair():
    m = mm_model("gemma-4-tiny-e2b-mm")
    return m, hf_like(m)


def test_audio_features_and_projection_match_transformers(pair):
    m, hf = pair
    feats, mask, n = _clips(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.audio_tower(feats, mask)
        ours, valid = m.model.audio_tower(feats, mask)
        ref_proj = hf.model.get_audio_features(feats, mask).pooler_output
        proj = m.audio_features(feats, mask)
    assert valid.sum(-1).tolist() == n and torch.equal(valid, ref.attention_mask)
    assert ref.last_hidden_state.abs().max() > 1.0
    torch.testing.assert_close(ours[valid], ref.last_hidden_state[valid], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(proj, ref_proj[ref.attention_mask], atol=1e-4, rtol=1e-5)


def test_logits_with_two_clips_match_transformers(pair):
    m, hf = pair
    g = torch.Generator().manual_seed(1)
    feats, mask, n = _clips(g)
    ids, types = prompt(m.config, [("text", 4), ("audio", n[0]), ("text", 3), ("audio", n[1]), ("text", 5)], g)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], input_features=feats, input_features_mask=mask, mm_token_type_ids=types[None],
                 use_cache=False).logits
        ours = m(ids[None], audio_features=feats, audio_mask=mask)
        text_only = m(ids[None])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (text_only - ref)[0, 6:].abs().max() > 1e-3


def test_audio_and_images_in_one_prompt_match_transformers(pair):
    """E2B-style: an image and a clip in one prompt, and the same document packed after another."""
    m, hf = pair
    g = torch.Generator().manual_seed(2)
    v = m.config.vision_config
    pix, pos, n_img = patches([(4, 6)], v.patch_size, v.pooling_kernel_size, 8, g)
    feats, mask, n_aud = _clips(g, (29,))
    ids, types = prompt(m.config, [("text", 3), ("image", n_img[0]), ("text", 2), ("audio", n_aud[0]), ("text", 6)], g)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pix, image_position_ids=pos, input_features=feats,
                 input_features_mask=mask, mm_token_type_ids=types[None], use_cache=False).logits[0]
        ours = m(ids[None], pixel_values=pix, image_position_ids=pos, audio_features=feats, audio_mask=mask)[0]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        other, _ = prompt(m.config, [("text", 9)], g)
        row = torch.cat([other, ids])
        cu = torch.tensor([0, len(other), len(row)], dtype=torch.int32)
        packed = m(row, cu_seqlens=cu, pixel_values=pix, image_position_ids=pos, audio_features=feats,
                   audio_mask=mask)
    torch.testing.assert_close(packed[len(other):], ref, atol=1e-4, rtol=0)


def test_audio_count_mismatch_is_one_line(pair):
    m, _ = pair
    feats, mask, n = _clips(torch.Generator().manual_seed(3))
    ids, _ = prompt(m.config, [("text", 2), ("audio", n[0]), ("text", 2)])
    with pytest.raises(InputError, match="audio placeholder tokens"):
        m(ids[None], audio_features=feats, audio_mask=mask)


# ----------------------------------------------------------------------------- preprocessing

def _waves():
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * 1.3)) / 16000
    a = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(len(t))).astype(np.float32)
    b = (0.3 * np.sin(2 * np.pi * 1000 * np.arange(7777) / 16000) * np.linspace(0, 1, 7777)).astype(np.float32)
    return a, b


def test_feature_extractor_equals_transformers():
    ref, ours = transformers.Gemma4AudioFeatureExtractor(), Gemma4AudioFeatureExtractor()
    a, b = _waves()
    for batch in ([a, b], [b], [a.astype(np.float64)]):
        r, o = ref(batch, return_tensors="np"), ours(batch)
        assert o["input_features"].shape == r["input_features"].shape
        np.testing.assert_array_equal(o["input_features"], r["input_features"])
        np.testing.assert_array_equal(o["input_features_mask"], r["input_features_mask"])
    long = np.tile(a, 25)  # 32.5 s: cut at 30 s as the reference does
    np.testing.assert_array_equal(ours([long])["input_features"], ref([long], return_tensors="np")["input_features"])
    with_pre = dict(preemphasis=0.97, per_bin_mean=list(np.linspace(-1, 1, 128)), per_bin_stddev=[2.0] * 128)
    np.testing.assert_array_equal(Gemma4AudioFeatureExtractor(**with_pre)([a, b])["input_features"],
                                  transformers.Gemma4AudioFeatureExtractor(**with_pre)([a, b], return_tensors="np")
                                  ["input_features"])


def test_audio_token_count_matches_the_tower():
    """The processor's count of audio placeholders equals the soft tokens the tower keeps."""
    m = mm_model("gemma-4-tiny-e2b-mm")
    fe = Gemma4AudioFeatureExtractor(feature_size=16)
    a, b = _waves()
    out = fe([a, b], return_tensors="pt")
    with torch.no_grad():
        _, valid = m.model.audio_tower(out["input_features"], out["input_features_mask"])
    assert [fe.num_soft_tokens(x) for x in out["input_features_mask"].numpy()] == valid.sum(-1).tolist()


def test_image_processor_equals_transformers():
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 500), (1000, 200), (48, 48), (37, 911), (768, 768)]]
    images.append(Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8)))  # grayscale
    images.append(Image.fromarray(rng.integers(0, 256, (120, 90, 4), dtype=np.uint8), "RGBA"))
    for soft in (280, 70):
        ref = transformers.Gemma4ImageProcessorPil(max_soft_tokens=soft)
        ours = Gemma4ImageProcessor(max_soft_tokens=soft)
        r, o = ref(images, return_tensors="np"), ours(images)
        np.testing.assert_array_equal(o["pixel_values"], r["pixel_values"])
        np.testing.assert_array_equal(o["image_position_ids"], r["image_position_ids"])
        assert o["num_soft_tokens_per_image"] == list(r["num_soft_tokens_per_image"])
        assert [ours.num_soft_tokens(im.height, im.width) for im in images] == o["num_soft_tokens_per_image"]


def _wav_bytes(x: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_read_wav_mono_stereo_resampled_and_bad_files(tmp_path):
    a, _ = _waves()
    (tmp_path / "a.wav").write_bytes(_wav_bytes(a, 16000))
    x = read_wav(tmp_path / "a.wav", 16000)
    assert x.dtype == np.float32 and np.abs(x - a).max() < 1e-4
    stereo = np.stack([a, a], 1).reshape(-1)
    (tmp_path / "s.wav").write_bytes(_wav_bytes(stereo, 16000, channels=2))
    assert np.abs(read_wav(tmp_path / "s.wav") - a).max() < 1e-4
    (tmp_path / "r.wav").write_bytes(_wav_bytes(a[::2], 8000))
    assert abs(len(read_wav(tmp_path / "r.wav", 16000)) - len(a)) <= 1
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(InputError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")
    with pytest.raises(InputError, match="not found"):
        read_wav(tmp_path / "missing.wav")


# ----------------------------------------------------------------------------- checkpoints

def test_hf_round_trip_with_tower_keys(tmp_path, pair):
    """transformers' checkpoint -> gemmaforge -> HF dir -> transformers: identical outputs, every tower
    tensor kept."""
    m, hf = pair
    src = tmp_path / "src"
    hf.save_pretrained(src)
    ours = gemmaforge.from_pretrained(src)
    assert type(ours).__name__ == "Gemma4ForConditionalGeneration"
    g = torch.Generator().manual_seed(5)
    v = ours.config.vision_config
    pix, pos, n_img = patches([(2, 4)], v.patch_size, v.pooling_kernel_size, 8, g)
    feats, mask, n_aud = _clips(g, (25,))
    ids, types = prompt(ours.config, [("text", 2), ("image", n_img[0]), ("audio", n_aud[0]), ("text", 4)], g)
    kw = dict(pixel_values=pix, image_position_ids=pos)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], input_features=feats, input_features_mask=mask, mm_token_type_ids=types[None],
                 use_cache=False, **kw).logits
        torch.testing.assert_close(ours(ids[None], audio_features=feats, audio_mask=mask, **kw), ref,
                                   atol=1e-4, rtol=0)
    dst = save_hf(ours, tmp_path / "dst")
    back = transformers.AutoModelForImageTextToText.from_pretrained(dst).eval()
    assert type(back).__name__ == "Gemma4ForConditionalGeneration"
    sd_back, sd_src = back.state_dict(), hf.state_dict()
    towers = [k for k in sd_src if ".audio_tower." in k or ".vision_tower." in k or ".embed_" in k]
    assert towers and all(torch.equal(sd_back[k], sd_src[k]) for k in towers)
    with torch.no_grad():
        again = back(input_ids=ids[None], input_features=feats, input_features_mask=mask,
                     mm_token_type_ids=types[None], use_cache=False, **kw).logits
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and cfg["audio_config"]["hidden_size"] == 32
    text = gemmaforge.from_pretrained(dst, text_only=True)
    assert not hasattr(text.model, "vision_tower") and not hasattr(text.model, "audio_tower")


def test_missing_tower_key_is_named(tmp_path, pair):
    from safetensors.torch import load_file, save_file

    _, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    key = "model.audio_tower.layers.1.self_attn.relative_k_proj.weight"
    assert key in sd
    del sd[key]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="relative_k_proj"):
        gemmaforge.from_pretrained(tmp_path / "hf")
    assert "model.audio_tower.layers.1.self_attn.relative_k_proj.weight" in hf_state(mm_model())


# ----------------------------------------------------------------------------- the processor

def test_processor_expands_images_and_audio_like_transformers(tmp_path):
    """Chat messages with an image and a WAV clip: the placeholders expand to as many soft tokens as
    transformers' image processor / feature extractor give (Gemma4Processor's rule), the media tensors
    equal theirs, token types 1 (image) and 3 (audio)."""
    from PIL import Image

    from gemmaforge.models.registry import preset

    cfg = preset("gemma-4-e2b-mm")
    proc = gemmaforge.load_processor("gemma-4-e2b-mm")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    a, _ = _waves()
    (tmp_path / "clip.wav").write_bytes(_wav_bytes(a, 16000))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "and"},
                                         {"type": "audio", "path": "clip.wav"}, {"type": "text", "text": "?"}]}]
    out = proc(messages=msgs, base_dir=tmp_path)
    ref_img = transformers.Gemma4ImageProcessorPil()([img], return_tensors="pt")
    ref_aud = transformers.Gemma4AudioFeatureExtractor()([read_wav(tmp_path / "clip.wav", 16000)], return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], ref_img["pixel_values"], atol=0, rtol=0)
    assert torch.equal(out["image_position_ids"], ref_img["image_position_ids"])
    torch.testing.assert_close(out["audio_features"], ref_aud["input_features"], atol=0, rtol=0)
    ids = out["input_ids"][0].tolist()
    n_img = int(ref_img["num_soft_tokens_per_image"][0])
    # Gemma4Processor.replace_audio_token: the frame mask subsampled by the two stride-2 convolutions
    mask = ref_aud["input_features_mask"][0]
    for _ in range(2):
        mask = mask[::2]
    n_aud = int(mask.sum())
    assert ids.count(cfg.image_token_id) == n_img and ids.count(cfg.audio_token_id) == n_aud
    s = ids.index(cfg.boi_token_id)
    assert ids[s + 1: s + 1 + n_img] == [cfg.image_token_id] * n_img and ids[s + 1 + n_img] == cfg.eoi_token_id
    s = ids.index(cfg.boa_token_id)
    assert ids[s + 1: s + 1 + n_aud] == [cfg.audio_token_id] * n_aud and ids[s + 1 + n_aud] == cfg.eoa_token_id
    types = out["token_types"][0]
    assert int((types == 1).sum()) == n_img and int((types == 3).sum()) == n_aud
    assert set(types.unique().tolist()) == {0, 1, 3}


class _Gemma4ProcessorNoVideo(transformers.Gemma4Processor):
    """transformers' Gemma4Processor, its class check of the video processor relaxed for None: its
    Gemma4VideoProcessor needs torchvision, which is not installable here; no video is processed."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return type(None)
        return super().check_argument_for_proper_class(name, arg)


def _hf_gemma4_processor(cfg):
    """Gemma4Processor over our tokenizer (the Gemma 3 vocabulary: the 270M package ships no Gemma 4
    tokenizer), whose media tokens are named by the ids of ``cfg``."""
    tok = gemmaforge.load_tokenizer()
    names = {"image_token": cfg.image_token_id, "boi_token": cfg.boi_token_id, "eoi_token": cfg.eoi_token_id,
             "audio_token": cfg.audio_token_id, "boa_token": cfg.boa_token_id, "eoa_token": cfg.eoa_token_id}
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={k: tok.id_to_token(i) for k, i in names.items()})
    assert hf_tok.image_token_id == cfg.image_token_id and hf_tok.audio_token_id == cfg.audio_token_id
    return _Gemma4ProcessorNoVideo(feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
                                   image_processor=transformers.Gemma4ImageProcessorPil(), tokenizer=hf_tok,
                                   video_processor=None), hf_tok


@pytest.mark.parametrize("sizes", [[(300, 500)], [(37, 911), (1000, 200)]])
def test_processor_input_ids_equal_gemma4_processor(tmp_path, sizes):
    """transformers' Gemma4Processor given our rendered prompt with one placeholder per image and clip
    (its input form) makes exactly our input_ids, token types, pixel values and audio features: the
    expansion of every image (sizes and aspect ratios) and clip (lengths) into soft tokens agrees."""
    from PIL import Image

    from gemmaforge.models.registry import preset

    cfg = preset("gemma-4-e2b-mm")
    proc = gemmaforge.load_processor("gemma-4-e2b-mm")
    hf, hf_tok = _hf_gemma4_processor(cfg)
    rng = np.random.default_rng(len(sizes))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    a, b = _waves()
    clips = [a, b[:7001]][: len(sizes)]
    content = []
    for k, img in enumerate(images):
        content.append({"type": "image", "image": img})
        (tmp_path / f"c{k}.wav").write_bytes(_wav_bytes(clips[k], 16000))
        content += [{"type": "text", "text": f"picture {k}, then"}, {"type": "audio", "path": f"c{k}.wav"}]
    content.append({"type": "text", "text": "what do you see and hear?"})
    out = proc(messages=[{"role": "user", "content": content}], base_dir=tmp_path)
    ids = out["input_ids"][0].tolist()
    # our prompt with each expanded run collapsed back to one placeholder: the text Gemma4Processor takes
    runs = {cfg.boi_token_id: (cfg.image_token_id, cfg.eoi_token_id), cfg.boa_token_id: (cfg.audio_token_id, cfg.eoa_token_id)}
    collapsed, i = [], 0
    while i < len(ids):
        if ids[i] in runs:
            soft, end = runs[ids[i]]
            j = ids.index(end, i)
            assert set(ids[i + 1:j]) == {soft}
            collapsed.append(soft)
            i = j + 1
        else:
            collapsed.append(ids[i])
            i += 1
    assert collapsed.count(cfg.image_token_id) == len(images) and collapsed.count(cfg.audio_token_id) == len(clips)
    text = hf_tok.decode(collapsed[1:] if collapsed[0] == hf_tok.bos_token_id else collapsed, skip_special_tokens=False)
    ref = hf(text=[text], images=[images], audio=[read_wav(tmp_path / f"c{k}.wav", 16000) for k in range(len(clips))],
             return_tensors="pt")
    assert ref["input_ids"][0].tolist() == ids
    assert torch.equal(ref["mm_token_type_ids"][0], out["token_types"][0])
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
    torch.testing.assert_close(out["audio_features"], ref["input_features"], atol=0, rtol=0)


def test_processor_bad_audio_file_is_one_line(tmp_path):
    from gemmaforge.data.gemma4_media import gemma4_handlers
    from gemmaforge.data.processor import Processor
    from gemmaforge.models.registry import preset

    proc = Processor(gemmaforge.load_tokenizer(), gemma4_handlers(preset("gemma-4-e2b-mm"), None))
    (tmp_path / "x.wav").write_bytes(b"RIFF0000WAVEjunk")
    msgs = [{"role": "user", "content": [{"type": "audio", "path": "x.wav"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="x.wav"):
        proc(messages=msgs, base_dir=tmp_path)


def test_expansion_from_the_file_alone_equals_the_processed_one(tmp_path):
    """What a training-data reader can know from a file's header equals what processing it gives."""
    from PIL import Image

    proc = gemmaforge.load_processor("gemma-4-e2b-mm")
    image_h, audio_h = proc.handler_for("image"), proc.handler_for("audio")
    rng = np.random.default_rng(2)
    for k, (h, w) in enumerate([(300, 500), (37, 911), (1000, 200)]):
        f = tmp_path / f"i{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f)
        assert image_h.expansion_of(f) == image_h([f])[1][0]
    a, b = _waves()
    for k, x in enumerate((a, b, a[:1000], a[:7001])):
        f = tmp_path / f"a{k}.wav"
        f.write_bytes(_wav_bytes(x, 16000))
        assert audio_h.expansion_of(f) == audio_h([f])[1][0], len(x)
