"""Evaluation: `gemmaforge eval` (loss, perplexity, token count through the trainer's own step),
`train --val-data F` (validation on exactly F, no split), one-line errors (exit 2)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from test_train import ByteTok, corpus, tiny_model

from gemmaforge import from_config
from gemmaforge.adapters.lora import LoraConfig, apply_lora, merged_copy
from gemmaforge.cli.main import main
from gemmaforge.data import Document, load_documents
from gemmaforge.formats.gguf import gguf_tokenizer
from gemmaforge.formats.hf import save_hf
from gemmaforge.formats.peft import save_adapter
from gemmaforge.models.registry import preset
from gemmaforge.train import TrainConfig, Trainer, read_metrics
from gemmaforge.train.evaluate import evaluate


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok(real_gguf):
    return gguf_tokenizer(real_gguf)


@pytest.fixture(scope="module")
def small_dir(tok, tmp_path_factory):
    """A small random Gemma 3 with the real 262k vocabulary and tokenizer, saved as an HF dir."""
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", vocab_size=262_144, hidden_size=32, intermediate_size=64,
                               head_dim=16, num_attention_heads=2, num_key_value_heads=1))
    d = tmp_path_factory.mktemp("small") / "model"
    save_hf(model, d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every loss-mask kind: plain text (all tokens), prompt+completion, chat (model turns only)."""
    lines = [{"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times."} for i in range(5)]
    lines += [{"prompt": "What is two plus two?", "completion": " Four."},
              {"prompt": "Name a colour.", "completion": " Blue, like the sky."},
              {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                            {"role": "assistant", "content": "Goodbye!"}]}]
    p = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def _reference(hf, docs):
    """Mean token cross-entropy computed directly: one document at a time, full [n, V] logits of the
    transformers model, F.cross_entropy over the labels its loss mask allows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d.ids])
            logits = hf(ids).logits[0, :-1].double()
            keep = torch.tensor(d.mask()[1:])
            total += float(F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def _one_line_exit_2(argv, capsys, needle):
    """In-process CLI: exit code 2 and exactly one error line naming the problem, no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("gemmaforge: error:")]
    assert code == 2, err
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------- gemmaforge eval

def test_eval_perplexity_is_exp_of_the_directly_computed_mean_token_loss(small_dir, mixed, tok):
    import transformers

    r = run_cli("eval", "--model", str(small_dir), "--data", str(mixed), "--json", "--seq-len", "128")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    docs = load_documents(mixed, tok)
    assert any(d.loss_mask is not None for d in docs) and max(len(d) for d in docs) <= 128  # masks, no cuts
    hf = transformers.AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32).eval()
    ref_loss, ref_count = _reference(hf, docs)
    assert out["tokens"] == ref_count == sum(d.num_targets for d in docs)
    assert out["documents"] == len(docs)
    assert abs(out["loss"] - ref_loss) < 1e-4, (out["loss"], ref_loss)
    assert out["perplexity"] == pytest.approx(math.exp(ref_loss), rel=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)


