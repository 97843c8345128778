"""GGUF export (``gemmaforge export-gguf`` / ``formats.gguf.writer.export_gguf``): the file reads back
through gemmaforge's own GGUF reader with the same logits (f32 exact, f16/bf16/q8_0 equal to the model
with its weights rounded by that format), the ``gguf`` package's reader lists the keys llama.cpp needs,
and, where llama-cpp-python is importable, llama.cpp itself gives the same next-token log-probs."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import gemmaforge
from gemmaforge.adapters.lora import LoraConfig, apply_lora, merged_copy
from gemmaforge.cli.main import main as cli_main
from gemmaforge.data.tokenizer import Tokenizer
from gemmaforge.errors import CheckpointError, ConfigError
from gemmaforge.formats.convert import load_any
from gemmaforge.formats.gguf import read_gguf
from gemmaforge.formats.gguf.tokenizer import _merges_from_vocab
from gemmaforge.formats.gguf.writer import REQUIRED_KEYS, GGUFExportWarning, export_gguf
from gemmaforge.formats.hf import save_hf
from gemmaforge.formats.peft import save_adapter

Q = gguf.GGMLQuantizationType
SP = "\u2581"
TEXT = ("The theory is in  the end. And the tone of it,\n\nat the root, is one of the reasons to read on: "
        "a tiny model reads this text.")
PARAGRAPH = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
             "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass "
             "doors of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from "
             "entering along with him.")


# ------------------------------------------------------------------------------------------------
# tiny models with sentencepiece-style tokenizers (byte-fallback BPE, as Gemma's and Mistral's)
# ------------------------------------------------------------------------------------------------


def _pieces() -> list[str]:
    out = [SP] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:")
    for w in ["the", "he", "th", "in", "an", "and", "er", "on", "at", "en", "is", "it", "or", "ou", "es", "ing",
              "ed", "to", "of", "re", "ea", "ead", "read", "one", "ny"]:
        for p in (w, SP + w):
            if p not in out:
                out.append(p)
    return out


def spm_tokenizer(specials, user_defined, pieces, prefix_space: bool, bos: str, eos: str, unk: str) -> Tokenizer:
    """A sentencepiece-converted HF tokenizer: specials, user-defined pieces, 256 byte tokens, BPE pieces."""
    tokens = list(specials) + list(user_defined) + [f"<0x{i:02X}>" for i in range(256)] + list(pieces)
    vocab = {t: i for i, t in enumerate(tokens)}

    def added(t, special):
        return {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special}

    norm = {"type": "Replace", "pattern": {"String": " "}, "content": SP}
    decoders = [{"type": "Replace", "pattern": {"String": SP}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix_space:
        norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SP}, norm]}
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    def st(type_id):
        return {"SpecialToken": {"id": bos, "type_id": type_id}}

    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(t, True) for t in specials] + [added(t, False) for t in user_defined if SP not in t],
        "normalizer": norm, "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [st(0), {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [st(0), {"Sequence": {"id": "A", "type_id": 0}}, st(1),
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": _merges_from_vocab(tokens, vocab)},
    }
    return Tokenizer.from_json(spec, bos_token=bos, eos_token=eos, unk_token=unk)


def gemma_tokenizer() -> Tokenizer:
    return spm_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>",
                          "<end_of_turn>"], ["\n", "\n\n", SP * 2, SP * 3], _pieces(), False, "<bos>", "<eos>", "<unk>")


def mistral_tokenizer() -> Tokenizer:  # 3 + 256 + 61 = mistral-tiny's 320 rows
    return spm_tokenizer(["<unk>", "<s>", "</s>"], [], _pieces()[:61], True, "<s>", "</s>", "<unk>")


TOKENIZERS = {"gemma-3-tiny": gemma_tokenizer, "mistral-tiny": mistral_tokenizer}
ARCH = {"gemma-3-tiny": "gemma3", "mistral-tiny": "llama"}


def tiny_model(preset: str, cfg=None):
    """Random weights; norm scales on a 2^-8 grid, so Gemma's stored 1 + w loses nothing in float32."""
    m = gemmaforge.from_config(cfg or preset, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 64).round() / 256)
    return m


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def rounded(model, dtype: str):
    """``model`` with every weight the file stores as ``dtype`` (2-D, not norms) rounded by that format."""
    ref = copy.deepcopy(model)
    qt = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}.get(dtype)
    if qt is None:
        return ref
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.dim() < 2 or "norm" in n:
                continue
            a = p.detach().float().numpy()
            if qt == Q.Q8_0 and a.shape[-1] % 32:
                qt_row = Q.F16  # the converter's fallback
            else:
                qt_row = qt
            back = gguf.quants.dequantize(gguf.quants.quantize(a, qt_row), qt_row)
            p.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(a.shape)))
    return ref


