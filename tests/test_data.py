"""gemmaforge.data: packing invariants (property-based) and data sources."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemmaforge.data import (
    IGNORE_INDEX,
    Document,
    PackingStats,
    collate_rows,
    load_documents,
    pack_documents,
    pack_stream,
    packing_efficiency,
    packing_stats,
    pad_documents,
    train_val_split,
)
from gemmaforge.errors import DataError

# ----------------------------------------------------------------------------- fake tokenizer


class ByteTokenizer:
    """Byte-level tokenizer with Gemma's turn markers as single tokens."""

    pad_id, bos_id, eos_id = 0, 1, 2
    SPECIAL = {"<start_of_turn>": 3, "<end_of_turn>": 4}
    _split = re.compile("(<start_of_turn>|<end_of_turn>)")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for part in self._split.split(text):
            if part in self.SPECIAL:
                ids.append(self.SPECIAL[part])
            else:
                ids.extend(b + 10 for b in part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        names = {0: "<pad>", 1: "<bos>", 2: "<eos>", **{v: k for k, v in self.SPECIAL.items()}}
        out, buf = [], bytearray()
        for i in ids:
            if i >= 10:
                buf.append(i - 10)
            else:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                out.append(names[i])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=False) -> str:
        msgs = list(messages)
        system = None
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        out = []
        for i, m in enumerate(msgs):
            role = "model" if m["role"] == "assistant" else m["role"]
            content = m["content"]
            if i == 0 and system is not None:
                content = f"{system}\n\n{content}"
            out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
        if add_generation_prompt:
            out.append("<start_of_turn>model\n")
        return "".join(out)


TOK = ByteTokenizer()

# ----------------------------------------------------------------------------- packing helpers

STRIDE = 10_000  # token id = doc * STRIDE + position + 1: every token identifies its doc and position


def make_docs(lengths, masks=None):
    docs = []
    for d, n in enumerate(lengths):
        ids = [d * STRIDE + p + 1 for p in range(n)]
        docs.append(Document(ids, None if masks is None else masks[d]))
    return docs


def check_rows(rows, docs, seq_len, pad_id):
    """Every invariant of a packing result, checked from the tensors alone."""
    seen: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        ids, labels, pos, cu = row.input_ids, row.labels, row.position_ids, row.cu_seqlens
        assert ids.shape == labels.shape == pos.shape == (seq_len,)
        assert ids.dtype == labels.dtype == pos.dtype == torch.long
        assert cu.dtype == torch.int32
        cu_l = cu.tolist()
        assert cu_l[0] == 0 and cu_l[-1] == seq_len
        assert all(a < b for a, b in zip(cu_l, cu_l[1:])), "empty or negative segment"
        real = row.num_real_tokens
        # padding: at most one segment, last, exactly the tail
        if real < seq_len:
            assert cu_l[-2] == real
            assert (ids[real:] == pad_id).all()
            assert (labels[real:] == IGNORE_INDEX).all()
        assert len(row.doc_spans) == len(cu_l) - 1 - (real < seq_len)
        seg_of = torch.empty(seq_len, dtype=torch.long)
        for k, (a, b) in enumerate(zip(cu_l, cu_l[1:])):
            seg_of[a:b] = k
            assert pos[a:b].tolist() == list(range(b - a)), "position_ids must restart per segment"
        # labels never cross a segment boundary
        crossing = (labels[:-1] != IGNORE_INDEX) & (seg_of[1:] != seg_of[:-1])
        assert not crossing.any()
        assert labels[-1] == IGNORE_INDEX
        # each real segment is one contiguous slice of one document, matching doc_spans
        for k, (a, b) in enumerate(zip(cu_l, cu_l[1:])):
            if a >= real:
                break
            toks = ids[a:b].tolist()
            d, p0 = (toks[0] - 1) // STRIDE, (toks[0] - 1) % STRIDE
            assert toks == [d * STRIDE + p0 + i + 1 for i in range(b - a)]
            assert row.doc_spans[k] == (d, p0, b - a)
            seen.setdefault(d, []).append((p0, b - a))
            mask = docs[d].mask()
            want = [toks[i + 1] if i + 1 < b - a and mask[p0 + i + 1] else IGNORE_INDEX for i in range(b - a)]
            assert labels[a:b].tolist() == want
    # every token of every document exactly once, in order
    for d, doc in enumerate(docs):
        pieces = sorted(seen.get(d, []))
        covered = 0
        for p0, n in pieces:
            assert p0 == covered, f"doc {d}: gap or overlap at {covered}"
            assert n <= seq_len
            covered += n
        assert covered == len(doc.ids)
    assert set(seen) <= set(range(len(docs)))


