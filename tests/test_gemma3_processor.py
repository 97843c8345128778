"""gemmaforge.load_processor against transformers 5.23's Gemma3Processor on generated images of several
sizes and aspect ratios: input_ids, token types and pixel_values equal (the real Gemma 3 tokenizer,
with the image soft token added as the released multimodal tokenizers have it; no network)."""

import json

import numpy as np
import pytest
import torch

import gemmaforge
from gemmaforge.errors import InputError
from gemmaforge.formats.hf import save_hf

import transformers  # noqa: E402  (the dev extra; pillow is a dependency)
from PIL import Image  # noqa: E402

SIZES = [(224, 224), (300, 200), (97, 410), (640, 480), (33, 35)]  # (width, height)


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(base)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF dir of a small multimodal Gemma 3 (the real tokenizer's vocabulary, 224 px, 16 soft tokens)."""
    import tokenizers

    from gemmaforge.formats.resolve import embedded_dir
    from gemmaforge.models.gemma3.config import Gemma3Config, SiglipVisionConfig

    d = tmp_path_factory.mktemp("mm")
    tok = tokenizers.Tokenizer.from_file(str(embedded_dir() / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken("<image_soft_token>", special=True, normalized=False)])
    assert tok.token_to_id("<image_soft_token>") == 262144
    cfg = Gemma3Config(vocab_size=262_208, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                       vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=224, patch_size=14),
                       mm_tokens_per_image=16)
    model = gemmaforge.from_config(cfg, seed=0)
    save_hf(model, d)
    tok.save(str(d / "tokenizer.json"))
    from gemmaforge.data.tokenizer import Tokenizer

    Tokenizer.from_file(d).save(d)  # tokenizer_config.json with the chat template
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "size": {"height": 224, "width": 224}, "resample": 2, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "image_seq_length": 16}))
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor",
                                                         "image_seq_length": 16}))
    return d


@pytest.fixture(scope="module")
def hf_proc(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ip = transformers.Gemma3ImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3, resample=2)
    return transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16)


def test_pixel_values_and_ids_equal_transformers(model_dir, hf_proc):
    proc = gemmaforge.load_processor(model_dir)
    for k, (w, h) in enumerate(SIZES):
        img = picture(w, h, k)
        text = f"Describe<start_of_image>this, then <start_of_image> that."
        ref = hf_proc(text=text, images=[img, picture(h, w, 10 + k)], return_tensors="pt")
        ours = proc(text=text, images=[img, picture(h, w, 10 + k)])
        assert torch.equal(ours["input_ids"], ref["input_ids"]), (w, h)
        assert torch.equal(ours["token_types"], ref["token_type_ids"]), (w, h)
        torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)


def test_messages_with_image_paths(model_dir, hf_proc, tmp_path):
    proc = gemmaforge.load_processor(model_dir)
    picture(300, 200, 1).save(tmp_path / "a.png")
    picture(120, 260, 2).save(tmp_path / "b.jpg", quality=95)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "And"},
                                             {"type": "image", "path": str(tmp_path / "b.jpg")},
                                             {"type": "text", "text": "what differs?"}]}]
    ours = proc(messages=messages, base_dir=tmp_path)
    text = hf_proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.removeprefix("<bos>")
    imgs = [Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.jpg")]
    ref = hf_proc(text=text, images=imgs, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
    assert int((ours["token_types"] == 1).sum()) == 32


def test_pan_and_scan_equal_transformers(model_dir, hf_proc):
    proc = gemmaforge.load_processor(model_dir)
    img = picture(900, 300, 5)  # wide: thumbnail + 3 crops of 300 px
    ref = hf_proc(text="<start_of_image>x", images=[img], do_pan_and_scan=True,
                  pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                  pan_and_scan_min_ratio_to_activate=1.2, return_tensors="pt")
    ours = proc(text="<start_of_image>x", images=[img], do_pan_and_scan=True)
    assert ours["pixel_values"].shape[0] == 4
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)


def test_processor_bad_inputs(model_dir, tmp_path):
    proc = gemmaforge.load_processor(model_dir)
    with pytest.raises(InputError, match="2 image placeholder.*but 1 image"):
        proc(text="<start_of_image> <start_of_image>", images=[picture(20, 20, 0)])
    with pytest.raises(InputError, match="1 image placeholder.*but 2 image"):
        proc(text="<start_of_image>", images=[picture(20, 20, 0), picture(20, 20, 1)])
    with pytest.raises(InputError, match="missing.png: image file not found"):
        proc(messages=[{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "missing.png")}]}])
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="bad.png: not a readable image"):
        proc(messages=[{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "bad.png")}]}])
    text_proc = gemmaforge.load_processor("gemma-3-270m")
    with pytest.raises(InputError, match="'image' part given to a model without a image tower"):
        text_proc(messages=[{"role": "user", "content": [{"type": "image", "path": "x.png"}]}])
