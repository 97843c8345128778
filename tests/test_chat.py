"""Chat: the Gemma chat template (against transformers rendering Google's template), replies that stop at
<end_of_turn> with no special tokens in their text, text streamed in whole characters, a conversation
that keeps (and resets) its history, the `chat` command and `generate`'s streaming, prompt sources
and one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from torch import nn

import gemmaforge
from gemmaforge.errors import InputError
from gemmaforge.inference.chat import Conversation, chat, chat_prompt_ids
from gemmaforge.inference.generate import TextStream

# Gemma 3's chat template as Google ships it (google/gemma-3-*-it, tokenizer_config.json "chat_template"),
# kept verbatim (JSON): the reference our rendering must equal.
GOOGLE_GEMMA3_TEMPLATE = json.loads(r'''"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"''')  # noqa: E501

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
     {"role": "assistant", "content": "Hello! 🚀\n"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Ünïcödé — 日本語\n\nnew  lines\ttabs  "},
     {"role": "assistant", "content": "  ok  "},
     {"role": "user", "content": "def f(x):\n    return x"}, {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": [{"type": "text", "text": " parts "}, {"type": "text", "text": "too"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Sys"}]}, {"role": "user", "content": "a<b>c"}],
]

END_OF_TURN = 106
SPECIAL_TEXTS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<start_of_image>")


@pytest.fixture(scope="module")
def tok():
    return gemmaforge.load_tokenizer("gemma-3-270m")


# ------------------------------------------------------------------------------------ the template


def _hf_render(hf_tok, messages):
    text = hf_tok.apply_chat_template(messages, chat_template=GOOGLE_GEMMA3_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(messages, chat_template=GOOGLE_GEMMA3_TEMPLATE, tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    return text, list(ids)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_chat_prompt_equals_googles_template_in_transformers(tok, k):
    import transformers

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<bos>", eos_token="<eos>",
                                              unk_token="<unk>", pad_token="<pad>")
    msgs = CONVERSATIONS[k]
    text, ids = _hf_render(hf, msgs)
    assert text == "<bos>" + tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids == chat_prompt_ids(tok, msgs)
    assert ids[0] == 2 and ids[-3:] == [105, tok.encode("model", add_bos=False)[0], 107]


@pytest.mark.slow
def test_chat_prompt_equals_template_on_the_gguf_tokenizer(tok, hf_gguf_tok):
    """transformers' own tokenizer of the embedded GGUF (the real 270M vocabulary) with Google's template."""
    for msgs in CONVERSATIONS:
        text, ids = _hf_render(hf_gguf_tok, msgs)
        assert text == "<bos>" + tok.apply_chat_template(msgs, add_generation_prompt=True)
        assert ids == chat_prompt_ids(tok, msgs)


def test_chat_input_errors(tok):
    m = ScriptedModel([5])
    for msgs, match in [([], "no user message"), ([{"role": "system", "content": "S"}], "no user message"),
                        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
                        ([{"role": "user", "content": "  \n"}], "empty user message"),
                        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
                        ([{"content": "no role"}], "last message")]:
        with pytest.raises(InputError, match=match):
            chat(m, tok, msgs)
    with pytest.raises(InputError, match="temperature=-1"):
        chat(m, tok, [{"role": "user", "content": "a"}], temperature=-1)
    with pytest.raises(InputError, match="top_k=0"):
        chat(m, tok, [{"role": "user", "content": "a"}], temperature=1.0, top_k=0)


def test_chat_is_exported():
    assert gemmaforge.chat is chat and "chat" in gemmaforge.__all__


# ------------------------------------------------------------------------------ a scripted model


class ScriptedModel(nn.Module):
    """Replies with ``script`` (greedy picks it: a large logit per step) whatever it reads, then keeps
    repeating its last id; records the prompt ids of every generation."""

    def __init__(self, script, eos=(1,)):
        super().__init__()
        self.script = list(script)
        self.config = SimpleNamespace(eos_token_id=list(eos), max_position_embeddings=8192)
        self.prompts: list[list[int]] = []
        self.steps = 0

    @property
    def device(self):
        return torch.device("cpu")

    def new_cache(self, max_len):
        return {"step": 0}

    def forward(self, ids, cache=None, return_hidden=True):
        if cache["step"] == 0:
            self.prompts.append(ids[0].tolist())
        step = cache["step"]
        cache["step"] += 1
        self.steps += 1
        return torch.full((1, ids.shape[1], 1), float(step))

    def logits(self, h):
        step = int(h[0, 0])
        z = torch.zeros(1, 262_144)
        z[0, self.script[min(step, len(self.script) - 1)]] = 30.0
        return z


def _ids(tok, text):
    return tok.encode(text, add_bos=False)


def _bytes(tok, s):
    return [tok.token_to_id(f"<0x{b:02X}>") for b in s.encode()]


def test_reply_stops_at_end_of_turn_and_its_text_has_no_special_tokens(tok):
    # "Hello" <start_of_image> " wor" "ld" + "🚀" in byte tokens + <pad> "!" <end_of_turn> "NOT THIS"
    script = (_ids(tok, "Hello") + [tok.token_to_id("<start_of_image>")] + _ids(tok, " world") + _bytes(tok, "🚀")
              + [0] + _ids(tok, "!") + [END_OF_TURN] + _ids(tok, " NOT THIS"))
    m = ScriptedModel(script)
    pieces = []
    reply, st = chat(m, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=100, on_text=pieces.append,
                     return_stats=True)
    assert reply == "Hello world🚀!"
    assert st.stopped_on == END_OF_TURN and END_OF_TURN not in st.ids and st.new_tokens == script.index(106)
    assert "".join(pieces) == reply and len(pieces) > 3  # streamed, piece by piece
    assert "🚀" in pieces and not any("\ufffd" in p for p in pieces)  # the emoji came out whole, once
    assert not any(s in reply for s in SPECIAL_TEXTS)
    assert m.prompts == [chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])]
    # the same through sampling: the stop holds whatever the sampler
    reply2 = chat(ScriptedModel(script), tok, [{"role": "user", "content": "Hi"}], temperature=0.7, top_p=0.9,
                  top_k=40, seed=1)
    assert reply2 == reply


def test_reply_stops_at_eos_and_at_max_new_tokens(tok):
    m = ScriptedModel(_ids(tok, "one two") + [1] + _ids(tok, " three"))
    assert chat(m, tok, [{"role": "user", "content": "x"}]) == "one two"
    m = ScriptedModel(_ids(tok, "a b c d e f g h"))
    reply, st = chat(m, tok, [{"role": "user", "content": "x"}], max_new_tokens=3, return_stats=True)
    assert st.new_tokens == 3 and st.stopped_on is None and reply == tok.decode(_ids(tok, "a b c d e f g h")[:3])


def test_conversation_keeps_its_history_and_resets(tok):
    replies = ["Hello Ada.", "Your name is Ada.", "I do not know."]
    m = ScriptedModel([])
    conv = Conversation(m, tok, system="Be brief.", max_new_tokens=50)
    u = ["Hi, I am Ada.", "What is my name?", "And now?"]

    def say(text, reply):
        m.script = _ids(tok, reply) + [END_OF_TURN]
        pieces = []
        out = conv.send(text, on_text=pieces.append)
        assert out == reply == "".join(pieces)
        return out

    say(u[0], replies[0])
    say(u[1], replies[1])
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": u[0]},
            {"role": "assistant", "content": replies[0]}, {"role": "user", "content": u[1]}]
    assert m.prompts[1] == chat_prompt_ids(tok, want)
    assert tok.decode(m.prompts[1], skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi, I am Ada.<end_of_turn>\n<start_of_turn>model\nHello Ada."
        "<end_of_turn>\n<start_of_turn>user\nWhat is my name?<end_of_turn>\n<start_of_turn>model\n")
    assert conv.messages == want + [{"role": "assistant", "content": replies[1]}]
    conv.reset()
    say(u[2], replies[2])
    assert m.prompts[2] == chat_prompt_ids(tok, [want[0], {"role": "user", "content": u[2]}])


def test_conversation_turn_that_fails_leaves_the_history(tok):
    m = ScriptedModel(_ids(tok, "ok") + [END_OF_TURN])
    conv = Conversation(m, tok)
    conv.send("first")

    def boom(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.send("second", on_text=boom)
    assert [t["content"] for t in conv.turns] == ["first", "ok"]


# ------------------------------------------------------------------------------ streaming text


STREAM_TEXTS = [
    "Ünïcödé and emoji 🚀 work: 日本語のテキスト 🤖 émoji",
    "def f(x):\n    return x**2  # code\n\n\n",
    "Привет, мир! مرحبا بالعالم \u200b ﬁ Ⅻ",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_pieces_join_to_the_decoded_text(tok, text):
    ids = _ids(tok, text)
    pieces = []
    s = TextStream(tok, pieces.append)
    for i in ids:
        s.push(i)
    assert s.finish() == "".join(pieces) == tok.decode(ids) == text
    assert len(pieces) > 1 and not any("\ufffd" in p for p in pieces)


def test_stream_holds_a_character_until_its_last_byte(tok):
    pieces = []
    s = TextStream(tok, pieces.append)
    for i in _ids(tok, "go"):
        s.push(i)
    rocket = _bytes(tok, "🚀")
    assert len(rocket) == 4 and None not in rocket
    assert [s.push(i) for i in rocket] == ["", "", "", "🚀"]
    assert [s.push(i) for i in _bytes(tok, "é")] == ["", "é"]
    assert s.push(106) == "" and s.push(0) == ""  # special tokens: no text
    s.push(_bytes(tok, "日")[0])  # an incomplete character at the end comes out as U+FFFD
    assert s.finish() == "go🚀é\ufffd" == "".join(pieces)
    assert tok.decode(s.ids) == "go" + "\ufffd" * 7  # (decode spoils the whole run of byte tokens)
    # a stray byte mid-reply: one U+FFFD, and the stream goes on
    pieces = []
    s = TextStream(tok, pieces.append)
    ids = _ids(tok, "go") + _bytes(tok, "é") + [tok.token_to_id("<0x80>")] + _ids(tok, "abc def") + _bytes(tok, "日")
    emitted = [s.push(i) for i in ids]
    assert emitted[-1] == "日" and " def" in emitted and s.finish() == "".join(pieces) == "goé\ufffdabc def日"


def test_stream_with_a_decoder_that_strips_the_first_space():
    """A sentencepiece-style (Metaspace) decoder drops the leading space of the first token decoded:
    decoding ids one by one would glue the words; the stream keeps them apart."""
    from gemmaforge.data.tokenizer import Tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    vocab = {t: i for i, t in enumerate(specials + ["\u2581Hello", "\u2581world", "!", "\u2581again"])}
    t = Tokenizer.from_json({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in enumerate(specials)],
        "pre_tokenizer": meta, "decoder": meta,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}})
    ids = [4, 5, 6, 2, 7]
    assert "".join(t.decode([i]) for i in ids) == "Helloworld!again"
    pieces = []
    s = TextStream(t, pieces.append)
    for i in ids:
        s.push(i)
    assert s.finish() == "".join(pieces) == t.decode(ids) == "Hello world! again"


def test_generate_streams_the_text_it_returns(tok):
    m = ScriptedModel(_ids(tok, " Paris, of course") + _bytes(tok, "✓") + [END_OF_TURN])
    pieces, ids = [], []
    text = gemmaforge.generate(m, tok, "The capital of France is", max_new_tokens=20, on_text=pieces.append,
                               on_token=ids.append)
    assert text == "".join(pieces) == " Paris, of course✓" and END_OF_TURN not in ids


# ------------------------------------------------------------------------------ the CLI: bad input


def _main(args, capsys, stdin=None, monkeypatch=None):
    from gemmaforge.cli.main import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(list(args))
    return rc, capsys.readouterr()


BAD = [
    (["--temperature", "-1"], "--temperature -1"), (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "warm"], "--temperature warm"), (["--top-p", "2"], "--top-p 2"), (["--top-p", "0"], "--top-p 0"),
    (["--top-k", "0"], "--top-k 0"), (["--top-k", "2.5"], "--top-k 2.5"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"), (["--seed", "x"], "--seed x"),
    (["--device", "tpu"], "--device tpu"), (["--device", "cuda:x"], "--device cuda:x"),
    (["--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args, named", BAD)
def test_cli_bad_values_are_one_line(capsys, command, args, named):
    extra = ["--prompt", "hi"] if command == "generate" else []
    rc, cap = _main([command, *extra, *args], capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("gemmaforge: error: " + named), cap.err
    assert cap.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_cuda_without_cuda_is_one_line(capsys, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    rc, cap = _main([command, *extra, "--device", "cuda"], capsys)
    assert rc == 2 and cap.err.strip() == \
        "gemmaforge: error: --device cuda: CUDA is not available on this machine (use --device cpu)"


def test_cli_adapter_that_is_not_an_adapter(capsys, tmp_path):
    rc, cap = _main(["generate", "--prompt", "hi", "--adapter", str(tmp_path)], capsys)
    assert rc == 2 and cap.err.strip() == f"gemmaforge: error: --adapter {tmp_path}: no adapter_config.json " \
                                          "(not a PEFT adapter dir)"


def test_cli_prompt_errors(capsys, monkeypatch, tmp_path):
    def one_line(args, want, stdin=None):
        rc, cap = _main(["generate", *args], capsys, stdin, monkeypatch)
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and want in lines[0], cap.err

    one_line(["--prompt-file", str(tmp_path / "missing.txt")],
             f"--prompt-file {tmp_path / 'missing.txt'}: No such file or directory")
    one_line(["--prompt-file", str(tmp_path)], f"--prompt-file {tmp_path}: Is a directory")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    one_line(["--prompt-file", str(tmp_path / "latin1.txt")], "not UTF-8 text")
    (tmp_path / "empty.txt").write_text("\n")
    one_line(["--prompt-file", str(tmp_path / "empty.txt")], "empty prompt")
    one_line(["--prompt", ""], "--prompt: empty prompt")
    one_line(["--prompt", "-"], "--prompt - (stdin): empty prompt", stdin="")
    one_line(["--chat", "--prompt", "   "], "empty prompt")
    one_line([], "no prompt: give --prompt TEXT")
    one_line(["--prompt", "a", "--prompt-file", "f"], "not both")


def test_cli_debug_after_the_command_shows_the_traceback(capsys):
    from gemmaforge.cli.main import main

    with pytest.raises(InputError, match="--top-p 2"):
        main(["generate", "--prompt", "hi", "--top-p", "2", "--debug"])
    with pytest.raises(InputError, match="--device tpu"):
        main(["--debug", "chat", "--device", "tpu"])


def test_cli_bad_value_in_a_real_process():
    r = run_cli("chat", "--top-p", "2")
    assert r.returncode == 2 and r.stderr.strip() == "gemmaforge: error: --top-p 2: must be a number in (0, 1]"
    r = run_cli("generate", "--prompt", "hi", "--temperature", "-1", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "--temperature -1" in r.stderr


# ------------------------------------------------------------------------------ the CLI: the real 270M


U1, U2 = "Hi, I am Ada.", "What is my name?"
CHAT_TOKENS = 12


def _read_until(proc, n_bytes, timeout=300):
    """Read proc's stdout until n_bytes came; returns (bytes, the number of separate reads it took)."""
    fd, buf, reads = proc.stdout.fileno(), b"", 0
    deadline = time.monotonic() + timeout
    while len(buf) < n_bytes:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no output in {timeout}s (have {buf!r})"
        chunk = os.read(fd, 65536)
        assert chunk, f"stdout closed early (have {buf!r}; stderr {proc.stderr.read()!r})"
        buf += chunk
        reads += 1
    return buf, reads


