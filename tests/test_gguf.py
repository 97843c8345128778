"""GGUF reader / dequantizers / Gemma 3 conversion, checked against the `gguf` package and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemmaforge.formats.gguf import (
    GGML_TYPES,
    dequantize,
    gguf_to_hf_config,
    load_gguf,
    load_gguf_tokenizer,
    read_gguf,
    supported_types,
)
from gemmaforge.errors import CheckpointError

Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------
# fixtures: the real 270M file, synthetic files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_reader(real_gguf):
    return gguf.GGUFReader(real_gguf)


TINY = dict(hidden=64, layers=2, heads=2, kv=1, head_dim=32, ffn=128)
TINY_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
               "\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "\u2581ab", "  ", "   ", "\n", "\n\n", "<0x41>"]
TINY_TYPES = [3, 3, 3, 3, 3, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 1, 1, 6]


def write_tiny_gemma3(path: Path, *, drop: tuple[str, ...] = (), extra_kv=None, norm_types=Q.F32,
                      skip_meta: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A small, random gemma3 GGUF written by the `gguf` package; returns the float tensors written
    (GGUF names, torch-order shapes; quantized ones as their dequantized values)."""
    t = TINY
    w = gguf.GGUFWriter(str(path), "gemma3")
    kv = {
        "gemma3.context_length": (1024, "u32"), "gemma3.embedding_length": (t["hidden"], "u32"),
        "gemma3.block_count": (t["layers"], "u32"), "gemma3.feed_forward_length": (t["ffn"], "u32"),
        "gemma3.attention.head_count": (t["heads"], "u32"), "gemma3.attention.head_count_kv": (t["kv"], "u32"),
        "gemma3.attention.key_length": (t["head_dim"], "u32"), "gemma3.attention.value_length": (t["head_dim"], "u32"),
        "gemma3.attention.layer_norm_rms_epsilon": (1e-6, "f32"), "gemma3.rope.freq_base": (1e6, "f32"),
        "gemma3.attention.sliding_window": (16, "u32"),
    }
    for k, (v, ty) in kv.items():
        if k in skip_meta:
            continue
        (w.add_uint32 if ty == "u32" else w.add_float32)(k, v)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_scores([-float(i) for i in range(len(TINY_TOKENS))])
    w.add_token_types(TINY_TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    h, hd, ffn, V = t["hidden"], t["head_dim"], t["ffn"], len(TINY_TOKENS)
    shapes = {"token_embd.weight": (V, h), "output_norm.weight": (h,)}
    for i in range(t["layers"]):
        shapes |= {
            f"blk.{i}.attn_q.weight": (t["heads"] * hd, h), f"blk.{i}.attn_k.weight": (t["kv"] * hd, h),
            f"blk.{i}.attn_v.weight": (t["kv"] * hd, h), f"blk.{i}.attn_output.weight": (h, t["heads"] * hd),
            f"blk.{i}.attn_q_norm.weight": (hd,), f"blk.{i}.attn_k_norm.weight": (hd,),
            f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.post_attention_norm.weight": (h,),
            f"blk.{i}.ffn_norm.weight": (h,), f"blk.{i}.post_ffw_norm.weight": (h,),
            f"blk.{i}.ffn_gate.weight": (ffn, h), f"blk.{i}.ffn_up.weight": (ffn, h),
            f"blk.{i}.ffn_down.weight": (h, ffn),
        }
    values = {}
    for name, shape in shapes.items():
        if name in drop:
            continue
        x = RNG.standard_normal(shape).astype(np.float32)
        if "norm" in name:
            x = (1.0 + 0.1 * x).astype(np.float32)
            if norm_types == Q.F16:
                x16 = x.astype(np.float16)
                w.add_tensor(name, x16)
                values[name] = x16.astype(np.float32)
            else:
                w.add_tensor(name, x)
                values[name] = x
        elif name.endswith("attn_v.weight"):  # one quantized tensor per layer
            raw = gguf.quants.quantize(x, Q.Q8_0)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q.Q8_0)
            values[name] = gguf.quants.dequantize(raw, Q.Q8_0)
        else:
            w.add_tensor(name, x)
            values[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


# ------------------------------------------------------------------------------------------------
# dequantizers vs gguf.quants.dequantize
# ------------------------------------------------------------------------------------------------

# byte offsets of the fp16 scale fields inside one block, per type (the rest of the block is random)
F16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_blocks(qtype, n_blocks: int) -> np.ndarray:
    """Random raw blocks whose fp16 scales are finite and of a sane size."""
    _, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (RNG.standard_normal(n_blocks) * 0.02).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray):
    ref_t = torch.from_numpy(np.array(ref, dtype=np.float32, copy=True))
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == tuple(ref_t.shape)
    torch.testing.assert_close(ours, ref_t, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.view(torch.int32), ref_t.view(torch.int32)), "not bit-identical"


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_dequant_random_blocks_match_gguf(qtype):
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    rows, per_row = 24, 3  # several rows of several blocks
    raw = random_blocks(qtype, rows * per_row).reshape(rows, per_row * ts)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(raw, int(qtype), (rows, per_row * bs))
    assert_bit_equal(ours, ref)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_dequant_quantized_data_match_gguf(qtype):
    """Blocks made by gguf's reference quantizer from real-valued data (incl. zeros, extremes)."""
    x = (RNG.standard_normal((16, 256)) * 3).astype(np.float32)
    x[0] = 0.0
    x[1, :32] = 1e4
    raw = gguf.quants.quantize(x, qtype)
    ours = dequantize(raw, qtype.name, x.shape)
    assert_bit_equal(ours, gguf.quants.dequantize(raw, qtype))
    # and it is a reasonable reconstruction of x
    assert (ours - torch.from_numpy(x)).abs().max() < 0.6 * np.abs(x).max() / 8