lengths_st = st.lists(
    st.one_of(st.just(1), st.integers(1, 6), st.integers(1, 40), st.integers(0, 3)),
    min_size=0,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=lengths_st,
    seq_len=st.integers(1, 17),
    strategy=st.sampled_from(["ffd", "greedy"]),
    pad_id=st.sampled_from([0, 7]),
    data=st.data(),
)
def test_packing_properties(lengths, seq_len, strategy, pad_id, data):
    masks = [data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n))) for n in lengths]
    docs = make_docs(lengths, masks)
    rows = pack_documents(docs, seq_len, strategy=strategy, pad_id=pad_id)
    check_rows(rows, docs, seq_len, pad_id)

    total = sum(lengths)
    assert sum(r.num_real_tokens for r in rows) == total
    assert len(rows) >= -(-total // seq_len)
    if rows:
        assert packing_efficiency(rows) == pytest.approx(total / (len(rows) * seq_len))
    else:
        assert total == 0 and packing_efficiency(rows) == 0.0
    if strategy == "greedy":
        assert all(r.num_real_tokens == seq_len for r in rows[:-1])
        assert len(rows) == -(-total // seq_len)
    else:
        # first-fit property: no two rows are both at most half full
        assert sum(1 for r in rows if 2 * r.num_real_tokens <= seq_len) <= 1
    # deterministic
    again = pack_documents(docs, seq_len, strategy=strategy, pad_id=pad_id)
    assert [r.doc_spans for r in again] == [r.doc_spans for r in rows]
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(again, rows))

    stats = packing_stats(rows)
    assert stats.rows == len(rows)
    assert stats.docs == sum(1 for n in lengths if n > 0)
    assert stats.tokens == total and stats.pad_tokens == len(rows) * seq_len - total
    if strategy == "ffd":
        assert stats.split_docs == sum(1 for n in lengths if n > seq_len)

    if rows:
        batch = collate_rows(rows)
        B = len(rows)
        assert batch["input_ids"].shape == (B, seq_len)
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32
        expect = torch.cat([r.cu_seqlens[:-1] + b * seq_len for b, r in enumerate(rows)] + [torch.tensor([B * seq_len])])
        assert cu.tolist() == expect.tolist()
        assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
        assert batch["num_valid_labels"] == int((batch["labels"] != IGNORE_INDEX).sum())
        assert batch["num_valid_labels"] == sum(int((r.labels != -100).sum()) for r in rows)
        # flattened position ids agree with the flattened boundaries
        flat_pos = batch["position_ids"].reshape(-1)
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            assert flat_pos[a:b].tolist() == list(range(b - a))


def test_unsplit_label_count_matches_documents():
    """With no splitting, packing loses no labels: each doc yields its own num_targets."""
    docs = make_docs([5, 3, 8, 1, 2, 7], masks=[None, [True, False, True], None, None, [False, True], None])
    rows = pack_documents(docs, 8)
    assert collate_rows(rows)["num_valid_labels"] == sum(d.num_targets for d in docs)


def test_ffd_known_layout():
    docs = make_docs([3, 12, 1, 4])
    rows = pack_documents(docs, 5)
    # pieces: d1 cut to 5,5,2; sorted decreasing: 5,5,4,3,2,1
    assert [r.doc_spans for r in rows] == [
        ((1, 0, 5),),
        ((1, 5, 5),),
        ((2, 0, 1), (3, 0, 4)),
        ((0, 0, 3), (1, 10, 2)),
    ]
    assert packing_efficiency(rows) == 1.0
    assert str(packing_stats(rows)).startswith("4 rows, 4 docs (1 split)")


def test_padding_segment_and_labels():
    docs = [Document([11, 12, 13], [False, True, True]), Document([21, 22])]
    (row,) = pack_documents(docs, 8, pad_id=0)
    assert row.input_ids.tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert row.labels.tolist() == [12, 13, -100, 22, -100, -100, -100, -100]
    assert row.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert row.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row.num_real_tokens == 5 and row.num_segments == 3 and row.num_pad_tokens == 3


def test_greedy_stream_and_drop_last():
    docs = make_docs([4, 4, 3])
    rows = list(pack_stream(iter(docs), 5))
    assert [r.doc_spans for r in rows] == [((0, 0, 4), (1, 0, 1)), ((1, 1, 3), (2, 0, 2)), ((2, 2, 1),)]
    assert len(list(pack_stream(iter(docs), 5, drop_last=True))) == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        pack_documents(make_docs([3]), 0)
    with pytest.raises(ValueError):
        pack_documents(make_docs([3]), 4, strategy="bfd")
    with pytest.raises(ValueError):
        Document([1, 2], [True])
    with pytest.raises(ValueError):
        collate_rows(pack_documents(make_docs([3]), 4) + pack_documents(make_docs([3]), 5))
    with pytest.raises(ValueError):
        collate_rows([])


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_documents(side):
    docs = [Document([5, 6, 7], [False, True, True]), Document([8])]
    out = pad_documents(docs, pad_id=0, side=side)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    if side == "right":
        assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert out["labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    else:
        assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
        assert out["labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    # same supervised targets as packing
    packed = collate_rows(pack_documents(docs, 4))
    assert int((out["labels"] != -100).sum()) == packed["num_valid_labels"]
    with pytest.raises(ValueError):
        pad_documents(docs, side="middle")


# ----------------------------------------------------------------------------- sources


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, *objs):
    return write(path, "".join(json.dumps(o) + "\n" for o in objs))


def trained_text(doc: Document) -> str:
    return TOK.decode([i for i, m in zip(doc.ids, doc.mask()) if m])


def test_txt_file_and_directory(tmp_path):
    (doc,) = load_documents(write(tmp_path / "one.txt", "héllo"), TOK)
    assert doc.ids == [TOK.bos_id] + [b + 10 for b in "héllo".encode()] + [TOK.eos_id]
    assert doc.loss_mask is None

    d = tmp_path / "corpus"
    write(d / "b.txt", "bee")
    write(d / "a.txt", "ay")
    write(d / "sub" / "c.txt", "sea")
    write(d / "notes.md", "ignored")
    docs = load_documents(d, TOK)
    assert [TOK.decode(x.ids) for x in docs] == ["<bos>ay<eos>", "<bos>bee<eos>", "<bos>sea<eos>"]
    # several paths, in the given order
    docs = load_documents([tmp_path / "one.txt", str(d / "a.txt")], TOK)
    assert [TOK.decode(x.ids) for x in docs] == ["<bos>héllo<eos>", "<bos>ay<eos>"]


def test_jsonl_text(tmp_path):
    p = write(tmp_path / "t.jsonl", json.dumps({"text": "abc", "id": 7}) + "\n\n" + json.dumps({"text": "de"}) + "\n")
    docs = load_documents(p, TOK)
    assert [TOK.decode(d.ids) for d in docs] == ["<bos>abc<eos>", "<bos>de<eos>"]
    assert all(d.loss_mask is None for d in docs)


def test_jsonl_prompt_completion_mask(tmp_path):
    p = jsonl(tmp_path / "pc.jsonl", {"prompt": "Q: 2+2?\nA:", "completion": " 4"})
    (doc,) = load_documents(p, TOK)
    assert TOK.decode(doc.ids) == "<bos>Q: 2+2?\nA: 4<eos>"
    assert trained_text(doc) == " 4<eos>"
    # the first trained token is exactly the first completion token
    first = doc.mask().index(True)
    assert TOK.decode(doc.ids[:first]) == "<bos>Q: 2+2?\nA:"
    # after packing, only completion tokens are targets
    (row,) = pack_documents([doc], 32)
    targets = [t for t in row.labels.tolist() if t != -100]
    assert TOK.decode(targets) == " 4<eos>"
    # an empty prompt is allowed: BOS, then the completion
    (doc,) = load_documents(jsonl(tmp_path / "pc2.jsonl", {"prompt": "", "completion": "xy"}), TOK)
    assert TOK.decode(doc.ids) == "<bos>xy<eos>" and doc.loss_mask == [False, True, True, True]


def test_jsonl_chat_mask(tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "See you."},
    ]
    p = jsonl(tmp_path / "chat.jsonl", {"messages": msgs})
    (doc,) = load_documents(p, TOK)
    full = TOK.apply_chat_template(msgs)
    assert full.startswith("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    # piecewise tokenization equals whole tokenization here (byte-level)
    assert doc.ids == TOK.encode(full, add_bos=True) + [TOK.eos_id]
    assert trained_text(doc) == "Hello!<end_of_turn>See you.<end_of_turn>"
    (row,) = pack_documents([doc], 128)
    targets = [t for t in row.labels.tolist() if t != -100]
    assert TOK.decode(targets) == "Hello!<end_of_turn>See you.<end_of_turn>"


def test_chat_trailing_user_turn_untrained(tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "user", "content": "c"}]
    (doc,) = load_documents(jsonl(tmp_path / "c.jsonl", {"messages": msgs}), TOK)
    assert trained_text(doc) == "b<end_of_turn>"
    assert TOK.decode(doc.ids).endswith("<start_of_turn>user\nc<end_of_turn>\n<eos>")


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', 3, "not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', 2, "expected a JSON object"),
    ('{"foo": 1}\n', 1, 'expected "text"'),
    ('{"text": 5}\n', 1, '"text" must be a string, got int'),
    ('{"text": ""}\n', 1, '"text" is empty'),
    ('{"text": "a"}\n{"prompt": "p"}\n', 2, 'lacks "completion"'),
    ('{"prompt": ["p"], "completion": "c"}\n', 1, '"prompt" must be a string, got list'),
    ('{"prompt": "p", "completion": null}\n', 1, '"completion" must be a string, got null'),
    ('{"prompt": "p", "completion": ""}\n', 1, '"completion" is empty'),
    ('{"messages": "hi"}\n', 1, '"messages" must be a list'),
    ('{"messages": []}\n', 1, '"messages" is empty'),
    ('{"messages": [1]}\n', 1, "messages[0] must be an object"),
    ('{"messages": [{"role": "user"}]}\n', 1, 'messages[0] lacks "content"'),
    ('{"messages": [{"role": "user", "content": 3}]}\n', 1, '"content" must be a string, got int'),
    ('{"messages": [{"role": 1, "content": "x"}]}\n', 1, '"role" must be a string'),
    ('\n{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}\n', 2, "unknown role 'bot'"),
    ('{"messages": [{"role": "model", "content": "x"}]}\n', 1, "expected a user turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}\n', 1, "expected a model turn"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}\n',
        1,
        "system message may only come first",
    ),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', 1, "no model/assistant turn"),
    ('{"text": "a", "prompt": "b", "completion": "c"}\n', 1, "ambiguous"),
    ("\n  \n", 1, "empty file"),
]


