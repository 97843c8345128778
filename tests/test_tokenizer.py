"""Tokenizer built from a GGUF vocabulary, checked against the tokenizer transformers builds from it."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from gemmaforge.formats.gguf import gguf_tokenizer_json, load_gguf_tokenizer, read_gguf
from gemmaforge.errors import CheckpointError, InputError
from gemmaforge.data.tokenizer import Tokenizer
from gemmaforge.formats.gguf import gguf_tokenizer

PROMPTS = [
    "Hello world",
    "  two leading spaces, and trailing   ",
    "Ünïcödé — 日本語のテキスト 🤖 émoji\n\nnew  lines\ttabs",
    "def f(x):\n    return x**2 + 12345 // 7  # code\n",
    "digits 1234567890 3.14159 -42 1e-9",
    "Привет, мир! مرحبا بالعالم",
    "\n\n\nleading newlines",
    " ",
    "",
    "\u200b zero width, \u00a0nbsp, ﬁ ligature, Ⅻ, ＦＵＬＬ",
    "    indented\n\t\tmore\n",
]
SPECIAL_PROMPTS = [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "a<bos>b <eos> [multimodal]x<unused0>",
]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours(real_gguf) -> Tokenizer:
    return gguf_tokenizer(real_gguf)


@pytest.fixture(scope="module")
def hf_tok(hf_gguf_tok):
    return hf_gguf_tok


TINY_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
               "\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "\u2581ab", "\u2581b", "  ", "   ", "\n", "\n\n",
               "<0x41>", "<0x42>"]
TINY_TYPES = [3, 3, 3, 3, 3, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 1, 1, 6, 6]


@pytest.fixture()
def tiny_gguf(tmp_path) -> Path:
    """A gemma3 GGUF holding only a small Gemma-style vocabulary (written by the gguf package)."""
    p = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    for k, v in {"gemma3.context_length": 64, "gemma3.embedding_length": 8, "gemma3.block_count": 1,
                 "gemma3.feed_forward_length": 16, "gemma3.attention.head_count": 1,
                 "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 8}.items():
        w.add_uint32(k, v)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_scores([0.0] * len(TINY_TOKENS))
    w.add_token_types(TINY_TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((len(TINY_TOKENS), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


@pytest.fixture()
def tiny(tiny_gguf) -> Tokenizer:
    return gguf_tokenizer(tiny_gguf)


# ------------------------------------------------------------------------------------------------
# real vocabulary vs transformers (slow: transformers rebuilds the merges in Python)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_json_equals_transformers(real_gguf, hf_tok):
    ref = json.loads(hf_tok.backend_tokenizer.to_str())
    mine = load_gguf_tokenizer(real_gguf)
    for key in ref:
        if key == "model":
            for k in ref["model"]:
                assert mine["model"][k] == ref["model"][k], f"model.{k}"
        else:
            assert mine[key] == ref[key], key
    assert mine == ref
    assert len(mine["model"]["merges"]) > 500_000


@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS + SPECIAL_PROMPTS)
def test_encode_decode_match_transformers(ours, hf_tok, text):
    ids = ours.encode(text)
    assert ids == hf_tok.encode(text)
    assert ids[0] == ours.bos_id == 2
    assert ours.encode(text, add_bos=False) == hf_tok.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


@pytest.mark.slow
def test_saved_tokenizer_loads_in_transformers(ours, hf_tok, tmp_path):
    import transformers
    ours.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    hf2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in PROMPTS + SPECIAL_PROMPTS:
        assert hf2.encode(text) == hf_tok.encode(text), text
        ids = hf_tok.encode(text)
        assert hf2.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert (hf2.bos_token_id, hf2.eos_token_id, hf2.pad_token_id) == (2, 1, 0)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for gen in (False, True):
        hf_text = hf2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert hf_text == "<bos>" + ours.apply_chat_template(msgs, add_generation_prompt=gen)


# ------------------------------------------------------------------------------------------------
# real vocabulary, no transformers
# ------------------------------------------------------------------------------------------------


def test_real_special_ids(ours):
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (2, 1, 0, 3)
    assert ours.vocab_size == len(ours) == 262144
    assert ours.stop_ids == [1, ours.token_to_id("<end_of_turn>")] == [1, 106]
    assert ours.token_to_id("<start_of_turn>") == 105 and ours.id_to_token(106) == "<end_of_turn>"


@pytest.mark.parametrize("text", PROMPTS)
def test_real_round_trip(ours, text):
    ids = ours.encode(text)
    assert ids[0] == 2 and 2 not in ids[1:]
    assert ours.decode(ids) == text
    assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.decode(ids, skip_special_tokens=False) == "<bos>" + text


def test_real_known_ids(ours):
    # ids transformers gives for these (checked in the slow tests above)
    assert ours.encode("Hello world") == [2, 9259, 1902]
    assert ours.encode("<start_of_turn>user\nhi<end_of_turn>\n") == [2, 105, 2364, 107, 2202, 106, 107]
    assert ours.encode("  x")[:2] == [2, 138]  # "  " is one token, stored as real spaces in the GGUF


def test_encode_batch(ours):
    assert ours.encode_batch(PROMPTS[:4]) == [ours.encode(t) for t in PROMPTS[:4]]
    assert ours.encode_batch(PROMPTS[:2], add_bos=False) == [ours.encode(t, add_bos=False) for t in PROMPTS[:2]]


def test_save_and_reload(ours, tmp_path):
    d = ours.save(tmp_path / "tok")
    again = Tokenizer.from_file(d)
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id) == (2, 1, 0, 3)
    assert again.stop_ids == ours.stop_ids
    for text in PROMPTS + SPECIAL_PROMPTS:
        assert again.encode(text) == ours.encode(text)
        assert again.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<bos>" and cfg["eos_token"] == "<eos>" and cfg["add_bos_token"] is True


def test_from_file_and_from_json(tiny, tmp_path):
    d = tiny.save(tmp_path / "t")
    spec = json.loads((d / "tokenizer.json").read_text())
    for t in (Tokenizer.from_file(d / "tokenizer.json"), Tokenizer.from_json(spec),
              Tokenizer.from_json(json.dumps(spec))):
        # no tokenizer_config.json needed: BOS from the post-processor, EOS / PAD by their Gemma names
        assert (t.bos_id, t.eos_id, t.pad_id, t.unk_id) == (2, 1, 0, 3)
        assert t.encode(" ab") == tiny.encode(" ab") == [2, 16]


# ------------------------------------------------------------------------------------------------
# a small synthetic vocabulary
# ------------------------------------------------------------------------------------------------


def test_tiny_vocab_json(tiny_gguf):
    j = gguf_tokenizer_json(read_gguf(tiny_gguf))
    vocab = j["model"]["vocab"]
    # runs of spaces are respelled with U+2581, as the HF Gemma tokenizer spells them
    assert vocab["\u2581\u2581"] == 18 and vocab["\u2581\u2581\u2581"] == 19 and "  " not in vocab
    # merges ranked by the merged token's position in the file, longer left piece first
    assert j["model"]["merges"] == [
        ["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"], ["\u2581", "a"], ["\u2581a", "b"], ["\u2581", "ab"],
        ["\u2581", "b"], ["\u2581", "\u2581"], ["\u2581\u2581", "\u2581"], ["\u2581", "\u2581\u2581"], ["\n", "\n"],
    ]
    added = {a["content"]: a for a in j["added_tokens"]}
    assert added["<start_of_turn>"]["special"] is True and added["[multimodal]"]["special"] is False
    assert "  " not in added and all(not a["normalized"] for a in added.values())
    assert j["post_processor"]["single"][0] == {"SpecialToken": {"id": "<bos>", "type_id": 0}}


def test_tiny_vocab_matches_transformers(tiny_gguf, tiny):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert json.loads(hf.backend_tokenizer.to_str()) == gguf_tokenizer_json(read_gguf(tiny_gguf))
    for text in ["abc ab  a   b", "  abc\n\nab", "A B z", "<start_of_turn>ab<end_of_turn>", "[multimodal]abc", ""]:
        assert tiny.encode(text) == hf.encode(text), text
        ids = hf.encode(text)
        assert tiny.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_tiny_encode(tiny):
    assert tiny.encode("abc") == [2, 14]
    assert tiny.encode(" ab") == [2, 16]
    # "a▁▁b": (▁, b) outranks (▁, ▁) -- "▁b" comes before "▁▁" in the file
    assert tiny.encode("a  b", add_bos=False) == [9, 8, 17]
    assert tiny.encode("  ", add_bos=False) == [18]
    assert tiny.encode("AB", add_bos=False) == [22, 23]  # byte fallback
    assert tiny.decode([2, 9, 18, 10, 22]) == "a  bA"
    assert tiny.stop_ids == [1, 7]


# ------------------------------------------------------------------------------------------------
# chat template
# ------------------------------------------------------------------------------------------------


def test_chat_single_turn(tiny):
    msgs = [{"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(msgs) == "<start_of_turn>user\nHi<end_of_turn>\n"
    assert tiny.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_system_folded_multi_turn(tiny):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tiny.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # "model" is accepted as the assistant role, too
    msgs[2] = {"role": "model", "content": "4"}
    assert "<start_of_turn>model\n4<end_of_turn>\n" in tiny.apply_chat_template(msgs)


def test_chat_content_parts(tiny):
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}]},
    ]
    assert tiny.apply_chat_template(msgs) == "<start_of_turn>user\nSys\n\n<start_of_image>Describe.<end_of_turn>\n"


def test_chat_errors(tiny):
    with pytest.raises(InputError, match="alternate"):
        tiny.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(InputError, match="alternate"):
        tiny.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InputError):
        tiny.apply_chat_template([{"content": "no role"}])
    assert tiny.apply_chat_template([], add_generation_prompt=True) == "<start_of_turn>model\n"


def test_chat_encodes_to_turn_tokens(ours):
    text = ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ours.encode(text)
    assert ids[:2] == [2, 105] and ids.count(106) == 1 and ids[-3:-1] == [105, ours.encode("model", add_bos=False)[0]]


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_file(tmp_path)
    assert str(bad) in str(e.value)
    with pytest.raises(CheckpointError):
        Tokenizer.from_json("{}")


def test_input_errors(tiny):
    with pytest.raises(InputError, match="outside the vocabulary"):
        tiny.decode([0, 10_000])
    with pytest.raises(InputError):
        tiny.encode(b"bytes")  # type: ignore[arg-type]


def test_non_gemma_tokenizer_rejected(tmp_path):
    p = tmp_path / "bpe.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="gpt2") as e:
        load_gguf_tokenizer(p)
    assert str(p) in str(e.value)
