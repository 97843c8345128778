"""Fine-tuning Gemma 3 vision on image+text chat JSONL (tiny configs, fp32): the loss goes down, image
tokens carry no loss, a frozen tower is unchanged and holds no optimizer state, --train-vision trains
it, LoRA on the vision tower gives an adapter PEFT loads onto transformers' model with the same logits,
and bad media inputs are one line with exit code 2."""

import json

import pytest
import torch

from _gemma3_mm import BOI, EOI, IMG, save_tiny_dir, tiny_model, tiny_tokenizer, write_chat_jsonl, write_image
from conftest import run_cli

from gemmaforge.data import load_documents, pack_documents
from gemmaforge.formats.processor import build_processor
from gemmaforge.train.config import TrainConfig
from gemmaforge.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("g3v")
    model = tiny_model()
    save_tiny_dir(model, d / "model")
    data = write_chat_jsonl(d / "data")
    return d, model, data


def _cfg(d, data, out, **kw):
    base = dict(model=str(d / "model"), data=[str(data)], steps=6, lr=3e-3, seq_len=64, batch_tokens=128,
                micro_batch_rows=2, dtype="float32", out=str(out), save_every=0, val_fraction=0.0, warmup_steps=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_image_tokens_carry_no_loss_and_documents_keep_their_images(setup):
    d, model, data = setup
    proc = build_processor(model.config, tiny_tokenizer())
    docs = load_documents(data, proc)
    assert [len(doc.media) for doc in docs] == [1, 2, 1, 2, 1, 2]
    assert all(str(r.source).startswith(str(d / "data" / "img")) for doc in docs for r in doc.media)
    rows = pack_documents(docs, 64)
    for r in rows:
        ids, labels = r.input_ids, r.labels
        assert int((ids == IMG).sum()) == 4 * len(r.media)  # every image's soft tokens are in the row
        assert not bool(((labels == IMG) | (labels == BOI) | (labels == EOI)).any())  # never a target
        assert bool((labels != -100).any())


def test_fine_tune_lowers_loss_frozen_tower_unchanged_no_optimizer_state(setup, tmp_path):
    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run"))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    tower = {id(p) for n, p in t.model.named_parameters() if ".vision_tower." in n or "multi_modal_projector" in n}
    assert tower and not any(p.requires_grad for n, p in t.model.named_parameters() if id(p) in tower)
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not (tower & in_optimizer)
    t.run()
    assert not any(id(p) in tower for p in t.optimizer.state)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5, losses
    after = t.model.state_dict()
    for k, v in before.items():
        if ".vision_tower." in k or "multi_modal_projector" in k:
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    # the exported final/ is whole: towers and preprocessing config included
    final = tmp_path / "run" / "final"
    assert (final / "preprocessor_config.json").exists()
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"]


def test_train_vision_trains_the_tower_with_checkpointed_layers(setup, tmp_path):
    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run", steps=2, train_vision=True, activation_checkpointing=True))
    assert type(t.model.model.vision_tower.encoder.layers[0]).__name__ == "CheckpointedLayer"
    w = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    before = t.model.state_dict()[w].clone()
    t.run()
    assert not torch.equal(t.model.state_dict()[w], before)
    assert any(p is dict(t.model.named_parameters())[w] for p in t.optimizer.state)


def test_lora_on_the_vision_tower_loads_in_peft_with_identical_logits(setup, tmp_path):
    import peft  # the dev extra
    import transformers
    d, model, data = setup
    t = Trainer(_cfg(d, data, tmp_path / "run", steps=3, lr=1e-2, lora_rank=4, train_vision=True, no_merge=True))
    wrapped = [n for n, m in t.model.named_modules() if type(m).__name__ == "LoraLinear"]
    assert any(n.startswith("model.vision_tower.encoder.layers.1.self_attn.") for n in wrapped)
    assert any(n.endswith("mlp.fc2") and "vision_tower" in n for n in wrapped)
    assert any(n.startswith("model.layers.") for n in wrapped)
    t.run()
    adapter = tmp_path / "run" / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert "vision_tower" in conf["target_modules"]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, BOI] + [IMG] * 4 + [EOI, 7, BOI] + [IMG] * 4 + [EOI, 8, 9]])
    px = torch.randn(2, 3, 32, 32)
    tt = (ids == IMG).long()
    with torch.no_grad():
        base = hf(input_ids=ids, pixel_values=px, token_type_ids=tt).logits
    pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    t.model.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids, pixel_values=px, token_type_ids=tt).logits
        ours = t.model(ids, pixel_values=px)
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ---- bad inputs through the CLI: one line, exit 2 ----

