"""Rough edges of the command line: preset names everywhere, errors that name what the user gave,
help texts with defaults, ``inspect`` pictures people can read and ``inspect --adapter``."""

import struct

import pytest
import torch
from conftest import run_cli

from gemmaforge.cli.main import build_parser

ENV = {"OMP_NUM_THREADS": "1"}


def _subparsers():
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_every_flag_of_every_command_has_help_and_help_shows_defaults():
    for name, sp in _subparsers().items():
        for a in sp._actions:
            if a.dest != "help":
                assert a.help, f"gemmaforge {name} {a.option_strings or a.dest}: no help text"
    text = _subparsers()["generate"].format_help()
    assert "(default: 64)" in text  # --max-new-tokens
    train = _subparsers()["train"]
    lr = next(a for a in train._actions if "--lr" in a.option_strings)
    assert "(default: 0.0001)" in lr.help and "(default: 256)" in train.format_help().replace("\n", " ")  # --seq-len
    r = run_cli("inspect", "--help", env=ENV)
    assert r.returncode == 0 and "(default: 5)" in r.stdout  # --top-k


def test_convert_takes_a_preset_name_like_every_other_command(tmp_path):
    dst = tmp_path / "hf"
    r = run_cli("convert", "gemma-3-270m", str(dst), env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli("convert", "gemma-3-270m", str(f), env=ENV)
    assert r.returncode == 2 and r.stderr.strip() == f"gemmaforge: error: {f}: exists and is not a directory"
    r = run_cli("convert", "gemma-3-tiny", str(tmp_path / "x"), env=ENV)
    assert r.returncode == 2 and "preset has no embedded weights" in r.stderr and r.stderr.count("\n") == 1


def test_score_names_out_not_its_temp_file_when_the_write_fails(tmp_path):
    """The output is written through a temp file beside it; a failure names ``--out``."""
    import argparse

    from gemmaforge.cli import score as score_cli
    from gemmaforge.errors import InputError

    data = tmp_path / "r.jsonl"
    data.write_text('{"prompt_ids": [2, 3], "completion_ids": [4]}\n')
    out = tmp_path / "missing_dir_is_a_file" / "s.jsonl"
    (tmp_path / "missing_dir_is_a_file").write_text("not a dir")
    a = argparse.Namespace(data=str(data), out=str(out), model="gemma-3-270m", dtype="float32", device="cpu",
                           attn_backend=None, adapter=None, temperature=1.0, batch_tokens=64, chunk_size=None,
                           progress=False)
    with pytest.raises(InputError) as e:
        score_cli.cmd_score(a)
    assert str(e.value).startswith(f"--out {out}: cannot write") and ".tmp" not in str(e.value)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import test_interp

    from gemmaforge.formats.hf import save_hf

    d = tmp_path_factory.mktemp("inspect_edges") / "model"
    save_hf(test_interp._tiny(), d, tokenizer=test_interp.tiny_tokenizer())
    return d


def test_inspect_heatmaps_are_readable(tiny_dir, tmp_path):
    """A 34-token prompt gives square-ish figures of sane size (heads in a grid, not one long row)."""
    out = tmp_path / "inspect"
    prompt = " ".join(["the big red dog ran"] * 7)
    r = run_cli("inspect", "--model", str(tiny_dir), "--prompt", prompt, "--out", str(out), "--max-layers", "1",
                env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    w, h = _png_size(out / "attn_layer_00.png")
    assert w <= 2000 and h <= 2000 and 0.5 <= w / h <= 2.0, (w, h)


def test_heatmap_colour_scale_is_not_set_by_the_first_key():
    """Most of the attention on the first key column must not leave every other cell dark: the colour
    scale ends at the largest weight elsewhere and the first column saturates."""
    from gemmaforge.interp.plots import colour_scale

    S = 6
    pat = torch.full((2, S, S), 0.02)
    pat[:, :, 0] = 0.9
    pat[1, 3, 2] = 0.05
    assert colour_scale(pat) == pytest.approx(0.05)
    assert colour_scale(torch.ones(1, 1, 1)) == 1.0  # one token: its own weight


def test_labels_without_a_glyph_are_escaped_not_boxes():
    from gemmaforge.interp.plots import _mpl_safe

    assert _mpl_safe("日本 é $x") == "\\u65e5\\u672c é \\$x"
    assert _mpl_safe("🤖") == "\\U0001f916"


def test_inspect_with_an_adapter_and_a_bad_one(tiny_dir, tmp_path):
    from gemmaforge import from_pretrained
    from gemmaforge.adapters.lora import LoraConfig, apply_lora
    from gemmaforge.formats.peft import save_adapter

    m = from_pretrained(str(tiny_dir))
    apply_lora(m, LoraConfig(rank=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(m, tmp_path / "ad")
    out = tmp_path / "inspect"
    r = run_cli("inspect", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--prompt", "the dog",
                "--out", str(out), "--max-layers", "1", env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert " + " + str(tmp_path / "ad") in r.stderr and (out / "logit_lens.txt").is_file()
    r = run_cli("inspect", "--model", str(tiny_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "x",
                "--out", str(out), env=ENV)
    assert r.returncode == 2 and r.stderr.strip() == f"gemmaforge: error: --adapter {tmp_path / 'nope'}: no such directory"


def test_merge_through_the_cli_and_its_bad_inputs(tiny_dir, tmp_path):
    """``gemmaforge merge`` writes the merged model (its logits equal base + adapter); a missing adapter
    dir, a dir without adapter_config.json, an adapter of another model's shape and an --out that is
    a file each give one line and exit 2."""
    from gemmaforge import from_pretrained
    from gemmaforge.adapters.lora import LoraConfig, apply_lora
    from gemmaforge.formats.peft import save_adapter

    m = from_pretrained(str(tiny_dir))
    apply_lora(m, LoraConfig(rank=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(m, tmp_path / "ad")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = m(ids)
    r = run_cli("merge", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m"),
                env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(tmp_path / "m"))(ids), want, atol=1e-5, rtol=0)

    import test_interp

    wide = test_interp._tiny(intermediate_size=256)
    apply_lora(wide, LoraConfig(rank=2))
    save_adapter(wide, tmp_path / "wide")
    (tmp_path / "plain").mkdir()
    f = tmp_path / "file"
    f.write_text("x")
    cases = [
        (["--adapter", str(tmp_path / "nope")], f"--adapter {tmp_path / 'nope'}: no such directory"),
        (["--adapter", str(tmp_path / "plain")], "no adapter_config.json"),
        (["--adapter", str(tmp_path / "wide")], "has shape"),
        (["--adapter", str(tmp_path / "ad"), "--out", str(f)], f"--out {f}: exists and is not a directory"),
    ]
    for extra, needle in cases:
        args = ["merge", "--model", str(tiny_dir), "--out", str(tmp_path / "m2")] + extra
        r = run_cli(*args, env=ENV)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (extra, r.stderr[-1500:])
