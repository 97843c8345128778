"""Interpretability tools (gemmaforge.interp) and the ``inspect`` command, on tiny random models."""

import math

import pytest
import torch
from conftest import run_cli

from gemmaforge import from_config, interp
from gemmaforge.errors import InputError
from gemmaforge.models.registry import preset

S = 12
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny(**overrides):
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny", **overrides))
    for p in model.parameters():  # non-zero norm weights so folding has something to fold
        if p.dim() == 1:
            torch.nn.init.normal_(p, 0, 0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny(final_logit_softcapping=3.0)  # pre-softcap logit != output logit


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (1, S), generator=torch.Generator().manual_seed(3))


WORDS = "the cat sat on a mat and dog ran to big red house in morning sun".split()


def tiny_tokenizer():
    """A word-level Gemma-style tokenizer whose ids fit the tiny model's 512-token vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from gemmaforge.data.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *[f"▁{w}" for w in WORDS], "▁$"])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return Tokenizer(backend)


# ---------------------------------------------------------------------------- weights

def test_tl_weights_reproduce_the_hooks(tiny, ids):
    w = interp.TLWeights(tiny)
    L, H, Hkv, D, d, m = 4, 4, 2, 32, 64, 128
    assert w.W_E.shape == (512, d) and w.W_U.shape == (d, 512)
    assert w.W_Q.shape == (L, H, d, D) and w.W_K.shape == (L, H, d, D) and w.W_V.shape == (L, H, d, D)
    assert w.W_K_kv.shape == w.W_V_kv.shape == (L, Hkv, d, D)  # as stored: one entry per key/value head
    assert w._W_K is w.W_K_kv and w._W_V is w.W_V_kv  # HookedTransformer's names for them
    # TransformerLens' grouped-query layout: query head h reads kv head h // (H // Hkv) (repeat_interleave)
    for n in ("W_K", "W_V"):
        for h in range(H):
            assert torch.equal(getattr(w, n)[:, h], getattr(w, f"{n}_kv")[:, h // (H // Hkv)]), (n, h)
        assert torch.equal(getattr(interp, n)(tiny), getattr(w, n))
        assert torch.equal(getattr(interp, f"{n}_kv")(tiny), getattr(w, f"{n}_kv"))
    assert w.W_O.shape == (L, H, D, d)
    assert w.W_gate.shape == w.W_in.shape == (L, d, m) and w.W_out.shape == (L, m, d)
    assert not any(getattr(w, n).requires_grad for n in ("W_E", "W_U", "W_Q", "W_O", "W_out"))
    with torch.no_grad():
        logits, c = tiny.run_with_cache(ids)
        scale = torch.tensor(tiny.model.embed_tokens.scale)
        torch.testing.assert_close(c["embed"], w.W_E[ids] * scale, atol=1e-5, rtol=0)
        pre_cap = c["ln_final"] @ w.W_U
        torch.testing.assert_close(logits, torch.tanh(pre_cap / 3.0) * 3.0, atol=1e-5, rtol=0)
        for i, layer in enumerate(tiny.model.layers.values()):
            att = layer.self_attn
            q = torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_Q[i])
            torch.testing.assert_close(c["q", i], att.q_norm(q), atol=1e-5, rtol=0)
            k = torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_K_kv[i])
            torch.testing.assert_close(c["k", i], att.k_norm(k), atol=1e-5, rtol=0)
            torch.testing.assert_close(c["v", i], torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_V_kv[i]),
                                       atol=1e-5, rtol=0)
            # the repeated views pair with W_Q head by head: k/v per query head, and z = pattern @ v per head
            k_h = att.k_norm(torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_K[i]))
            torch.testing.assert_close(k_h, c["k", i].repeat_interleave(H // Hkv, dim=2), atol=1e-5, rtol=0)
            v_h = torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_V[i])
            torch.testing.assert_close(c["z", i], torch.einsum("bhqk,bkhe->bqhe", c["pattern", i], v_h),
                                       atol=1e-5, rtol=0)
            # compared after the sandwich norms (their outputs are what reaches the residual)
            o = torch.einsum("bshe,hed->bsd", c["z", i], w.W_O[i])
            torch.testing.assert_close(c["ln1_post", i], layer.post_attention_layernorm(o), atol=1e-5, rtol=0)
            torch.testing.assert_close(c["mlp_pre", i], c["ln2", i] @ w.W_gate[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(c["pre_linear", i], c["ln2", i] @ w.W_in[i], atol=1e-5, rtol=0)
            m_out = layer.post_feedforward_layernorm(c["mlp_post", i] @ w.W_out[i])
            torch.testing.assert_close(c["ln2_post", i], m_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(interp.W_Q(tiny, i), w.W_Q[i])
    # single-layer and embedding weights are views: no copy of the parameters (W_K/W_V repeat the kv heads)
    assert interp.W_Q(tiny, 0).data_ptr() == tiny.model.layers["0"].self_attn.q_proj.weight.data_ptr()
    assert interp.W_K_kv(tiny, 1).data_ptr() == tiny.model.layers["1"].self_attn.k_proj.weight.data_ptr()
    assert interp.W_V_kv(tiny, 1).data_ptr() == tiny.model.layers["1"].self_attn.v_proj.weight.data_ptr()
    assert w.W_E.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------- folding

@pytest.mark.parametrize("family", ["gemma-3-tiny", "mistral-tiny"])
def test_fold_norm_weights_leaves_logits_unchanged(family, ids):
    model = _tiny() if family == "gemma-3-tiny" else from_config(preset(family), seed=0)
    if family == "mistral-tiny":
        for n, p in model.named_parameters():
            if "norm" in n:
                torch.nn.init.normal_(p, 1.0, 0.5)
    x = ids % model.config.vocab_size
    with torch.no_grad():
        before = model(x)
        embed = model.model.embed_tokens.weight.clone()
        interp.fold_norm_weights(model)
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    identity = 0.0 if family == "gemma-3-tiny" else 1.0
    for layer in model.model.layers.values():
        assert (layer.input_layernorm.weight == identity).all()
        pre = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        assert (pre.weight == identity).all()
    assert (model.model.norm.weight == identity).all()
    torch.testing.assert_close(model.model.embed_tokens.weight, embed, atol=0, rtol=0)  # embedding untouched
    if family == "gemma-3-tiny":
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert model.config.tie_word_embeddings is False
        # the norms that cannot be folded keep their weights
        lay = model.model.layers["0"]
        assert lay.self_attn.q_norm.weight.abs().sum() > 0 and lay.post_feedforward_layernorm.weight.abs().sum() > 0


def test_fold_then_save_and_reload(tmp_path, ids):
    from gemmaforge import from_pretrained
    from gemmaforge.formats.hf import save_hf

    model = interp.fold_norm_weights(_tiny())
    save_hf(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=1e-6, rtol=0)
        # the reloaded head is untied (and on CPU a subclass of LMHead): folding goes into its columns
        interp.fold_norm_weights(again)
        torch.testing.assert_close(again(ids), model(ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- DLA

@pytest.mark.parametrize("position", [-1, 5])
def test_direct_logit_attribution_sums_to_the_logit(tiny, ids, position):
    target = 17
    d = interp.direct_logit_attribution(tiny, ids, target, position=position)
    assert d["attn"].shape == d["mlp"].shape == (4,) and d["attn_heads"].shape == (4, 4)
    total = d["embed"] + float(d["attn"].sum() + d["mlp"].sum())
    assert total == pytest.approx(d["total"], rel=1e-6, abs=1e-6)
    assert d["total"] == pytest.approx(d["logit"], rel=1e-4, abs=1e-5)
    with torch.no_grad():
        out = tiny(ids)[0, position, target].item()
    assert d["final_logit"] == pytest.approx(out, abs=1e-5)
    assert math.tanh(d["total"] / 3.0) * 3.0 == pytest.approx(out, abs=1e-5)
    torch.testing.assert_close(d["attn_heads"].sum(1), d["attn"], atol=1e-5, rtol=1e-5)
    # not a trivial split: several components matter
    assert (torch.cat([d["attn"], d["mlp"]]).abs() > 1e-3).sum() >= 4


# ---------------------------------------------------------------------------- activation patching

def _pair(ids, pos=3):
    corrupted = ids.clone()
    corrupted[0, pos] = (corrupted[0, pos] + 1) % 512
    return ids, corrupted


def test_activation_patching_recovers_the_clean_metric(tiny, ids):
    clean, corrupted = _pair(ids)

    def metric(logits):
        return (logits[0, -1, 7] - logits[0, -1, 9]).item()

    with torch.no_grad():
        m_clean, m_cor = metric(tiny(clean)), metric(tiny(corrupted))
    assert abs(m_clean - m_cor) > 1e-4
    # the two runs differ only in the embedding at position 3: patching resid_pre of layer 0 there recovers all
    r = interp.activation_patching(tiny, clean, corrupted, "resid_pre", metric, layers=[0])
    assert r.shape == (1, S)
    assert r[0, 3].item() == pytest.approx(m_clean, abs=1e-5)
    for p in range(S):
        if p != 3:
            assert r[0, p].item() == pytest.approx(m_cor, abs=1e-5)
    # resid_post of the last layer at the last position is all the last logits read
    r = interp.activation_patching(tiny, clean, corrupted, "resid_post", metric)
    assert r.shape == (4, S)
    assert r[3, S - 1].item() == pytest.approx(m_clean, abs=1e-5)
    assert r[3, :S - 1].sub(m_cor).abs().max() < 1e-5
    assert r[:, :3].sub(m_cor).abs().max() < 1e-5  # positions before the change carry nothing
    # every position at once, any layer: the clean run
    r = interp.activation_patching(tiny, clean, corrupted, "resid_mid", metric, positions="all")
    assert r.shape == (4,)
    assert r.sub(m_clean).abs().max() < 1e-5


def test_activation_patching_per_head_z(tiny, ids):
    clean, corrupted = _pair(ids)

    def metric(logits):
        return logits[0, -1].log_softmax(-1)[11].item()

    r = interp.activation_patching(tiny, clean, corrupted, "z", metric, positions="all")
    assert r.shape == (4, 4)
    one = interp.activation_patching(tiny, clean, corrupted, "z", metric, positions="all", batch_size=1)
    torch.testing.assert_close(r, one, atol=1e-5, rtol=0)  # batching the sites changes nothing
    # one entry by hand: layer 1, head 2, every position
    with torch.no_grad():
        _, cache = tiny.run_with_cache(clean, names_filter=["blocks.1.attn.hook_z"])

        def put(z, hook):
            z = z.clone()
            z[:, :, 2] = cache["z", 1][:, :, 2]
            return z

        manual = metric(tiny.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_z", put)]))
    assert r[1, 2].item() == pytest.approx(manual, abs=1e-5)
    assert r.std() > 1e-4  # heads differ
    per_pos = interp.activation_patching(tiny, clean, corrupted, "z", metric, layers=[3], positions=[S - 1, 3])
    assert per_pos.shape == (1, 2, 4)
    with pytest.raises(Exception, match="same shape"):
        interp.activation_patching(tiny, clean, corrupted[:, :-1], "z", metric)


# ---------------------------------------------------------------------------- logit lens

def test_logit_lens_last_layer_is_the_models_log_softmax(tiny, ids):
    lens = interp.logit_lens(tiny, ids, k=5, return_logprobs=True)
    assert lens.labels == ["embed", "0", "1", "2", "3"]
    assert lens.top_ids.shape == lens.top_probs.shape == (5, 1, S, 5)
    assert lens.logprobs.shape == (5, 1, S, 512)
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(ids)
        torch.testing.assert_close(lens.logprobs[-1], torch.log_softmax(logits, -1), atol=1e-5, rtol=0)
        emb = torch.log_softmax(tiny.logits(tiny.model.norm(cache["embed"])), -1)
        torch.testing.assert_close(lens.logprobs[0], emb, atol=1e-5, rtol=0)
    p, i = lens.logprobs.topk(5, dim=-1)
    torch.testing.assert_close(lens.top_probs, p.exp())
    assert torch.equal(lens.top_ids, i)
    assert not torch.allclose(lens.logprobs[1], lens.logprobs[-1])
    one_d = interp.logit_lens(tiny, ids[0], k=2)
    assert one_d.top_ids.shape == (5, S, 2)


# ---------------------------------------------------------------------------- pictures and the CLI

def test_heatmaps_and_logit_lens_table(tiny, tmp_path):
    tok = tiny_tokenizer()
    prompt = "the cat sat on a $ mat"
    paths = interp.attention_heatmaps(tiny, tok, prompt, tmp_path)
    assert [p.name for p in paths] == [f"attn_layer_{i:02d}.png" for i in range(4)]
    assert all(p.read_bytes()[:8] == PNG and p.stat().st_size > 5000 for p in paths)
    assert [p.name for p in interp.attention_heatmaps(tiny, tok, prompt, tmp_path / "b", max_layers=1)] == [
        "attn_layer_00.png"]
    png, txt = interp.logit_lens_table(tiny, tok, prompt, tmp_path, k=3)
    assert png.read_bytes()[:8] == PNG
    text = txt.read_text()
    assert "position 7" in text and "' mat'" in text and text.count("layer 3") == 8
    assert interp.token_labels(tok, tok.encode("the cat")) == ["<bos>", " the", " cat"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from gemmaforge.formats.hf import save_hf

    d = tmp_path_factory.mktemp("tiny_inspect") / "model"
    save_hf(_tiny(), d, tokenizer=tiny_tokenizer())
    return d


def test_inspect_command_writes_pngs(tiny_dir, tmp_path):
    out = tmp_path / "inspect"
    r = run_cli("inspect", "--model", str(tiny_dir), "--prompt", "the big red dog ran", "--out", str(out))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"attn_layer_{i:02d}.png" for i in range(4)] + ["logit_lens.png", "logit_lens.txt"]
    assert all((out / n).read_bytes()[:8] == PNG for n in names if n.endswith(".png"))
    assert "position 5  input ' ran'" in (out / "logit_lens.txt").read_text()
    assert r.stdout.split() == [str(out / n) for n in names[:-2] + ["logit_lens.png", "logit_lens.txt"]]
    assert "wrote 6 files" in r.stderr


def test_inspect_command_errors_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli("inspect", "--prompt", "the cat", "--out", str(f))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"gemmaforge: error: {f}: exists and is not a directory"


def test_tl_weights_include_an_unmerged_lora_adapter(tiny, ids):
    """W_Q .. W_out are the weights the projections apply: an unmerged adapter is folded in."""
    import copy

    from gemmaforge.adapters.lora import LoraConfig, apply_lora, lora_modules

    model = copy.deepcopy(tiny).eval()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))  # all seven projections
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
        _, c = model.run_with_cache(ids)
    w = interp.TLWeights(model)
    for i, layer in enumerate(model.model.layers.values()):
        att = layer.self_attn
        q = torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_Q[i])
        torch.testing.assert_close(c["q", i], att.q_norm(q), atol=1e-5, rtol=0)
        torch.testing.assert_close(c["v", i], torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_V_kv[i]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(c["k", i], att.k_norm(torch.einsum("bsd,hde->bshe", c["ln1", i], w.W_K_kv[i])),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(w.W_V[i], w.W_V_kv[i].repeat_interleave(2, dim=0))
        o = torch.einsum("bshe,hed->bsd", c["z", i], w.W_O[i])
        torch.testing.assert_close(c["ln1_post", i], layer.post_attention_layernorm(o), atol=1e-5, rtol=0)
        m_out = layer.post_feedforward_layernorm(c["mlp_post", i] @ w.W_out[i])
        torch.testing.assert_close(c["ln2_post", i], m_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(c["mlp_pre", i], c["ln2", i] @ w.W_gate[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(interp.W_O(model, i), w.W_O[i])


# ---------------------------------------------------------------------------- Gemma 4: per-layer shapes

GEMMA4 = ["gemma-4-tiny-e2b", "gemma-4-tiny-31b", "gemma-4-tiny-moe"]


def _gemma4(name):
    """A tiny Gemma 4 with random 1-D weights around Gemma 4's identity (norms ``rms(x) * w``: w = 1),
    so q/k norms and every foldable norm do something."""
    model = from_config(preset(name), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=GEMMA4)
def gemma4(request):
    return request.param, _gemma4(request.param)


def test_gemma4_weight_views_have_each_layers_shape(gemma4):
    name, model = gemma4
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.hidden_size
    w = interp.TLWeights(model)
    n = cfg.num_hidden_layers
    for i, layer in enumerate(model.model.layers.values()):
        D, src = cfg.layer_head_dim(i), cfg.kv_source(i)
        assert interp.W_Q(model, i).shape == (H, d, D)
        assert interp.W_K_kv(model, i).shape == interp.W_V_kv(model, i).shape == (cfg.kv_heads(src), d, D)
        # TransformerLens' shape: the source layer's kv heads repeated to this layer's query heads
        assert interp.W_K(model, i).shape == interp.W_V(model, i).shape == (H, d, D)
        g = H // cfg.kv_heads(src)
        for f in ("W_K", "W_V"):
            kv = getattr(interp, f"{f}_kv")(model, i)
            assert torch.equal(getattr(interp, f)(model, i), kv.repeat_interleave(g, dim=0))
        assert interp.W_O(model, i).shape == (H, D, d)
        m = cfg.mlp_size(i)
        assert interp.W_gate(model, i).shape == interp.W_in(model, i).shape == (d, m)
        assert interp.W_out(model, i).shape == (m, d)
        for f in ("W_Q", "W_K", "W_V", "W_K_kv", "W_V_kv", "W_O", "W_gate", "W_in", "W_out"):
            one = getattr(interp, f)(model, i)
            assert torch.equal(getattr(w, f)[i], one)
            assert torch.equal(getattr(interp, f)(model, i - n), one)  # negative layer index
        if cfg.kv_sharing_modes[i] == "reuse":  # no k/v weights: the source layer's, the very same tensors
            assert not hasattr(layer.self_attn, "k_proj") and src != i
            for f in (interp.W_K, interp.W_V):
                assert torch.equal(f(model, i), f(model, src))
            for f in (interp.W_K_kv, interp.W_V_kv):
                assert torch.equal(f(model, i), f(model, src))
                assert f(model, i).data_ptr() == f(model, src).data_ptr()
        else:
            assert src == i
            k_proj = layer.self_attn.k_proj.weight
            assert interp.W_K_kv(model, i).data_ptr() == k_proj.data_ptr()  # a view, as on Gemma 3
        if cfg.k_eq_v(src):  # V is the raw k_proj output: W_V is W_K
            assert src != i or layer.self_attn.v_proj is None
            assert interp.W_V_kv(model, i).data_ptr() == interp.W_K_kv(model, i).data_ptr()
            assert torch.equal(interp.W_V(model, i), interp.W_K(model, i))
        else:
            assert not torch.equal(interp.W_V(model, i), interp.W_K(model, i))
            assert not torch.equal(interp.W_V_kv(model, i), interp.W_K_kv(model, i))
    # full and sliding attention layers differ: asking for the stack says so, in one line
    for f in ("W_Q", "W_K", "W_V", "W_K_kv", "W_V_kv", "W_O"):
        with pytest.raises(InputError, match="different shapes") as e:
            getattr(interp, f)(model)
        assert "\n" not in str(e.value) and f"interp.{f}(model, layer=i)" in str(e.value)
        assert isinstance(getattr(w, f), interp.weights.PerLayer) and len(getattr(w, f)) == n
    assert torch.equal(w.W_Q[2, 1], interp.W_Q(model, 2)[1])  # the list indexes like the stack
    if cfg.use_double_wide_mlp:  # double-wide MLP on the KV-sharing layers
        with pytest.raises(InputError, match="different shapes"):
            interp.W_gate(model)
        assert isinstance(w.W_out, interp.weights.PerLayer)
    else:  # same MLP everywhere: the stack
        assert interp.W_gate(model).shape == w.W_gate.shape == (n, d, cfg.intermediate_size)
    with pytest.raises(InputError, match="out of range"):
        interp.W_Q(model, n)
    if name == "gemma-4-tiny-e2b":
        assert "reuse" in cfg.kv_sharing_modes
    else:
        assert any(cfg.k_eq_v(i) for i in range(n))


def test_gemma4_weight_views_reproduce_the_hooks(gemma4):
    """Each view is what the model computes with: q/k/v hooks (k/v only on layers that compute keys),
    the attention output, the dense MLP's pre-activations and output."""
    _, model = gemma4
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(4))
    dense_out = {}
    handles = [layer.mlp.register_forward_hook(lambda mod, args, out, i=i: dense_out.__setitem__(i, out))
               for i, layer in enumerate(model.model.layers.values())]
    try:
        with torch.no_grad():
            _, c = model.run_with_cache(ids)
    finally:
        for h in handles:
            h.remove()

    def heads(x, W):
        return torch.einsum("bsd,hde->bshe", x, W)

    for i, layer in enumerate(model.model.layers.values()):
        att, src = layer.self_attn, cfg.kv_source(i)
        torch.testing.assert_close(c["q", i], att.q_norm(heads(c["ln1", i], interp.W_Q(model, i))), atol=1e-5, rtol=0)
        # the keys/values layer i attends to: its source layer's (itself unless KV-sharing), from the source's ln1
        s_att = model.model.layers[str(src)].self_attn
        torch.testing.assert_close(c["k", src], s_att.k_norm(heads(c["ln1", src], interp.W_K_kv(model, i))),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(c["v", src], s_att.v_norm(heads(c["ln1", src], interp.W_V_kv(model, i))),
                                   atol=1e-5, rtol=0)
        # the repeated views, one per query head: z = pattern @ v_norm(ln1_src @ W_V) head by head
        v_h = s_att.v_norm(heads(c["ln1", src], interp.W_V(model, i)))
        torch.testing.assert_close(c["z", i], torch.einsum("bhqk,bkhe->bqhe", c["pattern", i], v_h),
                                   atol=1e-5, rtol=0)
        o = torch.einsum("bshe,hed->bsd", c["z", i], interp.W_O(model, i))
        torch.testing.assert_close(c["ln1_post", i], layer.post_attention_layernorm(o), atol=1e-5, rtol=0)
        torch.testing.assert_close(c["mlp_pre", i], c["ln2", i] @ interp.W_gate(model, i), atol=1e-5, rtol=0)
        torch.testing.assert_close(c["pre_linear", i], c["ln2", i] @ interp.W_in(model, i), atol=1e-5, rtol=0)
        m = c["mlp_post", i] @ interp.W_out(model, i)
        torch.testing.assert_close(dense_out[i], m, atol=1e-5, rtol=0)
        if not layer.moe:  # MoE layers add the experts before the post-norm
            torch.testing.assert_close(c["ln2_post", i], layer.post_feedforward_layernorm(m), atol=1e-5, rtol=0)
    reuse = [i for i, mode in enumerate(cfg.kv_sharing_modes) if mode == "reuse"]
    for i in reuse:  # a KV-sharing layer computes no keys: no k/v hook points
        with pytest.raises(KeyError):
            c["k", i]


@pytest.mark.parametrize("name", GEMMA4)
def test_fold_norm_weights_leaves_gemma4_logits_unchanged(name):
    model = _gemma4(name)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(5))
    layers = list(model.model.layers.values())
    with torch.no_grad():
        before = model(x)
        embed = model.model.embed_tokens.weight.clone()
        kept = {n: p.clone() for n, p in model.named_parameters()
                if any(k in n for k in ("q_norm", "k_norm", "post_", "router", "per_layer_projection_norm"))}
        interp.fold_norm_weights(model)
        after = model(x)
    assert before.abs().max() > 0.1
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    for i, layer in enumerate(layers):
        assert (layer.input_layernorm.weight == 1).all() and (layer.pre_feedforward_layernorm.weight == 1).all()
        if layer.moe:
            assert (layer.pre_feedforward_layernorm_2.weight == 1).all()
    assert (model.model.norm.weight == 1).all()
    torch.testing.assert_close(model.model.embed_tokens.weight, embed, atol=0, rtol=0)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False and cfg.tie_word_embeddings  # a new config, the old untouched
    for n, p in model.named_parameters():  # the norms that cannot be folded keep their weights
        if n in kept:
            assert torch.equal(p, kept[n]), n
    assert kept and not all((p == 1).all() for p in kept.values())


def test_fold_refuses_lora_and_leaves_the_model_as_it_was(tiny):
    import copy

    from gemmaforge.adapters.lora import LoraConfig, apply_lora

    model = copy.deepcopy(tiny)
    apply_lora(model, LoraConfig(rank=2, targets=["v_proj"]))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="merge LoRA adapters first"):
        interp.fold_norm_weights(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_direct_logit_attribution_refuses_what_it_cannot_decompose():
    """Gemma 4 with per-layer inputs adds to the residual outside attention and the MLP: one clear
    line instead of components that do not sum to the logit; the MoE preset (experts inside the MLP
    output) decomposes exactly."""
    ids = torch.tensor([[1, 5, 7, 9]])
    with pytest.raises(InputError, match="layer 0 changes the residual outside attention and the MLP"):
        interp.direct_logit_attribution(from_config("gemma-4-tiny-e2b", seed=0), ids, 3)
    d = interp.direct_logit_attribution(from_config("gemma-4-tiny-moe", seed=0), ids, 3)
    assert abs(d["total"] - d["logit"]) <= 1e-5 * max(1.0, abs(d["logit"]))