def _train_cli(model_dir, data, out):
    return run_cli("train", "--model", str(model_dir), "--data", str(data), "--steps", "1", "--seq-len", "64",
                   "--batch-tokens", "128", "--dtype", "float32", "--out", str(out), "--save-every", "0",
                   "--val-fraction", "0")


def _one_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    err = lines[-1]
    for n in needles:
        assert n in err, (n, err)


def test_cli_missing_and_unreadable_image_named_with_its_line(setup, tmp_path):
    d, model, data = setup
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "ok.png", 1)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG but not really")
    msg = lambda p: json.dumps({"messages": [  # noqa: E731
        {"role": "user", "content": [{"type": "image", "path": p}, {"type": "text", "text": "what"}]},
        {"role": "assistant", "content": "the cat"}]})
    (tmp_path / "a.jsonl").write_text(msg("img/ok.png") + "\n" + msg("img/nope.png") + "\n")
    _one_line(_train_cli(d / "model", tmp_path / "a.jsonl", tmp_path / "r1"), "a.jsonl:2:", "nope.png",
              "image file not found")
    (tmp_path / "b.jsonl").write_text(msg("img/ok.png") + "\n\n" + msg("img/bad.png") + "\n")
    _one_line(_train_cli(d / "model", tmp_path / "b.jsonl", tmp_path / "r2"), "b.jsonl:3:", "bad.png",
              "not a readable image")


def test_cli_media_to_a_text_only_model_and_placeholder_mismatch(setup, tmp_path):
    d, model, data = setup
    from gemmaforge.formats.hf import save_hf

    text_dir = tmp_path / "text"
    from gemmaforge.models.registry import build_model

    save_hf(build_model(model.config.text_only()), text_dir, tokenizer=tiny_tokenizer())
    _one_line(_train_cli(text_dir, data, tmp_path / "r1"), "data.jsonl:1:", "image part given to a text-only model")
    write_image(tmp_path / "x.png", 3)
    line = json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "path": "x.png"},
                                     {"type": "text", "text": "and <start_of_image> here"}]},
        {"role": "assistant", "content": "the cat"}]})
    (tmp_path / "c.jsonl").write_text(line + "\n")
    _one_line(_train_cli(d / "model", tmp_path / "c.jsonl", tmp_path / "r2"), "c.jsonl:1:",
              "8 media placeholder tokens for 1 media item(s) (expected 4)")


# ---- generation with images ----

def test_generate_with_images_equals_full_recompute(setup, tmp_path):
    import gemmaforge

    d, model, data = setup
    img = write_image(tmp_path / "a.png", 7)
    model = gemmaforge.from_pretrained(d / "model")
    proc = gemmaforge.load_processor(d / "model")
    text, st = gemmaforge.generate(model, proc, "what is this", images=[img], max_new_tokens=6, return_stats=True)
    batch = proc(text="<start_of_image>what is this", images=[img])
    ids = batch["input_ids"]
    assert st.prompt_tokens == ids.shape[1]
    with torch.no_grad():  # greedy without a cache: the whole sequence each step
        for _ in range(len(st.ids)):
            nxt = int(model(ids, pixel_values=batch["pixel_values"])[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert ids[0, batch["input_ids"].shape[1]:].tolist() == st.ids
    reply = gemmaforge.chat(model, proc, [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                                                      {"type": "text", "text": "what"}]}],
                            max_new_tokens=3)
    assert isinstance(reply, str)