def test_eval_text_line_and_batching_do_not_change_the_numbers(small_dir, mixed, capsys):
    """Several rows per forward, one row per forward, a long row: the same loss (the per-forward means
    are recombined by their counts); the default output is one text line on stdout."""
    losses = []
    for extra in (["--seq-len", "32", "--batch-tokens", "32"], ["--seq-len", "32", "--batch-tokens", "96"],
                  ["--seq-len", "256"]):
        capsys.readouterr()
        assert main(["eval", "--model", str(small_dir), "--data", str(mixed), "--json", *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out.strip())["loss"])
    assert max(losses) - min(losses) < 1e-5, losses
    assert main(["eval", "--model", str(small_dir), "--data", str(mixed)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("loss ") and "perplexity" in out[0] and "tokens" in out[0], out


def test_eval_with_adapter_equals_the_merged_model(small_dir, mixed, tok, tmp_path, capsys):
    from gemmaforge import from_pretrained

    model = from_pretrained(str(small_dir))
    apply_lora(model, LoraConfig(rank=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-trivial adapter (PEFT's init has B = 0)
    save_adapter(model, tmp_path / "adapter")
    save_hf(merged_copy(model), tmp_path / "merged", tokenizer=tok)

    def loss(*argv):
        capsys.readouterr()
        assert main(["eval", "--data", str(mixed), "--json", "--seq-len", "128", *argv]) == 0
        return json.loads(capsys.readouterr().out.strip())

    base = loss("--model", str(small_dir))
    adapted = loss("--model", str(small_dir), "--adapter", str(tmp_path / "adapter"))
    merged = loss("--model", str(tmp_path / "merged"))
    assert adapted["tokens"] == merged["tokens"] == base["tokens"]
    assert abs(adapted["loss"] - merged["loss"]) < 1e-4 and abs(adapted["loss"] - base["loss"]) > 1e-3


def test_eval_bad_inputs(small_dir, mixed, tmp_path, capsys):
    base = ["eval", "--model", str(small_dir)]
    good = ["--data", str(mixed)]
    _one_line_exit_2([*base, "--data", str(tmp_path / "missing.jsonl")], capsys, "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _one_line_exit_2([*base, "--data", str(empty)], capsys, f"{empty}:1")
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("")
    _one_line_exit_2([*base, "--data", str(empty_txt)], capsys, str(empty_txt))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{not json\n')
    _one_line_exit_2([*base, "--data", str(bad)], capsys, f"{bad}:3")
    for flag, value in (("--seq-len", "1"), ("--seq-len", "0"), ("--seq-len", "-5"), ("--batch-tokens", "0")):
        _one_line_exit_2([*base, *good, flag, value], capsys, flag)
    _one_line_exit_2([*base, *good, "--seq-len", "64", "--batch-tokens", "32"], capsys, "--batch-tokens 32")
    _one_line_exit_2([*base, *good, "--seq-len", "100000"], capsys, "--seq-len 100000")  # beyond the context
    _one_line_exit_2([*base, *good, "--adapter", str(tmp_path / "no-adapter")], capsys,
                     f"--adapter {tmp_path / 'no-adapter'}")
    (tmp_path / "not-adapter").mkdir()
    _one_line_exit_2([*base, *good, "--adapter", str(tmp_path / "not-adapter")], capsys, "adapter_config.json")
    _one_line_exit_2([*base, *good, "--dtype", "int3"], capsys, "--dtype int3")
    _one_line_exit_2([*base, *good, "--device", "potato"], capsys, "--device potato")
    if not torch.cuda.is_available():
        _one_line_exit_2([*base, *good, "--device", "cuda"], capsys, "--device cuda")
    _one_line_exit_2(["eval", "--model", str(tmp_path / "no-model"), *good], capsys, "no-model")


# ---------------------------------------------------------------------------------- the function

def test_evaluate_is_the_trainer_step_and_matches_full_logits(tmp_path):
    """``train.evaluate.evaluate`` on the tiny model: the directly computed loss (loss masks honoured),
    the same for any batching, progress reported; documents cut at seq_len lose one label per cut."""
    tok = ByteTok()
    docs = corpus(12)
    docs += [Document(tok.encode("Q: 3 plus one?") + tok.encode(" A: 4.", add_bos=False) + [tok.eos_id],
                      [False] * 15 + [True] * 7)]
    model = tiny_model()
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d.ids])
            logits = model(ids)[0, :-1].double()
            keep = torch.tensor(d.mask()[1:])
            total += float(F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    seen = []
    res = evaluate(model, docs, 256, progress=lambda done, n: seen.append((done, n)))
    assert res["tokens"] == count and res["documents"] == len(docs)
    assert abs(res["loss"] - total / count) < 1e-5 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert seen[0] == (0, res["rows"]) and seen[-1] == (res["rows"], res["rows"])
    batched = evaluate(model, docs, 256, batch_tokens=1024)
    assert abs(batched["loss"] - res["loss"]) < 1e-6 and batched["tokens"] == count
    assert model.training  # the training mode comes back
    cut = evaluate(model, docs, 32)
    pieces = sum(math.ceil(len(d) / 32) - 1 for d in docs)
    assert cut["tokens"] == count - pieces
    assert evaluate(model, [Document([tok.bos_id])], 8) is None  # nothing to predict


# ---------------------------------------------------------------------------------- train --val-data

def _jsonl(path, docs_text):
    path.write_text("".join(json.dumps(x) + "\n" for x in docs_text))
    return path


def test_train_val_data_validates_on_exactly_that_file(tmp_path):
    tok = ByteTok()
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"{a} plus one is {a + 1}. {a + 1} plus one is {a + 2}."}
                                              for a in range(30)])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": f"{a} plus one is {a + 1}."} for a in range(40, 52)]
                 + [{"prompt": "7 plus one is", "completion": " 8."}])
    val_docs = load_documents(val, tok)
    labels = sum(d.num_targets for d in val_docs)
    cfg = TrainConfig(data=[str(train)], val_data=[str(val)], out=str(tmp_path / "run"), steps=2, seq_len=64,
                      batch_tokens=128, micro_batch_rows=1, eval_rows=1, val_fraction=0.5, save_every=0,
                      eval_every=0, progress=False, seed=1, dtype="float32")  # compared with an fp32 direct loss
    logs = []
    tr = Trainer(cfg, model=tiny_model(), tokenizer=tok, log=logs.append)
    # all 30 training documents train (no split, val_fraction ignored); all of val.jsonl validates
    assert sorted({d for r in tr.train_rows for d, _, _ in r.doc_spans}) == list(range(30))
    assert len(tr.val_rows) > cfg.eval_rows  # not capped by eval_rows
    assert sum(int((r.labels != -100).sum()) for r in tr.val_rows) == labels
    direct = evaluate(tr.model, val_docs, 64)  # the untrained model, as validation sees it before step 1
    summary = tr.run()
    assert summary["val_before"]["val_tokens"] == summary["val_after"]["val_tokens"] == labels
    assert abs(summary["val_before"]["val_loss"] - direct["loss"]) < 1e-6
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_tokens" in r]
    assert rows and all(r["val_tokens"] == labels for r in rows)
    assert any("13 docs of" in m and str(val) in m for m in logs), logs


def test_train_val_data_flag_end_to_end(small_dir, corpus_file, tok, tmp_path, capsys):
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "A fox is quick."}, {"prompt": "Dogs are", "completion": " lazy."}])
    labels = sum(d.num_targets for d in load_documents(val, tok))
    out = tmp_path / "run"
    r = run_cli("train", "--model", str(small_dir), "--data", str(corpus_file), "--val-data", str(val), "--steps",
                "2", "--out", str(out), "--seq-len", "64", "--batch-tokens", "128", "--save-every", "0",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [x for x in read_metrics(out / "metrics.jsonl") if "val_tokens" in x]
    assert [x["step"] for x in rows] == [0, 2] and all(x["val_tokens"] == labels for x in rows), rows
    assert "60 train docs" in r.stderr, r.stderr  # the whole --data trains
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    _one_line_exit_2(["train", "--model", str(small_dir), "--data", str(corpus_file), "--val-data", str(bad),
                      "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"], capsys, f"{bad}:2")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times."})
             for i in range(60)]
    (d / "pre.jsonl").write_text("\n".join(lines) + "\n")
    return d / "pre.jsonl"