def _export(model, tok, path, dtype, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GGUFExportWarning)  # the tiny preset's query_pre_attn_scalar note
        return export_gguf(model, tok, path, dtype=dtype, **kw)


# ------------------------------------------------------------------------------------------------
# round trip through gemmaforge's reader: tiny Gemma 3 and Mistral, every dtype
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("preset", ["gemma-3-tiny", "mistral-tiny"])
def test_roundtrip_logits_tiny(tmp_path, preset, dtype):
    model, tok = tiny_model(preset), TOKENIZERS[preset]()
    path = _export(model, tok, tmp_path / "m.gguf", dtype)
    back, back_tok = load_any(path)
    ids = torch.tensor([tok.encode(TEXT)])
    ref = rounded(model, dtype)
    # every weight reads back as the format's rounding of the original (f32: the original itself)
    want = {k: v for k, v in ref.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    got = back.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # so the logits are the same, bit for bit
    out = logits(back, ids)
    assert torch.equal(out, logits(ref, ids))
    if dtype == "f32":
        assert torch.equal(out, logits(model, ids))
    else:
        assert not torch.equal(out, logits(model, ids))  # the rounding is real ...
        assert (out - logits(model, ids)).abs().max() < {"f16": 0.01, "bf16": 0.05, "q8_0": 0.1}[dtype]  # ... and small
    # config: what the model computes with survives (eps through float32)
    a, b = model.config.to_hf(), back.config.to_hf()
    assert a.pop("rms_norm_eps") == pytest.approx(b.pop("rms_norm_eps"), rel=1e-6)
    assert a == b
    # tokenizer: the reader's tokenizer of the file encodes and decodes as the original
    assert back_tok.encode(TEXT) == tok.encode(TEXT)
    assert back_tok.decode(back_tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))


