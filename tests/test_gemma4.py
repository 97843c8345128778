"""Gemma 4 against transformers 5.23 (Gemma4ForCausalLM / Gemma4ForConditionalGeneration), tiny random configs, fp32.

Three tiny shapes mirror the released families: E2B-like (per-layer embeddings, KV sharing with a
store layer of each type, double-wide MLP on reuse layers), 31B-like (K=V full layers with fewer
global K/V heads, global head_dim != head_dim) and 26B-A4B-like (MoE block, 6 experts, top-3).
Every sequence is longer than the sliding window (6).
"""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model_like

import gemmaforge.models.gemma4.model  # noqa: F401
from gemmaforge import from_config
from gemmaforge.models.common.config import FULL, SLIDING
from gemmaforge.models.registry import preset
from gemmaforge.models.gemma4.config import Gemma4Config
from gemmaforge.errors import CheckpointError, ConfigError, InputError
from gemmaforge.layers.attention import bidirectional_group_mask
from gemmaforge.multimodal import group_ids_from_token_types
from gemmaforge.parallel.checkpointing import apply_activation_checkpointing

CASES = {
    "e2b": ("gemma-4-tiny-e2b", {}),
    "31b": ("gemma-4-tiny-31b", {}),
    "moe": ("gemma-4-tiny-moe", {}),
    "softcap": ("gemma-4-tiny-e2b", dict(final_logit_softcapping=2.0)),
    # default 5:1 pattern with the last layer forced to full; 2 shared layers (sliding, full)
    "default_pattern": ("gemma-4-tiny-e2b", dict(num_hidden_layers=8, layer_types=[], num_kv_shared_layers=2)),
}


def _model(case="e2b", **kw):
    name, over = CASES[case]
    torch.manual_seed(0)
    m = from_config(preset(name, **{**over, **kw}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:  # norms, router scales: away from identity so each one matters
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return m


def _hf(m):
    return hf_model_like(m)


# ----------------------------------------------------------------------------- logits parity

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_match_transformers(case, backend):
    m = _model(case)
    hf = _hf(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 23))
    with torch.no_grad():
        ours = m(ids, attn_backend=backend)
        ref = hf(ids, use_cache=False).logits
    assert ours.shape == ref.shape == (2, 23, m.config.vocab_size)
    assert ref.abs().max() > 1.0  # a comparison with something in it
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_flex_backend_matches_transformers():
    m = _model("e2b")
    ids = torch.randint(0, m.config.vocab_size, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attn_backend="flex"), _hf(m)(ids, use_cache=False).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["e2b", "31b", "moe"])
def test_packed_and_padded_match_transformers_per_document(case):
    m = _model(case)
    hf = _hf(m)
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (9, 1, 14)]
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
    mask = torch.tensor([[1] * 9 + [0] * 5, [0] * 13 + [1], [1] * 14])
    padded = torch.zeros(3, 14, dtype=torch.long)
    padded[0, :9], padded[1, 13:], padded[2] = docs[0], docs[1], docs[2]
    with torch.no_grad():
        packed = {b: m(torch.cat(docs), cu_seqlens=cu, attn_backend=b) for b in ("eager", "sdpa")}
        pad_out = m(padded, attention_mask=mask)
        for i, d in enumerate(docs):
            ref = hf(d[None], use_cache=False).logits[0]
            for b, out in packed.items():
                torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=0, msg=f"packed {b} doc {i}")
            torch.testing.assert_close(pad_out[i][mask[i].bool()], ref, atol=1e-4, rtol=0, msg=f"padded doc {i}")