def test_dequant_big_tensor_chunked_matches_gguf():
    """More blocks than one chunk: the chunked path writes every part in place."""
    raw = random_blocks(Q.Q4_K, 700).reshape(70, -1)  # 179200 values > one 65536-value chunk
    assert_bit_equal(dequantize(raw, Q.Q4_K, (70, 2560)), gguf.quants.dequantize(raw, Q.Q4_K))
    raw = random_blocks(Q.Q8_0, 5000)
    assert_bit_equal(dequantize(raw, Q.Q8_0), gguf.quants.dequantize(raw, Q.Q8_0).reshape(-1))


def test_dequant_float_types():
    x = RNG.standard_normal((8, 48)).astype(np.float32)
    assert_bit_equal(dequantize(x.view(np.uint8), "F32", x.shape), x)
    h = x.astype(np.float16)
    assert_bit_equal(dequantize(h.view(np.uint8), "F16", x.shape), gguf.quants.dequantize(h.view(np.uint8), Q.F16))
    b = gguf.quants.quantize(x, Q.BF16)
    assert_bit_equal(dequantize(b, Q.BF16, x.shape), gguf.quants.dequantize(b, Q.BF16))
    assert_bit_equal(dequantize(torch.from_numpy(b.copy()), Q.BF16, x.shape), gguf.quants.dequantize(b, Q.BF16))
    d = x.astype(np.float64)
    assert_bit_equal(dequantize(d.view(np.uint8), "F64", x.shape), x)


def test_dequant_q8_k_formula():
    # gguf-py has no Q8_K dequantizer: value = d (f32) * q (int8)
    n = 6
    raw = RNG.integers(0, 256, size=(n, 292), dtype=np.uint8)
    d = (RNG.standard_normal(n) * 0.01).astype(np.float32)
    raw[:, :4] = d.view(np.uint8).reshape(n, 4)
    q = raw[:, 4:260].view(np.int8).astype(np.float32)
    assert_bit_equal(dequantize(raw, "Q8_K", (n, 256)), d[:, None] * q)


def test_supported_and_unsupported_types():
    names = set(supported_types())
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= names
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS)
    with pytest.raises(CheckpointError, match="whole number"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0)
    for t, (name, bs, ts) in GGML_TYPES.items():  # our size table agrees with ggml's
        if t in {int(v) for v in Q}:
            assert gguf.GGML_QUANT_SIZES[Q(t)] == (bs, ts), name