@pytest.mark.parametrize("preset", ["gemma-3-tiny", "mistral-tiny"])
def test_gguf_reader_lists_required_keys(tmp_path, preset):
    model, tok = tiny_model(preset), TOKENIZERS[preset]()
    path = _export(model, tok, tmp_path / "m.gguf", "q8_0", name="tiny")
    r = gguf.GGUFReader(path)
    arch = ARCH[preset]
    missing = [k for k in REQUIRED_KEYS[arch] if k not in r.fields]
    assert not missing, missing
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = model.config
    assert f["general.architecture"] == arch and f["general.name"] == "tiny" and f["general.type"] == "model"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0 and f["general.quantization_version"] == 2
    assert f[f"{arch}.block_count"] == cfg.num_hidden_layers and f[f"{arch}.embedding_length"] == cfg.hidden_size
    assert f[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{arch}.attention.key_length"] == cfg.head_dim == f[f"{arch}.attention.value_length"]
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    n_rows = cfg.vocab_size
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.token_type"]) == n_rows
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    types = f["tokenizer.ggml.token_type"]
    toks = f["tokenizer.ggml.tokens"]
    assert types[tok.bos_id] == types[tok.eos_id] == 3  # CONTROL
    assert types[toks.index("<0x41>")] == 6  # BYTE
    if tok.vocab_size < n_rows:  # rows past the vocabulary: llama.cpp's [PADn] UNUSED tokens
        assert toks[-1] == f"[PAD{n_rows - 1}]" and types[-1] == 5
    # tensor types as llama.cpp's converter picks them: norms and 1-D f32, matrices the file type
    for t in r.tensors:
        want = Q.F32 if (len(t.shape) == 1 or t.name.endswith("_norm.weight")) else Q.Q8_0
        assert t.tensor_type == want, t.name
    if arch == "gemma3":
        assert f["gemma3.rope.freq_base"] == cfg.rope["full_attention"].theta
        assert f["gemma3.rope.freq_base_swa"] == cfg.rope["sliding_attention"].theta
        assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 4.0
        assert f["gemma3.attention.sliding_window"] == cfg.sliding_window
        # the tiny preset's layer pattern is not llama.cpp's period of 6: written per layer
        assert f["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in cfg.layer_types]
        assert f["tokenizer.ggml.add_space_prefix"] is False and "<start_of_turn>" in f["tokenizer.chat_template"]
        assert toks[tok.token_to_id(SP * 2)] == "  " and types[tok.token_to_id(SP * 2)] == 4  # USER_DEFINED
        assert types[tok.token_to_id("\n")] == 4 and types[tok.token_to_id("<mask>")] == 3
        assert "output.weight" not in [t.name for t in r.tensors]  # tied head, as the converter
    else:
        assert f["llama.vocab_size"] == cfg.vocab_size and f["llama.rope.dimension_count"] == cfg.head_dim
        assert f["llama.rope.freq_base"] == cfg.rope_theta
        assert f["tokenizer.ggml.add_space_prefix"] is True
        assert "output.weight" in [t.name for t in r.tensors]


def test_normal_token_scores_follow_vocabulary_order(tmp_path):
    tok = gemma_tokenizer()
    path = _export(tiny_model("gemma-3-tiny"), tok, tmp_path / "m.gguf", "f32")
    md = read_gguf(path).metadata
    s, ty = np.array(md["tokenizer.ggml.scores"]), np.array(md["tokenizer.ggml.token_type"])
    normal = s[ty == 1]
    assert (np.diff(normal) < 0).all() and normal[0] == 0  # -rank: earlier pieces merge first
    assert (s[ty == 6] == 0).all() and (s[(ty == 3) | (ty == 4) | (ty == 5)] == -1000).all()


def test_mistral_q_k_permuted_like_llama_cpp(tmp_path):
    """q_proj / k_proj rows in llama.cpp's rotary layout (its converter's LlamaModel.permute)."""
    model = tiny_model("mistral-tiny")
    path = _export(model, mistral_tokenizer(), tmp_path / "m.gguf", "f32")
    r = {t.name: t for t in gguf.GGUFReader(path).tensors}
    cfg = model.config

    def permute(w, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = model.state_dict()
    for i in range(cfg.num_hidden_layers):
        q = np.asarray(r[f"blk.{i}.attn_q.weight"].data).reshape(-1, cfg.hidden_size)
        k = np.asarray(r[f"blk.{i}.attn_k.weight"].data).reshape(-1, cfg.hidden_size)
        assert np.array_equal(q, permute(sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy(), cfg.num_attention_heads))
        assert np.array_equal(k, permute(sd[f"model.layers.{i}.self_attn.k_proj.weight"].numpy(), cfg.num_key_value_heads))
        assert not np.array_equal(q, sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy())


def test_q8_0_rows_not_in_blocks_fall_back_to_f16(tmp_path):
    cfg = gemmaforge.models.registry.preset("gemma-3-tiny", hidden_size=48, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=32)
    model = tiny_model("gemma-3-tiny", cfg)
    path = _export(model, gemma_tokenizer(), tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == Q.F16  # rows of 48
    assert types["blk.0.attn_output.weight"] == Q.Q8_0  # rows of 64
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 128
    back, _ = load_any(path)
    ids = torch.tensor([gemma_tokenizer().encode(TEXT)])
    assert torch.equal(logits(back, ids), logits(rounded(model, "q8_0"), ids))


def test_lora_is_merged_before_export(tmp_path):
    model, tok = tiny_model("gemma-3-tiny"), gemma_tokenizer()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = _export(model, tok, tmp_path / "m.gguf", "f32")
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert not [n for n in names if "lora" in n]
    back, _ = load_any(path)
    ids = torch.tensor([tok.encode(TEXT)])
    merged = merged_copy(model)
    assert torch.equal(logits(back, ids), logits(merged, ids))
    assert not torch.equal(logits(back, ids), logits(gemmaforge.from_config("gemma-3-tiny", seed=0), ids))


def test_gemma3_default_pattern_and_query_scale(tmp_path):
    """A standard Gemma 3 layout writes what the converter writes: no pattern array, no attention.scale."""
    cfg = gemmaforge.models.registry.preset("gemma-3-tiny", num_hidden_layers=7, layer_types=[], query_pre_attn_scalar=32)
    model = tiny_model("gemma-3-tiny", cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GGUFExportWarning)  # nothing llama.cpp would read differently
        path = export_gguf(model, gemma_tokenizer(), tmp_path / "m.gguf", dtype="f32")
    md = read_gguf(path).metadata
    assert "gemma3.attention.sliding_window_pattern" not in md and "gemma3.attention.scale" not in md
    back, _ = load_any(path)
    assert back.config.layer_types == model.config.layer_types
    ids = torch.tensor([gemma_tokenizer().encode(TEXT)])
    assert torch.equal(logits(back, ids), logits(model, ids))
    # the tiny preset's query_pre_attn_scalar (24, head_dim 32) is kept for gemmaforge, with a warning
    with pytest.warns(GGUFExportWarning, match="query_pre_attn_scalar=24"):
        export_gguf(tiny_model("gemma-3-tiny"), gemma_tokenizer(), tmp_path / "n.gguf", dtype="f32")


# ------------------------------------------------------------------------------------------------
# refusals (Python API)
# ------------------------------------------------------------------------------------------------


def test_api_refusals(tmp_path):
    model, tok = tiny_model("gemma-3-tiny"), gemma_tokenizer()
    with pytest.raises(ConfigError, match="unknown GGUF dtype 'q4_k'"):
        export_gguf(model, tok, tmp_path / "a.gguf", dtype="q4_k")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_gguf(model, tok, tmp_path / "no" / "a.gguf")
    with pytest.raises(CheckpointError, match="is a directory"):
        export_gguf(model, tok, tmp_path)
    g4 = gemmaforge.from_config("gemma-4-tiny-e2b", seed=0)
    with pytest.raises(ConfigError, match="model_type 'gemma4_text'.*Gemma 4"):
        export_gguf(g4, tok, tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        export_gguf(model, None, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model, tok = tiny_model("mistral-tiny"), mistral_tokenizer()
    (tmp_path / "m.gguf").write_bytes(b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)
    with pytest.raises(CheckpointError, match=r"m\.gguf: cannot write \(No space left on device\)"):
        export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """An HF dir of the tiny Gemma 3 (with its tokenizer), a LoRA adapter for it, a Gemma 4 dir."""
    d = tmp_path_factory.mktemp("cli")
    model, tok = tiny_model("gemma-3-tiny"), gemma_tokenizer()
    save_hf(model, d / "g3", tokenizer=tok)
    apply_lora(model, LoraConfig(rank=2, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    save_adapter(model, d / "lora")
    save_hf(gemmaforge.from_config("gemma-4-tiny-e2b", seed=0), d / "g4", tokenizer=tok)
    # an adapter whose ranks do not fit its own weights
    (d / "badlora").mkdir()
    conf = json.loads((d / "lora" / "adapter_config.json").read_text())
    (d / "badlora" / "adapter_config.json").write_text(json.dumps({**conf, "r": 7}))
    (d / "badlora" / "adapter_model.safetensors").write_bytes((d / "lora" / "adapter_model.safetensors").read_bytes())
    return d, merged_copy(model)


def _cli(capsys, *args):
    rc = cli_main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_cli_exports_with_adapter_merged(tiny_dirs, tmp_path, capsys):
    d, merged = tiny_dirs
    out = tmp_path / "m.gguf"
    rc, err = _cli(capsys, "export-gguf", "--model", str(d / "g3"), "--adapter", str(d / "lora"), "--out", str(out),
                   "--dtype", "f32")
    assert rc == 0, err
    assert err[-1].startswith(f"wrote {out}") and "f32" in err[-1]
    assert any("note: query_pre_attn_scalar=24" in e for e in err)
    md = read_gguf(out).metadata
    assert md["general.name"] == "g3-lora" and md["general.file_type"] == 0
    assert md["tokenizer.chat_template"] == json.loads((d / "g3" / "tokenizer_config.json").read_text())["chat_template"]
    back, _ = load_any(out)
    ids = torch.tensor([gemma_tokenizer().encode(TEXT)])
    assert torch.equal(logits(back, ids), logits(merged, ids))


def _unwritable(tmp_path) -> Path | None:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro / "m.gguf"
    for p in (Path("/sys/gemmaforge-test.gguf"), Path("/proc/gemmaforge-test.gguf")):
        try:
            open(p, "wb").close()
        except OSError:
            return p
    return None


def test_cli_bad_inputs_one_line_exit_2(tiny_dirs, tmp_path, capsys):
    d, _ = tiny_dirs
    g3 = str(d / "g3")
    cases = [
        (["--out", str(tmp_path / "missing" / "m.gguf")], str(tmp_path / "missing")),
        (["--out", str(tmp_path / "m.gguf"), "--dtype", "q4_k"], "'q4_k'"),
        (["--out", str(tmp_path / "m.gguf"), "--model", str(d / "g4")], "'gemma4_text'"),
        (["--out", str(tmp_path / "m.gguf"), "--adapter", str(tmp_path / "nolora")], str(tmp_path / "nolora")),
        (["--out", str(tmp_path / "m.gguf"), "--adapter", str(d / "badlora")], str(d / "badlora")),
        (["--out", str(tmp_path / "m.gguf"), "--model", str(tmp_path / "nomodel")], str(tmp_path / "nomodel")),
    ]
    unw = _unwritable(tmp_path)
    if unw is not None:
        cases.append((["--out", str(unw)], str(unw)))
    for args, named in cases:
        if "--model" not in args:
            args = [*args, "--model", g3]
        rc, err = _cli(capsys, "export-gguf", *args)
        assert rc == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("gemmaforge: error: ") and named in err[0], (args, err)
    assert not (tmp_path / "m.gguf").exists()
    if unw is None:
        pytest.skip("no unwritable path to try as root (the other bad inputs passed)")


def test_cli_subprocess_entry_point(tmp_path):
    from conftest import run_cli

    r = run_cli("export-gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "int4", timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == (
        "gemmaforge: error: unknown GGUF dtype 'int4' (choose from f32, f16, bf16, q8_0)")


# ------------------------------------------------------------------------------------------------
# the real Gemma 3 270M (slow): metadata and vocabulary as llama.cpp's converter wrote them
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_f16(real_model, tmp_path_factory):
    model, tok = real_model
    path = export_gguf(model, tok, tmp_path_factory.mktemp("real") / "gemma-3-270m-f16.gguf", dtype="f16",
                       name="gemma-3-270m")
    return path


@pytest.mark.slow
def test_real_270m_vocabulary_and_metadata_match_original(real_gguf, real_f16):
    orig, ours = read_gguf(real_gguf).metadata, read_gguf(real_f16).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.model", "tokenizer.ggml.pre"):
        assert ours[key] == orig[key], key
    # tokenizer.json keeps no sentencepiece scores: ours rank the pieces in the same order
    so, sw = np.array(orig["tokenizer.ggml.scores"]), np.array(ours["tokenizer.ggml.scores"])
    assert np.array_equal(np.argsort(-so, kind="stable"), np.argsort(-sw, kind="stable"))
    # every model key the original has, with the same value (rms eps through float32 in both)
    for key, v in orig.items():
        if key.startswith("gemma3."):
            assert ours[key] == v, key
    assert ours["gemma3.rope.freq_base_swa"] == 10_000.0
    assert ours["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    r = gguf.GGUFReader(real_f16)
    assert not [k for k in REQUIRED_KEYS["gemma3"] if k not in r.fields]
    assert {t.name for t in r.tensors} == set(read_gguf(real_gguf).tensors)


@pytest.mark.slow
def test_real_270m_f16_roundtrip_logits(real_model, real_f16):
    model, tok = real_model
    back, back_tok = load_any(real_f16)
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    assert back_tok.encode(PARAGRAPH) == ids[0].tolist()
    ref = rounded(model, "f16")
    assert torch.equal(logits(back, ids), logits(ref, ids))


@pytest.mark.slow
def test_real_270m_f32_roundtrip_exact(real_model, tmp_path):
    model, tok = real_model
    path = export_gguf(model, tok, tmp_path / "f32.gguf", dtype="f32")
    back, _ = load_any(path)
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    assert torch.equal(logits(back, ids), logits(model, ids))


# ------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python), where it is installed
# ------------------------------------------------------------------------------------------------

_HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not _HAS_LLAMA_CPP,
    reason="llama-cpp-python is not installed (PyPI has no wheel: `pip install llama-cpp-python` compiles llama.cpp, "
           "about 20 min on this 2-core machine)")


def _llama_logprobs(path: Path, text: str, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's log-probs after each of ``ids`` (evaluated as given), and its own tokens of ``text``."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2,
                          seed=0)
    toks = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    lg = np.array(llm.scores[: len(ids)], dtype=np.float64)
    lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
    return lp, toks


def _ours_logprobs(model, ids: list[int]) -> np.ndarray:
    lg = logits(model, torch.tensor([ids]))[0].double()
    return torch.log_softmax(lg, -1).numpy()


def _next(lp: np.ndarray, ids: list[int]) -> np.ndarray:
    return lp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_next_token_logprobs_real_270m(real_model, real_f16):
    model, tok = real_model
    ids = tok.encode(PARAGRAPH)
    lp_cpp, cpp_ids = _llama_logprobs(real_f16, PARAGRAPH, ids)
    assert cpp_ids == ids  # llama.cpp tokenizes with the exported vocabulary exactly as gemmaforge
    lp = _ours_logprobs(rounded(model, "f16"), ids)
    # llama.cpp computes in its own order and precision: here 0.017 at most, 0.002 on average
    diff = np.abs(_next(lp, ids) - _next(lp_cpp, ids))
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert (lp.argmax(-1) == lp_cpp.argmax(-1)).mean() >= 0.98


@needs_llama_cpp
@pytest.mark.parametrize("preset", ["gemma-3-tiny", "mistral-tiny"])
def test_llama_cpp_next_token_logprobs_tiny(tmp_path, preset):
    """Everything llama.cpp reads: the tiny Gemma 3's per-layer sliding pattern (window 8, so it
    matters over this paragraph), both rope bases and linear scaling; Mistral's q/k permutation."""
    cfg = None
    if preset == "gemma-3-tiny":  # llama.cpp's gemma3 scales queries by 1/sqrt(head_dim): use such a model
        cfg = gemmaforge.models.registry.preset(preset, query_pre_attn_scalar=32)
    model, tok = tiny_model(preset, cfg), TOKENIZERS[preset]()
    path = _export(model, tok, tmp_path / "m.gguf", "f32")
    for text in (TEXT, PARAGRAPH):
        ids = tok.encode(text)
        lp_cpp, cpp_ids = _llama_logprobs(path, text, ids)
        assert cpp_ids == ids, text
        assert np.abs(_ours_logprobs(model, ids) - lp_cpp).max() < 2e-3
