"""Fine-tuning a tiny Gemma 4 (E2B-like, vision + audio towers) on image+audio+text chat JSONL, fp32: the
loss goes down, image and audio tokens carry no loss, each document keeps its media whose placeholder
counts depend on the item (the image's size, the clip's length), frozen towers are unchanged and hold no
optimizer state, --train-vision / --train-audio train them, a bad audio file is named with its line."""

import io
import json
import wave

import numpy as np
import pytest
import torch
from _gemma4_mm import mm_model
from conftest import run_cli

from gemmaforge.data import load_documents, pack_documents
from gemmaforge.formats.hf import save_hf
from gemmaforge.formats.processor import build_processor
from gemmaforge.train.config import TrainConfig
from gemmaforge.train.trainer import Trainer

WORDS = "the cat sat on a mat and dog ran to big red house in morning sun what is this sound".split()
# the tiny preset's media tokens (gemma-4-tiny-e2b-mm)
SPECIAL = {"<start_of_turn>": 105, "<end_of_turn>": 106, "<|image>": 504, "<image|>": 505, "<|image|>": 506,
           "<|audio>": 508, "<audio|>": 509, "<|audio|>": 510}
IMG, AUD = 506, 510


def tiny_tokenizer():
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from gemmaforge.data.tokenizer import Tokenizer

    names = ["<pad>", "<eos>", "<bos>", "<unk>", *[f"▁{w}" for w in WORDS]]
    vocab = {n: i for i, n in enumerate(names)}
    vocab.update(SPECIAL)
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in SPECIAL])
    return Tokenizer(backend)