@pytest.mark.slow
def test_cli_chat_session_streams_keeps_history_and_resets(real_model):
    """Two user turns through a pipe: the first reply streams out (in pieces, before the next line is
    even sent), the second answers with the first in its history, /reset forgets it, EOF ends."""
    model, tok = real_model
    r1 = chat(model, tok, [{"role": "user", "content": U1}], max_new_tokens=CHAT_TOKENS)
    r2 = chat(model, tok, [{"role": "user", "content": U1}, {"role": "assistant", "content": r1},
                           {"role": "user", "content": U2}], max_new_tokens=CHAT_TOKENS)
    fresh = chat(model, tok, [{"role": "user", "content": U2}], max_new_tokens=CHAT_TOKENS)
    # what the model reads each turn (--stats prints it): the first turn, the history + U2, U2 alone after /reset
    prompt_tokens = [len(chat_prompt_ids(tok, m)) for m in (
        [{"role": "user", "content": U1}],
        [{"role": "user", "content": U1}, {"role": "assistant", "content": r1}, {"role": "user", "content": U2}],
        [{"role": "user", "content": U2}])]

    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "gemmaforge", "chat", "--max-new-tokens", str(CHAT_TOKENS),
                             "--stats"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(f"{U1}\n".encode())
        proc.stdin.flush()
        first = (r1 + "\n").encode()
        got, reads = _read_until(proc, len(first))
        assert got == first
        assert reads >= 2  # the reply came in pieces as it was generated, not at once
        out, err = proc.communicate(f"\n{U2}\n/reset\n{U2}\n".encode(), timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == f"{r2}\n{fresh}\n"
    assert not any(s in (got + out).decode() for s in SPECIAL_TEXTS)
    err = err.decode()
    assert "(conversation reset)" in err and "Traceback" not in err
    assert [int(n) for n in re.findall(r"prompt (\d+) tokens prefilled", err)] == prompt_tokens, err


@pytest.mark.slow
def test_cli_generate_chat_prompt_file_and_stdin(real_model, tmp_path):
    model, tok = real_model
    r = run_cli("generate", "--chat", "--system", "Be brief.", "--prompt", U1, "--max-new-tokens", str(CHAT_TOKENS))
    want = chat(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": U1}],
                max_new_tokens=CHAT_TOKENS)
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    assert not any(s in r.stdout for s in SPECIAL_TEXTS)

    prompt = "The capital of France is"
    want = gemmaforge.generate(model, tok, prompt, max_new_tokens=8)
    f = tmp_path / "prompt.txt"
    f.write_text(prompt + "\n", encoding="utf-8")  # a file's final newline is not part of the prompt
    r = run_cli("generate", "--prompt-file", str(f), "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    r = subprocess.run([sys.executable, "-m", "gemmaforge", "generate", "--prompt", "-", "--max-new-tokens", "8"],
                       input=prompt + "\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout == want + "\n" and "tokens/s" in r.stderr, r.stderr