def test_cli_generate_and_chat_with_image(setup, tmp_path):
    d, model, data = setup
    img = write_image(tmp_path / "a.png", 7)
    r = run_cli("generate", "--model", str(d / "model"), "--image", str(img), "--image", str(img), "--prompt",
                "what is this", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("generate", "--model", str(d / "model"), "--image", str(img), "--chat", "--prompt", "what",
                "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gemmaforge", "chat", "--model", str(d / "model"), "--image", str(img),
                        "--max-new-tokens", "3"], input="what is this\nand this\n", capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _one_line(run_cli("generate", "--model", str(d / "model"), "--image", str(tmp_path / "nope.png"), "--prompt", "x"),
              "nope.png", "image file not found")
    _one_line(run_cli("generate", "--model", str(d / "model"), "--image", str(img), "--prompt",
                      "<start_of_image> and <start_of_image>"), "2 image placeholder(s) in the prompt but 1 image(s)")


def test_cli_generate_image_refused_by_a_text_only_model(setup, tmp_path):
    d, model, data = setup
    img = write_image(tmp_path / "a.png", 7)
    _one_line(run_cli("generate", "--model", "gemma-3-270m", "--image", str(img), "--prompt", "x",
                      "--max-new-tokens", "1"), "--image given to a text-only model (Gemma3ForCausalLM)")


def test_cli_text_only_flag_keeps_the_text_decoder(setup, tmp_path):
    d, model, data = setup
    img = write_image(tmp_path / "a.png", 7)
    _one_line(run_cli("generate", "--model", str(d / "model"), "--text-only", "--image", str(img), "--prompt", "x"),
              "--image given to a text-only model (Gemma3ForCausalLM)")
    r = run_cli("generate", "--model", str(d / "model"), "--text-only", "--prompt", "the cat", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "--model", str(d / "model"), "--text-only", "--data", str(data), "--steps", "1",
                "--seq-len", "64", "--batch-tokens", "128", "--dtype", "float32", "--out", str(tmp_path / "r"),
                "--save-every", "0", "--val-fraction", "0")
    _one_line(r, "data.jsonl:1:", "image part given to a text-only model")


# ---- the towers under FSDP2 (2 CPU processes, gloo) ----

@pytest.mark.dist
@pytest.mark.parametrize("train_vision", [False, True])
def test_towers_under_fsdp2_equal_one_process(setup, tmp_path, train_vision):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
    import mm_workers

    from gemmaforge.formats.hf import read_safetensors
    from gemmaforge.parallel.process import launch
    from gemmaforge.train import read_metrics

    d, model, data = setup
    over = dict(train_vision=train_vision)
    single = Trainer(mm_workers.mm_config(str(d / "model"), str(data), str(tmp_path / "single"), **over))
    single.run()
    ref = read_metrics(str(tmp_path / "single" / "metrics.jsonl"))
    res = launch(mm_workers.run_mm, 2, str(d / "model"), str(data), str(tmp_path / "fsdp"), over)[0]
    assert res["sharded"] == ["vision"], "the vision tower's layers are FSDP2 units"
    got = [r["loss"] for r in res["metrics"] if "loss" in r]
    want = [r["loss"] for r in ref if "loss" in r]
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5, (got, want)
    ref_w = read_safetensors(sorted((tmp_path / "single" / "final").glob("*.safetensors")))
    for k, v in ref_w.items():
        torch.testing.assert_close(res["weights"][k], v.float(), atol=1e-5, rtol=0, msg=k)
    tower = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(ref_w[tower], read_safetensors([d / "model" / "model.safetensors"])[tower]) != train_vision


def test_cli_eval_reads_image_chat_data(setup):
    d, model, data = setup
    r = run_cli("eval", "--model", str(d / "model"), "--data", str(data), "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["documents"] == 6 and out["tokens"] > 0
