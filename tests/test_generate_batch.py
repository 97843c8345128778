"""Batched generation (``inference.batch``): every row gives what single-prompt generation gives on its
prompt (greedy), for ragged prompts of 1..200 tokens that cross the sliding window, rows stopping at
different steps and leaving the batch; sampling reproducible per seed and per row; the CLI's
``--prompt-file`` (one prompt per line) and its bad values."""

from __future__ import annotations

import json
import random

import pytest
import torch

import gemmaforge
from conftest import run_cli
from gemmaforge import from_config, preset
from gemmaforge.errors import InputError
from gemmaforge.inference.batch import RaggedKVCache, generate_batch_ids, row_seed
from gemmaforge.inference.generate import generate_ids

LENGTHS = [1, 2, 7, 8, 9, 17, 64, 130, 200]  # the tiny configs' sliding window is 8 (Mistral's: 16)
NEW = 24


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    m = from_config(preset(name, **overrides))
    for p in m.parameters():  # random norm weights: nothing cancels by construction
        if p.dim() == 1:
            torch.nn.init.normal_(p, 0, 0.5)
    return m


def _prompts(vocab, lengths=LENGTHS, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def tiny():
    return _model("gemma-3-tiny")


@pytest.fixture(scope="module")
def tiny_refs(tiny):
    """Single-prompt greedy ids of each prompt (no stop id)."""
    prompts = _prompts(tiny.config.vocab_size)
    return prompts, [generate_ids(tiny, p, max_new_tokens=NEW, stop_ids=set()).ids for p in prompts]


def test_window_is_crossed(tiny):
    windows = {tiny.config.window_for(t) for t in tiny.config.layer_types}
    w = max(x for x in windows if x is not None)
    assert None in windows and max(LENGTHS) > w and min(LENGTHS) < w and NEW > 2 * w


def test_greedy_rows_equal_single_prompt_generation(tiny, tiny_refs):
    prompts, refs = tiny_refs
    got = generate_batch_ids(tiny, prompts, max_new_tokens=NEW, stop_ids=set())
    assert got == refs
    assert all(len(r) == NEW for r in got)


@pytest.mark.parametrize("name", ["mistral-tiny", "gemma-4-tiny-e2b"])
def test_greedy_rows_equal_single_other_families(name):
    """Mistral (every layer sliding) and Gemma 4 (KV sharing, per-layer inputs, two head dims)."""
    m = _model(name)
    prompts = _prompts(m.config.vocab_size, [1, 5, 17, 40, 120])
    got = generate_batch_ids(m, prompts, max_new_tokens=20, stop_ids=set())
    assert got == [generate_ids(m, p, max_new_tokens=20, stop_ids=set()).ids for p in prompts]


def test_reordered_and_sub_batches_give_the_same_rows(tiny, tiny_refs):
    prompts, refs = tiny_refs
    order = [6, 0, 8, 3]
    assert generate_batch_ids(tiny, [prompts[i] for i in order], max_new_tokens=NEW, stop_ids=set()) == \
        [refs[i] for i in order]
    assert generate_batch_ids(tiny, [prompts[7]], max_new_tokens=NEW, stop_ids=set()) == [refs[7]]


def test_rows_stop_at_their_own_steps_and_leave_the_batch(tiny, tiny_refs):
    prompts, refs = tiny_refs
    # per row, a stop id that first comes at a different step in each row (or never)
    stops, want = [], []
    for r, ids in enumerate(refs):
        step = next((s for s in range(2 + r, NEW) if ids[s] not in ids[:s]), None)
        stops.append({ids[step]} if step is not None else set())
        want.append(ids[:step] if step is not None else ids)
    assert len({len(w) for w in want}) >= 4  # rows really end at different steps

    sizes = []
    handle = tiny.model.layers["0"].register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        st = generate_batch_ids(tiny, prompts, max_new_tokens=NEW, stop_ids=stops, return_stats=True)
    finally:
        handle.remove()
    assert st.ids == want
    assert st.stopped_on == [next(iter(s)) if len(w) < NEW else None for s, w in zip(stops, want)]
    # each row's stop equals single-prompt generation with that stop id
    for p, s, w in zip(prompts, stops, want):
        assert generate_ids(tiny, p, max_new_tokens=NEW, stop_ids=s).ids == w
    # the decode forwards ran only the rows still going
    decode = sizes[1:]
    assert decode == sorted(decode, reverse=True) and decode[0] == len(prompts)
    # decode forward k feeds each row's token k: rows with more than k tokens, the last budget token never
    live = [sum(k < len(w) for w in want) for k in range(min(max(map(len, want)), NEW - 1))]
    assert decode == live


def test_shared_stop_set_and_max_new_tokens_one(tiny, tiny_refs):
    prompts, refs = tiny_refs
    common = {refs[0][3], refs[5][1]}
    got = generate_batch_ids(tiny, prompts, max_new_tokens=NEW, stop_ids=common)
    assert got == [generate_ids(tiny, p, max_new_tokens=NEW, stop_ids=common).ids for p in prompts]
    assert generate_batch_ids(tiny, prompts, max_new_tokens=1, stop_ids=set()) == [r[:1] for r in refs]


def test_sampling_is_reproducible_per_seed_and_per_row(tiny):
    prompts = _prompts(tiny.config.vocab_size, [3, 50, 9, 120])
    kw = dict(max_new_tokens=16, temperature=1.3, top_k=40, top_p=0.95, stop_ids=set())
    a = generate_batch_ids(tiny, prompts, seed=7, **kw)
    assert a == generate_batch_ids(tiny, prompts, seed=7, **kw)
    assert a != generate_batch_ids(tiny, prompts, seed=8, **kw)
    assert len({tuple(r) for r in generate_batch_ids(tiny, [prompts[1]] * 4, seed=7, **kw)}) > 1  # rows differ
    # row i samples as single-prompt generation seeded with row_seed(seed, i), whatever else is in the batch
    for i, p in enumerate(prompts):
        assert a[i] == generate_ids(tiny, p, seed=row_seed(7, i), **kw).ids
    assert generate_batch_ids(tiny, [prompts[2]], seed=[row_seed(7, 2)], **kw) == [a[2]]
    assert row_seed(1, 0) != row_seed(0, 1) and row_seed(0, 0) != row_seed(0, 1)


def test_bad_input_is_refused(tiny):
    with pytest.raises(InputError, match="top_p=2"):
        generate_batch_ids(tiny, [[5]], top_p=2)
    with pytest.raises(InputError, match="prompt 1: empty"):
        generate_batch_ids(tiny, [[5], []])
    with pytest.raises(InputError, match="2 seeds for 1 prompts"):
        generate_batch_ids(tiny, [[5]], temperature=1.0, seed=[1, 2])
    with pytest.raises(InputError, match="longer than the model's context"):
        generate_batch_ids(tiny, [[5] * (tiny.config.max_position_embeddings + 1)])
    assert generate_batch_ids(tiny, []) == []
    # a prompt that fills the context gets no new token (as in single-prompt generation); the others go on
    full, short = [5] * tiny.config.max_position_embeddings, [6, 7, 8]
    got = generate_batch_ids(tiny, [full, short], max_new_tokens=4, stop_ids=set())
    assert got == [generate_ids(tiny, p, max_new_tokens=4, stop_ids=set()).ids for p in (full, short)]
    assert got[0] == [] and len(got[1]) == 4


def test_cache_keeps_only_the_window_on_sliding_layers(tiny):
    prompts = _prompts(tiny.config.vocab_size, [3, 100])
    cfg = tiny.config
    windows = [cfg.window_for(t) for t in cfg.layer_types]
    cache = RaggedKVCache(windows, [3, 100], max_new=50)
    flat = torch.tensor(prompts[0] + prompts[1])
    with torch.inference_mode():
        tiny(flat, cu_seqlens=torch.tensor([0, 3, 103], dtype=torch.int32), cache=cache, return_hidden=True)
        for step in range(30):
            tiny(torch.tensor([[5], [6]]), position_ids=torch.tensor([[3 + step], [100 + step]]), cache=cache,
                 return_hidden=True)
    for i, w in enumerate(windows):
        cap = cache._k[i].shape[2]
        if w is None:
            assert cache.stored_tokens(i) == 130 and cap == 150
        else:
            assert w - 1 <= cache.stored_tokens(i) < cap <= 2 * (w - 1)


# ------------------------------------------------------------------------------ text and the CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import test_interp

    from gemmaforge.formats.hf import save_hf

    d = tmp_path_factory.mktemp("batch") / "model"
    tok = test_interp.tiny_tokenizer()
    # every id decodes; seed 2: the three prompts end at EOS after 7, 8 and 3 tokens (max 10)
    save_hf(_model("gemma-3-tiny", seed=2, vocab_size=tok.vocab_size), d, tokenizer=tok)
    return d


LINES = ["the cat sat on a mat", "", "dog", "the big red house in morning sun and the dog ran to a cat"]
ENV = {"OMP_NUM_THREADS": "1"}


def test_generate_batch_text_equals_generate(tiny_dir):
    model = gemmaforge.from_pretrained(str(tiny_dir))
    tok = gemmaforge.load_tokenizer(str(tiny_dir))
    prompts = [p for p in LINES if p]
    texts, st = gemmaforge.generate_batch(model, tok, prompts, max_new_tokens=10, return_stats=True)
    assert texts == [gemmaforge.generate(model, tok, p, max_new_tokens=10) for p in prompts]
    assert [len(t.split()) for t in texts] == [7, 8, 3] and st.stopped_on == [tok.eos_id] * 3
    with pytest.raises(InputError, match="list of prompts"):
        gemmaforge.generate_batch(model, tok, "one prompt")


def test_cli_prompt_file_one_prompt_per_line(tiny_dir, tmp_path):
    model = gemmaforge.from_pretrained(str(tiny_dir))
    tok = gemmaforge.load_tokenizer(str(tiny_dir))
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    want = [gemmaforge.generate(model, tok, p, max_new_tokens=6) for p in LINES if p]
    r = run_cli("generate", "--model", str(tiny_dir), "--prompt-file", str(f), "--max-new-tokens", "6", env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    expect = "".join(f"=== [{i}/3] line {n} ===\n{w}\n" for i, (n, w) in enumerate(zip([1, 3, 4], want), 1))
    assert r.stdout == expect
    assert "3 prompts" in r.stderr and "tokens/s" in r.stderr

    r = run_cli("generate", "--model", str(tiny_dir), "--prompt-file", str(f), "--max-new-tokens", "6", "--jsonl",
                env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    texts = [p for p in LINES if p]
    assert rows == [{"line": n, "prompt": p, "completion": w} for n, p, w in zip([1, 3, 4], texts, want)]

    one = tmp_path / "one.txt"  # one prompt: streamed as before, no header
    one.write_text(LINES[0] + "\n", encoding="utf-8")
    r = run_cli("generate", "--model", str(tiny_dir), "--prompt-file", str(one), "--max-new-tokens", "6", env=ENV)
    assert r.returncode == 0 and r.stdout == want[0] + "\n", r.stderr[-2000:]


@pytest.mark.parametrize("args, named", [(["--top-p", "2"], "--top-p 2"), (["--temperature", "-1"], "--temperature -1"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens 0"),
                                         (["--seed", "x"], "--seed x")])
def test_cli_prompt_file_bad_sampling_values_are_one_line(tmp_path, args, named):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    r = run_cli("generate", "--prompt-file", str(f), *args, env=ENV)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("gemmaforge: error: " + named), r.stderr
    assert r.stdout == ""


def test_cli_prompt_file_bad_lines_are_one_line(tiny_dir, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    r = run_cli("generate", "--prompt-file", str(blank), env=ENV)
    assert r.returncode == 2 and r.stderr.strip() == f"gemmaforge: error: --prompt-file {blank}: empty prompt " \
                                                     "(no line holds text)", r.stderr
    spaces = tmp_path / "spaces.txt"
    spaces.write_text("hi\n   \n")
    r = run_cli("generate", "--chat", "--prompt-file", str(spaces), env=ENV)
    assert r.returncode == 2 and r.stderr.strip() == f"gemmaforge: error: --prompt-file {spaces}: line 2: empty " \
                                                     "chat message (only spaces)", r.stderr
    long = tmp_path / "long.txt"
    long.write_text("dog\n" + " ".join(["cat"] * 1100) + "\n")
    r = run_cli("generate", "--model", str(tiny_dir), "--prompt-file", str(long), env=ENV)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith(f"gemmaforge: error: --prompt-file {long}: line 2: prompt of"), \
        r.stderr