def _wav(path, seconds, freq, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    x = (0.4 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    path.write_bytes(buf.getvalue())


def _image(path, seed, size):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_data(d, n=6):
    (d / "media").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        # images of several sizes and aspect ratios (each resized to fill the 70-soft-token budget)
        _image(d / "media" / f"{k}.png", k, (8 + 4 * (k % 5), 8 + 4 * (k % 3)))
        _wav(d / "media" / f"{k}.wav", 0.08 + 0.04 * k, 200 + 100 * k)
        parts = [{"type": "image", "path": f"media/{k}.png"}, {"type": "audio", "path": f"media/{k}.wav"},
                 {"type": "text", "text": "what is this sound"}]
        reply = " ".join(WORDS[(k + i) % 10] for i in range(5))
        lines.append(json.dumps({"messages": [{"role": "user", "content": parts},
                                              {"role": "assistant", "content": reply}]}))
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("g4mm")
    model = mm_model("gemma-4-tiny-e2b-mm")
    save_hf(model, d / "model", tokenizer=build_processor(model.config, tiny_tokenizer(),
                                                          {"max_soft_tokens": 70}))
    return d, model, write_data(d / "data")


def _cfg(d, data, out, **kw):
    base = dict(model=str(d / "model"), data=[str(data)], steps=6, lr=3e-3, seq_len=96, batch_tokens=192,
                micro_batch_rows=2, dtype="float32", out=str(out), save_every=0, val_fraction=0.0, warmup_steps=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_media_tokens_carry_no_loss_and_counts_follow_each_item(setup):
    d, model, data = setup
    proc = build_processor(model.config, tiny_tokenizer(), {"max_soft_tokens": 70})
    docs = load_documents(data, proc)
    assert [len(doc.media) for doc in docs] == [2] * 6
    n_img = [sum(1 for i in doc.ids if i == IMG) for doc in docs]
    n_aud = [sum(1 for i in doc.ids if i == AUD) for doc in docs]
    assert len(set(n_img)) > 1 and len(set(n_aud)) > 1  # the counts depend on the item
    for doc, ni, na in zip(docs, n_img, n_aud):
        img_ref, aud_ref = doc.media
        got, _ = img_ref.handler([img_ref.source])
        with torch.no_grad():
            assert model.image_features(got["pixel_values"], got["image_position_ids"]).shape[0] == ni
            a, _ = aud_ref.handler([aud_ref.source])
            assert model.audio_features(a["audio_features"], a["audio_mask"]).shape[0] == na
    for r in pack_documents(docs, 96):
        assert not bool(((r.labels == IMG) | (r.labels == AUD) | (r.labels == 504) | (r.labels == 505)
                         | (r.labels == 508) | (r.labels == 509)).any())
        assert bool((r.labels != -100).any())


def test_fine_tune_on_image_audio_text_lowers_loss_towers_frozen(setup, tmp_path):
    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run"))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    towers = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
    tower = {id(p) for n, p in t.model.named_parameters() if n.startswith(towers)}
    assert tower and not any(p.requires_grad for n, p in t.model.named_parameters() if id(p) in tower)
    assert not (tower & {id(p) for g in t.optimizer.param_groups for p in g["params"]})
    t.run()
    assert not any(id(p) in tower for p in t.optimizer.state)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5, losses
    after = t.model.state_dict()
    for k, v in before.items():
        if k.startswith(towers):
            assert torch.equal(after[k], v), k
    final = tmp_path / "run" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and cfg["audio_config"] is not None
    pc = json.loads((final / "processor_config.json").read_text())
    assert pc["processor_class"] == "Gemma4Processor" and "feature_extractor" in pc and "image_processor" in pc


def test_train_audio_trains_the_audio_tower_only(setup, tmp_path):
    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run", steps=2, train_audio=True))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    after = t.model.state_dict()
    k_aud = "model.audio_tower.layers.0.self_attn.q_proj.linear.weight"
    k_img = "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"
    assert not torch.equal(after[k_aud], before[k_aud]) and torch.equal(after[k_img], before[k_img])


def test_bad_audio_file_is_named_with_its_line(setup, tmp_path):
    d, _, _ = setup
    data = tmp_path / "bad.jsonl"
    (tmp_path / "x.wav").write_text("not audio")
    msg = {"messages": [{"role": "user", "content": [{"type": "audio", "path": "x.wav"},
                                                     {"type": "text", "text": "the cat"}]},
                        {"role": "assistant", "content": "a dog"}]}
    data.write_text(json.dumps(msg) + "\n")
    r = run_cli("train", "--model", str(d / "model"), "--data", str(data), "--steps", "1", "--out",
                str(tmp_path / "o"), "--dtype", "float32")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.jsonl:1" in lines[0] and "x.wav" in lines[0], r.stderr


def test_generate_with_image_equals_full_recompute_and_chat_hears(setup, tmp_path):
    import gemmaforge

    d, _, data = setup
    _image(tmp_path / "a.png", 9, (16, 12))
    model = gemmaforge.from_pretrained(d / "model")
    proc = gemmaforge.load_processor(d / "model")
    text, st = gemmaforge.generate(model, proc, "what is this", images=[tmp_path / "a.png"], max_new_tokens=5,
                                   return_stats=True)
    batch = proc(text="<start_of_image>what is this", images=[tmp_path / "a.png"])
    ids = batch["input_ids"]
    n_img = proc.handler_for("image").image_processor.num_soft_tokens(12, 16)  # resized to fill the budget
    assert st.prompt_tokens == ids.shape[1] and int((ids == IMG).sum()) == n_img
    with torch.no_grad():  # greedy without a cache: the whole sequence each step
        for _ in range(len(st.ids)):
            nxt = int(model(ids, pixel_values=batch["pixel_values"],
                            image_position_ids=batch["image_position_ids"])[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert ids[0, batch["input_ids"].shape[1]:].tolist() == st.ids
    _wav(tmp_path / "a.wav", 0.2, 440)
    reply = gemmaforge.chat(model, proc, [{"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "a.wav")},
                                                                      {"type": "text", "text": "what"}]}],
                            max_new_tokens=3)
    assert isinstance(reply, str)
    r = run_cli("generate", "--model", str(d / "model"), "--image", str(tmp_path / "a.png"), "--prompt", "what is this",
                "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]


def test_lora_on_both_towers_loads_in_peft_with_identical_logits(setup, tmp_path):
    import peft  # the dev extra
    import transformers
    from _gemma4_mm import patches, prompt

    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run", steps=3, lr=1e-2, lora_rank=4, train_vision=True, train_audio=True,
                     no_merge=True))
    wrapped = [n for n, m in t.model.named_modules() if type(m).__name__ == "LoraLinear"]
    assert any(n.startswith("model.vision_tower.encoder.layers.1.self_attn.q_proj") for n in wrapped)
    assert any(n.startswith("model.audio_tower.layers.0.self_attn.relative_k_proj") for n in wrapped)
    assert any(n.startswith("model.layers.") for n in wrapped)
    t.run()
    adapter = tmp_path / "run" / "adapter"
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d / "model", dtype=torch.float32).eval()
    cfg = t.model.config
    g = torch.Generator().manual_seed(0)
    pix, pos, n_img = patches([(4, 6)], 4, 2, 8, g)
    feats = torch.randn(1, 25, 16, generator=g)
    mask = torch.ones(1, 25, dtype=torch.bool)
    ids, types = prompt(cfg, [("text", 2), ("image", n_img[0]), ("audio", 7), ("text", 3)], g)
    kw = dict(pixel_values=pix, image_position_ids=pos)
    with torch.no_grad():
        base = hf(input_ids=ids[None], input_features=feats, input_features_mask=mask, mm_token_type_ids=types[None],
                  **kw).logits
        pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
        ref = pm(input_ids=ids[None], input_features=feats, input_features_mask=mask, mm_token_type_ids=types[None],
                 **kw).logits
        t.model.eval()
        ours = t.model(ids[None], audio_features=feats, audio_mask=mask, **kw)
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_wraps_tower_layers_same_gradients():
    from _gemma4_mm import patches, prompt

    from gemmaforge.parallel.checkpointing import apply_activation_checkpointing, is_checkpointed

    def grads(ac):
        m = mm_model("gemma-4-tiny-e2b-mm").train()
        if ac:
            apply_activation_checkpointing(m)
            assert all(is_checkpointed(x) for x in m.model.vision_tower.encoder.layers)
            assert all(is_checkpointed(x) for x in m.model.audio_tower.layers)
        g = torch.Generator().manual_seed(3)
        pix, pos, n_img = patches([(4, 6), (2, 4)], 4, 2, 8, g)
        feats = torch.randn(1, 29, 16, generator=g)
        mask = torch.ones(1, 29, dtype=torch.bool)
        ids, _ = prompt(m.config, [("text", 3), ("image", n_img[0]), ("image", n_img[1]), ("audio", 8), ("text", 4)], g)
        m(ids[None], pixel_values=pix, image_position_ids=pos, audio_features=feats, audio_mask=mask).square().mean() \
            .backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and any("audio_tower" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


# ---- the towers under FSDP2 (2 CPU processes, gloo) ----

@pytest.mark.dist
def test_towers_under_fsdp2_equal_one_process(setup, tmp_path):
    """Gemma 4 with image and audio rows, both towers training, at FSDP2 x 2 on CPU: the towers' layers
    are FSDP2 units, and the losses and final weights equal one process's. (lr 1e-3: at 3e-3 this tiny
    model's gradient norm is ~100 and the layouts' fp32 rounding differences, 2e-7 at step 1, grow ~60x
    a step.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
    import mm_workers

    from gemmaforge.formats.hf import read_safetensors
    from gemmaforge.parallel.process import launch

    d, model, data = setup
    over = dict(train_vision=True, train_audio=True, seq_len=96, batch_tokens=384, steps=3, lr=1e-3)
    single = Trainer(mm_workers.mm_config(str(d / "model"), str(data), str(tmp_path / "single"), **over))
    single.run()
    res = launch(mm_workers.run_mm, 2, str(d / "model"), str(data), str(tmp_path / "fsdp"), over)[0]
    assert res["sharded"] == ["audio", "vision"], res["sharded"]
    got = [r["loss"] for r in res["metrics"] if "loss" in r]
    want = _losses(tmp_path / "single")
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5, (got, want)
    ref_w = read_safetensors(sorted((tmp_path / "single" / "final").glob("*.safetensors")))
    base_w = read_safetensors(sorted((d / "model").glob("*.safetensors")))
    for k, v in ref_w.items():
        torch.testing.assert_close(res["weights"][k], v.float(), atol=1e-5, rtol=0, msg=k)
    for k in ("model.audio_tower.layers.0.self_attn.q_proj.linear.weight",
              "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"):
        assert not torch.equal(ref_w[k], base_w[k]), k  # both towers trained