def test_inputs_embeds_and_explicit_per_layer_inputs_equal_ids():
    m = _model("e2b")
    ids = torch.randint(0, m.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = m(ids)
        emb = m.embed(ids)
        torch.testing.assert_close(m(inputs_embeds=emb), ref, atol=0, rtol=0)  # PLE ids found from the embeddings
        P, L = m.config.hidden_size_per_layer_input, m.config.num_hidden_layers
        tok = m.model.embed_tokens_per_layer(ids).reshape(2, 11, L, P)
        torch.testing.assert_close(m(inputs_embeds=emb, per_layer_inputs=tok), ref, atol=0, rtol=0)
        near = m(inputs_embeds=emb * 1.0001, per_layer_inputs=tok)  # not table rows: fine with the token part given
        assert (near - ref).abs().max() < 0.1 * ref.abs().max()
        with pytest.raises(InputError, match="per_layer_inputs"):
            m(inputs_embeds=emb * 1.0001)


# ----------------------------------------------------------------------------- training: KV sharing

def _batch(V):
    g = torch.Generator().manual_seed(5)
    lengths = [3, 13, 1, 9]  # longer and shorter than the window
    ids = torch.randint(0, V, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def _loss_grads(m, ids, cu, backend="sdpa"):
    m.zero_grad(set_to_none=True)
    logits = m(ids, cu_seqlens=cu, attn_backend=backend)
    loss = F.cross_entropy(logits[:-1], ids[1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["e2b", "moe"])
def test_kv_sharing_gradients_equal_with_and_without_checkpointing_and_match_reference(case):
    m = _model(case).train()
    ids, cu = _batch(m.config.vocab_size)
    loss, grads = _loss_grads(m, ids, cu)
    ck = apply_activation_checkpointing(copy.deepcopy(m))
    loss_ck, grads_ck = _loss_grads(ck, ids, cu)
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() == {n for n, _ in m.named_parameters()}
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], atol=1e-6, rtol=1e-6, msg=n)
    # the reference, document by document (it cannot take a packed row), same loss over the concatenation
    hf = _hf(m).train()
    hf.zero_grad(set_to_none=True)
    logits_ref = torch.cat([hf(ids[s:e][None], use_cache=False).logits[0]
                            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    loss_ref = F.cross_entropy(logits_ref[:-1], ids[1:])
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=0)
    ref_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)


def test_store_layer_gets_gradient_from_reuse_layers(monkeypatch):
    """Cutting the reuse layers off the stored K/V changes the store layers' k_proj gradient."""
    m = _model("e2b").train()
    ids, cu = _batch(m.config.vocab_size)
    _, grads = _loss_grads(m, ids, cu)
    modes = m.config.kv_sharing_modes
    stores = [i for i, mode in enumerate(modes) if mode == "store"]
    assert len(stores) == 2 and "reuse" in modes
    for i, mode in enumerate(modes):
        attn = m.model.layers[str(i)].self_attn
        assert hasattr(attn, "k_proj") == (mode != "reuse")
    # detach what reuse layers read: the store layers' k_proj gradient must change
    import gemmaforge.models.gemma4.model as g4

    orig = g4.Gemma4State.__init__

    class _Detaching(dict):
        def __getitem__(self, key):
            return tuple(t.detach() if torch.is_tensor(t) else t for t in super().__getitem__(key))

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.kv = _Detaching()

    monkeypatch.setattr(g4.Gemma4State, "__init__", init)
    _, cut = _loss_grads(m, ids, cu)
    for i in stores:
        n = f"model.layers.{i}.self_attn.k_proj.weight"
        assert (grads[n] - cut[n]).abs().max() > 1e-3 * grads[n].abs().max(), n


_FSDP_WORKER = textwrap.dedent('''
    import copy, sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    sys.path.insert(0, sys.argv[2])
    import test_gemma4 as t
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/store", rank=0, world_size=1)
    m = t._model("e2b").train()
    ref = copy.deepcopy(m)
    mesh = init_device_mesh("cpu", (1,))
    # param_dtype set: FSDP2 maps every layer's inputs through its cast, copying dicts and dataclasses
    mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in m.model.layers.values():
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    ids, cu = t._batch(512)
    loss, grads = t._loss_grads(ref, ids, cu)
    m.zero_grad()
    out = m(ids, cu_seqlens=cu)
    loss_f = torch.nn.functional.cross_entropy(out[:-1], ids[1:])
    loss_f.backward()
    assert torch.equal(loss, loss_f.detach()), (loss, loss_f)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[n], atol=1e-6, rtol=1e-6, msg=n)
    dist.destroy_process_group()
    print("OK")
''')


def test_kv_sharing_survives_fsdp2_input_casting(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(_FSDP_WORKER)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    r = subprocess.run([sys.executable, str(script), str(tmp_path), tests_dir], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("case", ["e2b", "31b", "moe"])
def test_generation_with_kv_cache_equals_full_forward(case):
    m = _model(case)
    ids = torch.randint(0, m.config.vocab_size, (1, 17))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(32)
        steps = [m(ids[:, :7], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(7, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the reference's own cached forward agrees on the last token
        ref = _hf(m)(ids, use_cache=True).logits
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- multimodal masks

def _mm_pair(image_token=500):
    """HF Gemma4ForConditionalGeneration (text only, vision-bidirectional) and ours built from its config."""
    import transformers

    from gemmaforge.formats.hf import hf_to_ours

    text = {k: v for k, v in preset("gemma-4-tiny-31b").to_hf().items() if k not in ("architectures", "dtype")}
    text["use_bidirectional_attention"] = "vision"
    cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None,
                                    image_token_id=image_token, video_token_id=501, audio_token_id=502)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.15)
    ours_cfg = Gemma4Config.from_hf(json.loads(cfg.to_json_string()))
    assert ours_cfg.mm_token_ids == [image_token, 501, 502] and ours_cfg.use_bidirectional_attention == "vision"
    m = from_config(ours_cfg)
    sd = {hf_to_ours(k): v for k, v in hf.state_dict().items()}
    sd.pop("lm_head.weight", None)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return m, hf


def test_image_tokens_attend_bidirectionally_like_reference():
    m, hf = _mm_pair()
    ids = torch.randint(3, 400, (2, 24))
    types = torch.zeros(2, 24, dtype=torch.long)
    ids[0, 3:11], types[0, 3:11] = 500, 1  # one image of 8 tokens (longer than the window)
    ids[0, 15:18], types[0, 15:18] = 500, 1  # a second image
    ids[1, 10:14], types[1, 10:14] = 500, 1
    groups = group_ids_from_token_types(types)
    assert groups[0, 3].item() == 0 and groups[0, 15].item() == 1 and groups[0, 0].item() == -1
    with torch.no_grad():
        ref = hf(input_ids=ids, mm_token_type_ids=types, use_cache=False).logits
        for backend in ("eager", "sdpa", "flex"):
            torch.testing.assert_close(m(ids, mm_groups=groups, attn_backend=backend), ref, atol=1e-4, rtol=0,
                                       msg=backend)
        causal = m(ids)
    assert (causal[0, 3:10] - ref[0, 3:10]).abs().max() > 1e-3  # earlier image tokens see later ones
    torch.testing.assert_close(causal[0, :3], ref[0, :3], atol=1e-4, rtol=0)  # text before the image: causal


def test_image_groups_stay_inside_their_document_when_packed():
    m, hf = _mm_pair()
    g = torch.Generator().manual_seed(4)
    docs, types = [], []
    for n, (s, e) in ((12, (2, 9)), (10, (0, 4))):
        d, t = torch.randint(3, 400, (n,), generator=g), torch.zeros(n, dtype=torch.long)
        d[s:e], t[s:e] = 500, 1
        docs.append(d)
        types.append(t)
    ids, cu = torch.cat(docs), torch.tensor([0, 12, 22], dtype=torch.int32)
    # both documents' images get group id 0: the document mask must still keep them apart
    groups = torch.cat([group_ids_from_token_types(t[None])[0] for t in types])
    with torch.no_grad():
        out = m(ids, cu_seqlens=cu, mm_groups=groups)
        for i, (d, t) in enumerate(zip(docs, types)):
            ref = hf(input_ids=d[None], mm_token_type_ids=t[None], use_cache=False).logits[0]
            torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=0)


def test_group_mask_function_for_gemma3_style_use():
    """The same mask function serves Gemma 3 (every layer): doc AND (causal OR same group) AND window."""
    idx = torch.arange(8)
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    grp = torch.tensor([[-1, 0, 0, 0, -1, 0, 0, -1]])
    mod = bidirectional_group_mask(idx, idx, doc, doc, grp, grp, window=None)
    m = mod(torch.arange(1)[:, None, None, None], None, idx[None, None, :, None], idx[None, None, None, :])[0, 0]
    assert m[1, 3] and m[3, 1]  # inside the image, both ways
    assert not m[0, 1] and m[4, 1]  # text before cannot look ahead; text after sees the image
    assert not m[5, 1] and not m[1, 5] and m[5, 6] and m[6, 5]  # same group id, other document: never
    w = bidirectional_group_mask(idx, idx, doc, doc, grp, grp, window=2)
    mw = w(torch.arange(1)[:, None, None, None], None, idx[None, None, :, None], idx[None, None, None, :])[0, 0]
    assert mw[1, 3] and not mw[3, 1]  # one-sided window: later image tokens stay visible


def test_mm_groups_rejected_mid_cache():
    m, _ = _mm_pair()
    cache = m.new_cache(16)
    with torch.no_grad():
        m(torch.randint(3, 400, (1, 4)), cache=cache)
        with pytest.raises(InputError, match="first call"):
            m(torch.tensor([[500]]), cache=cache, mm_groups=torch.tensor([[0]]))


# ----------------------------------------------------------------------------- checkpoints

def _hf_moe_checkpoint(tmp_path):
    import transformers

    text = {k: v for k, v in preset("gemma-4-tiny-moe").to_hf().items() if k not in ("architectures", "dtype")}
    cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.15)
        for n, b in hf.named_buffers():
            if n.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    return hf, d


def test_missing_expert_tensor_fails_with_one_line_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from gemmaforge.formats.convert import load_any

    _, d = _hf_moe_checkpoint(tmp_path)
    sd = load_file(d / "model.safetensors")
    key = "model.language_model.layers.1.experts.down_proj"
    assert key in sd
    del sd[key]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_any(d)
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.1.experts.down_proj" in msg and "missing 1 tensor" in msg


def test_load_multimodal_hf_checkpoint_text_weights(tmp_path):
    import gemmaforge

    hf, d = _hf_moe_checkpoint(tmp_path)
    m = gemmaforge.from_pretrained(d)
    assert m.config.enable_moe_block and m.config.num_experts == 6
    ids = torch.randint(0, 512, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf(input_ids=ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_save_roundtrip_through_transformers(tmp_path):
    import transformers

    import gemmaforge
    from gemmaforge.formats.hf import save_hf

    m = _model("e2b")
    save_hf(m, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    back = gemmaforge.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, m(ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)


def test_checkpoint_with_kv_weights_on_shared_layers_loads(tmp_path):
    """Some exports keep k/v projections for KV-sharing layers; like the reference, loading ignores them."""
    from safetensors.torch import load_file, save_file

    import gemmaforge
    from gemmaforge.formats.hf import save_hf

    m = _model("e2b")
    save_hf(m, tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    sd["model.layers.6.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    sd["model.layers.6.self_attn.k_norm.weight"] = torch.ones(32)
    save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    back = gemmaforge.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)


def test_reuse_layers_own_no_kv_weights_and_names_equal_reference():
    m = _model("e2b")
    hf = _hf(m)
    ours = set(m.state_dict())
    ref = set(hf.state_dict()) - {"lm_head.weight"}
    assert ours - {"lm_head.weight"} == ref
    keys = {"model.layers.6.self_attn.k_proj.weight", "model.layers.6.self_attn.q_proj.weight",
            "model.layers.2.self_attn.v_norm.weight"}
    assert m.ignored_checkpoint_keys(keys) == {"model.layers.6.self_attn.k_proj.weight"}


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("name", ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-31b", "gemma-4-26b-a4b",
                                  "gemma-4-tiny-e2b", "gemma-4-tiny-31b", "gemma-4-tiny-moe"])
def test_presets_build_the_reference_architecture(name):
    """Same parameter shapes as transformers' model built from our config.json (meta device)."""
    import transformers

    cfg = preset(name)
    d = cfg.to_hf()
    hf_cfg = transformers.Gemma4TextConfig(**{k: v for k, v in d.items()
                                              if k not in ("architectures", "model_type", "dtype")})
    assert hf_cfg.kv_sharing_modes == cfg.kv_sharing_modes
    with torch.device("meta"):
        hf = transformers.Gemma4ForCausalLM(hf_cfg)
        ours = gemmaforge.models.gemma4.model.Gemma4ForCausalLM(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    assert our_shapes == ref_shapes
    if name == "gemma-4-e2b":
        assert cfg.kv_source(15) == 13 and cfg.kv_source(19) == 14 and cfg.mlp_size(20) == 2 * 6144


def test_config_roundtrip_through_transformers_save_format(tmp_path):
    """transformers 5.23 writes full-layer shapes as per_layer_config; we read both that and global_head_dim."""
    import transformers

    for name in ("gemma-4-tiny-31b", "gemma-4-tiny-e2b", "gemma-4-tiny-moe"):
        cfg = preset(name)
        d = cfg.to_hf()
        hf_cfg = transformers.Gemma4TextConfig(**{k: v for k, v in d.items()
                                                  if k not in ("architectures", "model_type", "dtype")})
        saved = json.loads(hf_cfg.to_json_string())
        assert "per_layer_config" in saved and "global_head_dim" not in saved
        back = Gemma4Config.from_hf(saved)
        assert back == cfg, name
        assert Gemma4Config.from_hf(d) == cfg


def test_config_errors_and_forced_full_last_layer():
    c = preset("gemma-4-tiny-31b", layer_types=[SLIDING, FULL, SLIDING, SLIDING])
    assert c.layer_types[-1] == FULL
    with pytest.raises(ConfigError, match="no earlier"):
        preset("gemma-4-tiny-e2b", layer_types=[SLIDING] * 4 + [FULL, FULL, FULL], num_kv_shared_layers=3)
    with pytest.raises(ConfigError, match="top_k_experts"):
        preset("gemma-4-tiny-moe", top_k_experts=9)
    bad = preset("gemma-4-tiny-31b").to_hf()
    bad.pop("global_head_dim")
    bad["per_layer_config"] = {"0": {"head_dim": 32}}
    with pytest.raises(ConfigError, match="per_layer_config"):
        Gemma4Config.from_hf(bad)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        Gemma4Config.from_hf({**preset("gemma-4-tiny-31b").to_hf(), "use_bidirectional_attention": "all"})