@pytest.mark.parametrize("content,line,fragment", BAD_JSONL)
def test_bad_jsonl(tmp_path, content, line, fragment):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        load_documents(p, TOK)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert fragment in msg
    assert "\n" not in msg


def test_bad_utf8_names_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2: not valid UTF-8")):
        load_documents(p, TOK)
    t = tmp_path / "bin.txt"
    t.write_bytes(b"line one\nline two \xfe\n")
    with pytest.raises(DataError, match=re.escape(f"{t}:2: not valid UTF-8")):
        load_documents(t, TOK)


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty.txt'}:1: empty file")):
        load_documents(write(tmp_path / "empty.txt", " \n"), TOK)
    # whole-path problems name the path (no line applies)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file or directory")):
        load_documents(missing, TOK)
    (tmp_path / "emptydir").mkdir()
    write(tmp_path / "emptydir" / "x.md", "not txt")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'emptydir'}: directory has no *.txt files")):
        load_documents(tmp_path / "emptydir", TOK)
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_documents(write(tmp_path / "d.csv", "a,b\n"), TOK)
    with pytest.raises(DataError, match="no data paths"):
        load_documents([], TOK)
    # an empty file inside a directory is named by its own path
    write(tmp_path / "dir" / "a.txt", "fine")
    write(tmp_path / "dir" / "b.txt", "")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dir' / 'b.txt'}:1: empty file")):
        load_documents(tmp_path / "dir", TOK)


def test_train_val_split():
    docs = make_docs(range(1, 21))
    train, val = train_val_split(docs, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(map(id, train + val)) == sorted(map(id, docs))
    # input order kept within each part
    assert train == [d for d in docs if any(d is t for t in train)]
    assert train_val_split(docs, 0.25, seed=3) == (train, val)
    assert any(train_val_split(docs, 0.25, seed=s)[1] != val for s in range(4, 10))
    assert train_val_split(docs, 0.0, seed=0) == (docs, [])
    t, v = train_val_split(docs[:3], 0.01, seed=0)
    assert len(v) == 1 and len(t) == 2
    with pytest.raises(ValueError):
        train_val_split(docs, 1.0, seed=0)


def test_stats_type():
    rows = pack_documents(make_docs([2, 3]), 4)
    s = PackingStats.from_rows(rows)
    assert s == packing_stats(rows)
    assert s.efficiency == pytest.approx(5 / 8)