def test_dequant_real_file_tensors_match_gguf(real_gguf):
    """One tensor of every type in the real file (token_embd: its first rows), via gguf-py's dequantizer."""
    f = read_gguf(real_gguf)
    seen = {}
    for name, info in f.tensors.items():
        seen.setdefault(info.ggml_type, name)
    assert {Q(k) for k in seen} == {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q8_0, Q.Q6_K}
    for ggml_type, name in seen.items():
        info = f.tensors[name]
        bs, ts = gguf.GGML_QUANT_SIZES[Q(ggml_type)]
        row_bytes = info.shape[-1] // bs * ts
        rows = min(info.numel // info.shape[-1], 4096)  # token_embd has 262144 rows: take the first 4096
        raw = np.array(f.raw(name)[: rows * row_bytes]).reshape(rows, row_bytes)
        ref = gguf.quants.dequantize(raw, Q(ggml_type))
        if rows == info.numel // info.shape[-1]:
            ours = f.tensor(name).reshape(rows, -1)
        else:
            ours = dequantize(raw, ggml_type, (rows, info.shape[-1]))
        assert_bit_equal(ours, ref.reshape(rows, -1))


# ------------------------------------------------------------------------------------------------
# reader: metadata, layout, errors
# ------------------------------------------------------------------------------------------------


def test_reader_metadata_all_value_types(tmp_path):
    p = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_i", [1, -2, 3])
    w.add_array("t.arr_f", [0.5, 1.5])
    w.add_array("t.arr_s", ["a", "", "ü"])
    w.add_array("t.arr_b", [True, False])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    x = np.arange(96, dtype=np.float32).reshape(3, 32)
    w.add_tensor("x", x)
    w.add_tensor("h", x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = read_gguf(p)
    md = f.metadata
    assert f.version == 3 and f.architecture == "gemma3"
    assert md["t.u8"] == 200 and md["t.i8"] == -100 and md["t.u16"] == 60000 and md["t.i16"] == -30000
    assert md["t.u32"] == 4_000_000_000 and md["t.i32"] == -2_000_000_000 and md["t.f32"] == 0.25
    assert md["t.u64"] == 2**63 + 5 and md["t.i64"] == -(2**62) and md["t.f64"] == 1 / 3
    assert md["t.bool"] is True and md["t.str"] == "héllo ✓"
    assert md["t.arr_i"] == [1, -2, 3] and md["t.arr_f"] == [0.5, 1.5] and md["t.arr_s"] == ["a", "", "ü"]
    assert md["t.arr_b"] == [True, False] and md["t.arr_nested"] == [[1, 2], [3]]
    assert f.data_offset % f.alignment == 0 and f.alignment == 32
    assert f.tensors["x"].shape == (3, 32) and f.tensors["x"].offset % 32 == 0
    assert torch.equal(f.tensor("x"), torch.from_numpy(x))
    assert torch.equal(f.tensor("h"), torch.from_numpy(x))
    # agrees with gguf's reader on every tensor's location
    for t in gguf.GGUFReader(p).tensors:
        assert f.tensors[t.name].offset == t.data_offset and f.tensors[t.name].nbytes == t.n_bytes


def test_reader_custom_alignment(tmp_path):
    p = tmp_path / "al.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    w.add_custom_alignment(64)
    a, b = np.ones(5, np.float32), np.full((2, 3), 2.0, np.float32)
    w.add_tensor("a", a)
    w.add_tensor("b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(p)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    assert f.tensors["b"].offset % 64 == 0
    assert torch.equal(f.tensor("a"), torch.ones(5)) and torch.equal(f.tensor("b"), torch.full((2, 3), 2.0))


@pytest.mark.slow
def test_real_file_header_matches_gguf_reader(real_gguf, real_reader):
    f = read_gguf(real_gguf)
    assert f.version == 3 and len(f.tensors) == 236
    assert f.metadata["gemma3.block_count"] == 18
    assert f.metadata["tokenizer.ggml.tokens"][:3] == ["<pad>", "<eos>", "<bos>"]
    assert len(f.metadata["tokenizer.ggml.scores"]) == 262144
    for t in real_reader.tensors:
        assert f.tensors[t.name].offset == t.data_offset, t.name
        assert f.tensors[t.name].nbytes == t.n_bytes, t.name
    for key, field in real_reader.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.ggml.tokens":
            continue
        ref = field.contents()
        if isinstance(ref, float) or (isinstance(ref, list) and ref and isinstance(ref[0], float)):
            np.testing.assert_array_equal(np.float32(f.metadata[key]), np.float32(ref))
        else:
            assert f.metadata[key] == ref, key


def test_truncated_copies_raise(real_gguf, tmp_path):
    data = real_gguf.read_bytes()
    # cut inside the tensor data: names the file and the first tensor that no longer fits
    cut = tmp_path / "cut_data.gguf"
    cut.write_bytes(data[: len(data) - 100_000])
    with pytest.raises(CheckpointError) as e:
        load_gguf(cut)
    msg = str(e.value)
    assert str(cut) in msg and "truncated" in msg and "tensor" in msg and "\n" not in msg
    # cut inside the header (the vocabulary)
    cut2 = tmp_path / "cut_header.gguf"
    cut2.write_bytes(data[:1_000_000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_gguf(cut2)
    assert str(cut2) in str(e.value)
    # shorter than the fixed header
    cut3 = tmp_path / "tiny.gguf"
    cut3.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_gguf(cut3)
    assert str(cut3) in str(e.value)


def test_wrong_magic_version_and_missing(tmp_path):
    p = tmp_path / "not.gguf"
    p.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(CheckpointError, match="magic") as e:
        load_gguf(p)
    assert str(p) in str(e.value)
    p2 = tmp_path / "v9.gguf"
    p2.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(56))
    with pytest.raises(CheckpointError, match="version 9") as e:
        read_gguf(p2)
    assert str(p2) in str(e.value)
    with pytest.raises(CheckpointError, match="no such") as e:
        read_gguf(tmp_path / "missing.gguf")
    assert "missing.gguf" in str(e.value)


def test_unknown_tensor_type_names_tensor_and_type(tmp_path):
    p = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    raw = RNG.integers(0, 256, size=(2, 66), dtype=np.uint8)  # 2 rows x 1 IQ2_XXS block
    w.add_tensor("weird.weight", raw, raw_shape=raw.shape, raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(p)
    assert f.tensors["weird.weight"].shape == (2, 256)
    with pytest.raises(CheckpointError) as e:
        f.tensor("weird.weight")
    msg = str(e.value)
    assert str(p) in msg and "weird.weight" in msg and "IQ2_XXS" in msg


# ------------------------------------------------------------------------------------------------
# Gemma 3 conversion on a synthetic file
# ------------------------------------------------------------------------------------------------


def test_load_tiny_gemma3(tmp_path):
    p = tmp_path / "tiny.gguf"
    written = write_tiny_gemma3(p)
    cfg, sd, tok = load_gguf(p)
    t = TINY
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"]) == (t["hidden"], t["layers"], t["heads"], t["kv"],
                                                            t["head_dim"], t["ffn"])
    assert cfg["vocab_size"] == len(TINY_TOKENS) and cfg["sliding_window"] == 16
    assert cfg["max_position_embeddings"] == 1024 and cfg["tie_word_embeddings"] is True
    assert cfg["query_pre_attn_scalar"] == t["head_dim"]
    assert cfg["rope_parameters"] == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh"

    names = {
        "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
        "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
        "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
        "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
        "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
        "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
        "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
        "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        "blk.1.ffn_gate.weight": "model.layers.1.mlp.gate_proj.weight",
        "blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj.weight",
        "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
    }
    assert len(sd) == 2 + 13 * t["layers"] and "lm_head.weight" not in sd
    for g, h in names.items():
        expect = torch.from_numpy(written[g])
        if "norm" in g:
            expect = expect - 1.0  # llama.cpp stores Gemma norms as 1 + w
        assert sd[h].dtype == torch.float32 and sd[h].shape == expect.shape, h
        assert torch.equal(sd[h], expect), h
    assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) == len(TINY_TOKENS)


def test_tiny_gemma3_metadata_variants(tmp_path):
    p = tmp_path / "v.gguf"
    write_tiny_gemma3(p, extra_kv={
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0,
        "gemma3.rope.freq_base_swa": 20000.0, "gemma3.final_logit_softcapping": 30.0,
        "gemma3.attn_logit_softcapping": 50.0, "gemma3.attention.sliding_window_pattern": [True, False],
    }, norm_types=Q.F16)
    cfg = gguf_to_hf_config(read_gguf(p))
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert cfg["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 20000.0}
    assert cfg["final_logit_softcapping"] == 30.0 and cfg["attn_logit_softcapping"] == 50.0
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    _, sd, _ = load_gguf(p)  # F16 norms dequantize too
    assert sd["model.norm.weight"].dtype == torch.float32

    p2 = tmp_path / "v2.gguf"
    write_tiny_gemma3(p2, extra_kv={"gemma3.attention.sliding_window_pattern": 2})
    assert gguf_to_hf_config(read_gguf(p2))["layer_types"] == ["sliding_attention", "full_attention"]


def test_default_layer_pattern_every_sixth_global(real_gguf):
    cfg = gguf_to_hf_config(read_gguf(real_gguf))
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]


def test_missing_tensor_and_key_raise(tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_gemma3(p, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError) as e:
        load_gguf(p)
    assert str(p) in str(e.value) and "blk.1.ffn_up.weight" in str(e.value)
    p2 = tmp_path / "k.gguf"
    write_tiny_gemma3(p2, skip_meta=("gemma3.block_count",))
    with pytest.raises(CheckpointError) as e:
        load_gguf(p2)
    assert str(p2) in str(e.value) and "gemma3.block_count" in str(e.value)


def test_wrong_architecture(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama'") as e:
        load_gguf(p)
    assert str(p) in str(e.value)


# ------------------------------------------------------------------------------------------------
# the real file vs transformers (slow: transformers dequantizes the whole file with gguf-py)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours_real(real_gguf):
    return load_gguf(real_gguf)


@pytest.mark.slow
def test_state_dict_equals_transformers(hf_gguf_model, ours_real):
    _, sd, _ = ours_real
    ref = {k: v for k, v in hf_gguf_model.state_dict().items()}
    assert set(sd) == set(ref) - {"lm_head.weight"}
    for k, v in sd.items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
        assert torch.equal(v.view(torch.int32), ref[k].view(torch.int32)), k
    # tied head
    assert torch.equal(ref["lm_head.weight"], sd["model.embed_tokens.weight"])


@pytest.mark.slow
def test_config_equals_transformers(hf_gguf_model, ours_real):
    import transformers
    cfg, _, _ = ours_real
    ref = hf_gguf_model.config.to_dict()
    mine = transformers.Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}).to_dict()
    keys = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "sliding_window", "max_position_embeddings",
            "vocab_size", "layer_types", "rope_parameters", "query_pre_attn_scalar", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping",
            "hidden_activation", "attention_bias", "use_bidirectional_attention"]
    for k in keys:
        assert mine[k] == ref[k], (k, mine[k], ref[k])
        if k in cfg:
            assert cfg[k] == ref[k], k
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    json.dumps(cfg)  # a config.json


def test_load_real_file(real_gguf, ours_real):
    cfg, sd, tok = ours_real
    assert cfg["num_hidden_layers"] == 18 and cfg["hidden_size"] == 640 and cfg["vocab_size"] == 262144
    assert sd["model.embed_tokens.weight"].shape == (262144, 640)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (1024, 640)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (256, 640)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (640, 2048)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    assert torch.isfinite(torch.stack([v.sum() for v in sd.values()])).all()  # no inf / nan anywhere
    # the norms were stored as 1 + w: after the subtraction they straddle 0 rather than 1
    assert sd["model.norm.weight"].mean().abs() < sd["model.norm.weight"].add(1).mean().abs()
    assert tok == load_gguf_tokenizer(real_gguf)
