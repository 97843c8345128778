"""Hook points (transforms/hooks.py): values against transformers, RoPE, replacement, ablation, masks, errors."""


import pytest
import torch
from conftest import hf_model_like

from gemmaforge import from_config
from gemmaforge.models.common.config import FULL, SLIDING
from gemmaforge.models.registry import preset
from gemmaforge.layers.rope import rope_table
from gemmaforge.models.common.hooks import ActivationCache, act_name, hook_names

S = 20  # longer than the tiny sliding window (8): sliding and full layers see different keys


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = from_config(preset("gemma-3-tiny"))
    for p in model.parameters():  # non-zero norm weights so every (1 + w) matters
        if p.dim() == 1:
            torch.nn.init.normal_(p, 0, 0.5)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, S), generator=torch.Generator().manual_seed(1))


def _check_against_transformers(model, hf, ids, atol):
    """resid_post / ln_final / pattern / logits of ours vs transformers (eager attention)."""
    L = model.config.num_hidden_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
        ref = hf(ids, use_cache=False, output_hidden_states=True, output_attentions=True)
    assert len(ref.hidden_states) == L + 1 and len(ref.attentions) == L
    torch.testing.assert_close(cache["embed"], ref.hidden_states[0], atol=atol, rtol=1e-5)
    for i in range(L - 1):
        torch.testing.assert_close(cache["resid_post", i], ref.hidden_states[i + 1], atol=atol, rtol=1e-5,
                                   msg=lambda m, i=i: f"resid_post {i}: {m}")
    # transformers' last hidden state is after the final norm
    torch.testing.assert_close(cache["ln_final"], ref.hidden_states[-1], atol=atol, rtol=1e-5)
    for i in range(L):
        torch.testing.assert_close(cache["pattern", i], ref.attentions[i], atol=1e-5, rtol=0,
                                   msg=lambda m, i=i: f"pattern {i} ({model.config.layer_types[i]}): {m}")
    return logits, ref.logits, cache


def _window_is_real(model, cache, q):
    """At query q beyond the window, sliding layers put zero weight on key 0, full layers do not."""
    w = model.config.sliding_window
    assert q >= w
    for i, t in enumerate(model.config.layer_types):
        p = cache["pattern", i][..., q, :]
        if t == SLIDING:
            assert (p[..., : q - w + 1] == 0).all(), i
            assert (p[..., q - w + 1: q + 1] > 0).all(), i
        else:
            assert (p[..., : q + 1] > 0).all(), i
        assert (p[..., q + 1:] == 0).all()


def test_cache_matches_transformers_tiny(tiny, ids):
    hf = hf_model_like(tiny)
    logits, ref_logits, cache = _check_against_transformers(tiny, hf, ids, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert set(tiny.config.layer_types) == {SLIDING, FULL}
    _window_is_real(tiny, cache, S - 1)


def test_cache_does_not_change_logits_and_covers_every_hook_point(tiny, ids):
    with torch.no_grad():
        plain = tiny(ids)
        logits, cache = tiny.run_with_cache(ids)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=0)  # pattern hooks switch to eager
    assert set(cache) == set(hook_names(tiny))
    assert isinstance(cache, ActivationCache)
    assert cache["resid_post", 2] is cache["blocks.2.hook_resid_post"]
    torch.testing.assert_close(cache["logits"], logits)
    assert cache.stack("resid_post").shape == (4, 2, S, 64)


def test_shapes(tiny, ids):
    B = ids.shape[0]
    H, Hkv, D, d = 4, 2, 32, 64
    with torch.no_grad():
        _, cache = tiny.run_with_cache(ids, include_opt_in=True)
    want = {
        "attn.hook_q": (B, S, H, D), "attn.hook_k": (B, S, Hkv, D), "attn.hook_v": (B, S, Hkv, D),
        "attn.hook_rot_q": (B, S, H, D), "attn.hook_rot_k": (B, S, Hkv, D), "attn.hook_z": (B, S, H, D),
        "attn.hook_attn_scores": (B, H, S, S), "attn.hook_pattern": (B, H, S, S),
        "attn.hook_result": (B, S, H, d), "hook_resid_pre": (B, S, d), "hook_resid_mid": (B, S, d),
        "hook_resid_post": (B, S, d), "hook_attn_out": (B, S, d), "hook_mlp_out": (B, S, d),
        "mlp.hook_pre": (B, S, 128), "mlp.hook_pre_linear": (B, S, 128), "mlp.hook_post": (B, S, 128),
        "ln1.hook_normalized": (B, S, d), "ln2.hook_normalized": (B, S, d),
        "ln1_post.hook_normalized": (B, S, d), "ln2_post.hook_normalized": (B, S, d),
    }
    for i in range(4):
        for n, shape in want.items():
            assert tuple(cache[f"blocks.{i}.{n}"].shape) == shape, (i, n)
        # the opt-in per-head outputs sum to o_proj's output (what the post-attention norm reads; compared after
        # that norm, whose output is what reaches the residual whichever side of it hook_attn_out sits)
        post = tiny.model.layers[str(i)].post_attention_layernorm
        torch.testing.assert_close(post(cache["result", i].sum(2)), cache["ln1_post", i], atol=1e-5, rtol=0)
        # rows of the pattern sum to 1
        torch.testing.assert_close(cache["pattern", i].sum(-1), torch.ones(B, H, S), atol=1e-5, rtol=0)
        # z is the pattern applied to v (kv head h // 2 for query head h)
        v = cache["v", i].repeat_interleave(H // Hkv, dim=2)
        z = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", i], v)
        torch.testing.assert_close(cache["z", i], z, atol=1e-5, rtol=0)
    assert tuple(cache["embed"].shape) == (B, S, d)
    assert tuple(cache["ln_final"].shape) == (B, S, d)


def _rope(x, cos, sin):
    """Independent RoPE: x [B, S, H, D], cos/sin [B, S, D]; rotate_half written out."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


@pytest.mark.parametrize("packed", [False, True])
def test_rot_q_k_are_rope_of_q_k_with_the_layer_types_own_table(tiny, ids, packed):
    cfg = tiny.config
    if packed:
        x, cu = ids[0], torch.tensor([0, 7, 15, S])
        positions = torch.cat([torch.arange(7), torch.arange(8), torch.arange(5)])[None]
        kwargs = dict(cu_seqlens=cu)
    else:
        x, kwargs = ids, {}
        positions = torch.arange(S)[None].expand(ids.shape[0], S)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(x, **kwargs)
    tables = {t: rope_table(spec, cfg.head_dim, positions, torch.float32) for t, spec in cfg.rope.items()}
    assert cfg.rope[SLIDING] != cfg.rope[FULL]
    for i, t in enumerate(cfg.layer_types):
        other = FULL if t == SLIDING else SLIDING
        for n in ("q", "k"):
            x_, rot = cache[n, i], cache[f"rot_{n}", i]
            torch.testing.assert_close(rot, _rope(x_, *tables[t]), atol=1e-5, rtol=0,
                                       msg=lambda m, i=i, n=n: f"layer {i} rot_{n}: {m}")
            # the other type's table gives something else: each layer really uses its own
            assert (rot - _rope(x_, *tables[other])).abs().max() > 1e-2, (i, n)


def test_replacing_resid_post_reproduces_the_other_prompts_logits(tiny):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 512, (1, S), generator=g), torch.randint(0, 512, (1, S), generator=g)
    with torch.no_grad():
        logits_b, cache_b = tiny.run_with_cache(b, names_filter=lambda n: n.endswith("hook_resid_post"))
        logits_a = tiny(a)
        assert (logits_a - logits_b).abs().max() > 1e-2
        for i in range(4):
            name = act_name("resid_post", i)
            out = tiny.run_with_hooks(a, fwd_hooks=[(name, lambda t, hook: cache_b[hook.name])])
            torch.testing.assert_close(out, logits_b, atol=1e-6, rtol=0, msg=lambda m, i=i: f"layer {i}: {m}")


def test_zero_ablating_one_head_z(tiny, ids):
    layer, head = 2, 1
    lay = tiny.model.layers[str(layer)]
    D = tiny.config.head_dim

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        _, clean = tiny.run_with_cache(ids)
        ablated = ActivationCache()
        with tiny.hooks(fwd_hooks=[(act_name("z", layer), ablate)], cache=ablated):
            logits = tiny(ids)
        # earlier layers and everything of this layer before z are untouched
        for n in clean:
            i = int(n.split(".")[1]) if n.startswith("blocks.") else None
            if n == "hook_embed" or (i is not None and i < layer) or (
                    i == layer and n.split(".", 2)[2] in ("hook_resid_pre", "attn.hook_q", "attn.hook_k",
                                                          "attn.hook_v", "attn.hook_pattern")):
                torch.testing.assert_close(ablated[n], clean[n], atol=0, rtol=0, msg=n)
        z = ablated["z", layer]
        assert (z[:, :, head] == 0).all()
        others = [h for h in range(4) if h != head]
        torch.testing.assert_close(z[:, :, others], clean["z", layer][:, :, others], atol=0, rtol=0)
        # manual: this head's slice of o_proj's input zeroed, then the rest of the block by hand
        flat = clean["z", layer].reshape(*ids.shape, -1).clone()
        flat[..., head * D:(head + 1) * D] = 0
        attn_out = lay.post_attention_layernorm(lay.self_attn.o_proj(flat))
        torch.testing.assert_close(ablated["ln1_post", layer], attn_out, atol=1e-6, rtol=0)
        mid = clean["resid_pre", layer] + attn_out
        post = mid + lay.post_feedforward_layernorm(lay.mlp(lay.pre_feedforward_layernorm(mid)))
        torch.testing.assert_close(ablated["resid_post", layer], post, atol=1e-5, rtol=0)
        assert (post - clean["resid_post", layer]).abs().max() > 1e-3  # the ablation did something
        # and the rest of the network from that residual gives the ablated logits
        rest = tiny.run_with_hooks(ids, fwd_hooks=[(act_name("resid_post", layer), lambda t, hook: post)])
        torch.testing.assert_close(logits, rest, atol=1e-5, rtol=0)


def test_packed_documents_never_attend_across(tiny, ids):
    x, cu = ids[0], torch.tensor([0, 7, 15, S])
    doc = torch.repeat_interleave(torch.arange(3), cu[1:] - cu[:-1])
    with torch.no_grad():
        _, cache = tiny.run_with_cache(x, cu_seqlens=cu)
        _, alone = tiny.run_with_cache(x[7:15][None])  # document 1 on its own
    cross = doc[:, None] != doc[None, :]
    for i in range(4):
        p = cache["pattern", i][0]  # [H, T, T]
        assert (p[:, cross] == 0).all(), i
        assert p[:, ~cross].sum() > 0
        torch.testing.assert_close(p[:, 7:15, 7:15], alone["pattern", i][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(cache["resid_post", i][0, 7:15], alone["resid_post", i][0], atol=1e-5, rtol=0)


def test_wrong_shape_unknown_name_and_hooks_are_removed(tiny, ids):
    with torch.no_grad():
        fresh = tiny(ids)
        with pytest.raises(ValueError, match="blocks.1.hook_resid_post.*shape"):
            tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t[:, :-1])])
        assert getattr(tiny, "_active_hooks", None) is None  # removed even after the error
        with pytest.raises(KeyError, match="blocks.1.hook_nonsense"):
            tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_nonsense", lambda t, hook: None)])
        with pytest.raises(KeyError, match="blocks.9.hook_resid_post"):
            tiny.run_with_hooks(ids, fwd_hooks=[("blocks.9.hook_resid_post", lambda t, hook: None)])
        with pytest.raises(KeyError, match="blocks.0.attn.hook_nope"):
            tiny.run_with_cache(ids, names_filter=["blocks.0.attn.hook_nope"])
        seen = []
        noisy = tiny.run_with_hooks(ids, fwd_hooks=[
            ("blocks.0.hook_resid_post", lambda t, hook: t + 1.0),
            (lambda n: n.endswith("hook_pattern"), lambda t, hook: seen.append(hook.name)),
        ])
        assert (noisy - fresh).abs().max() > 1e-3
        assert seen == [f"blocks.{i}.attn.hook_pattern" for i in range(4)]
        assert getattr(tiny, "_active_hooks", None) is None
        after = tiny(ids)
    torch.testing.assert_close(after, fresh, atol=0, rtol=0)
    assert seen == [f"blocks.{i}.attn.hook_pattern" for i in range(4)]  # nothing fired during the plain run


# ---------------------------------------------------------------------------- the real 270M

@pytest.fixture(scope="module")
def real():
    import gemmaforge

    model = gemmaforge.from_pretrained("gemma-3-270m")
    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    return model, tok, hf_model_like(model)


@pytest.mark.slow
def test_cache_matches_transformers_real_270m(real):
    model, tok, hf = real
    text = "The quick brown fox jumps over the lazy dog. " * 60
    ids = torch.tensor([tok.encode(text)[:530]])  # past the 512-token window: sliding layers cut keys
    assert ids.shape[1] == 530
    L = model.config.num_hidden_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_resid_post", "hook_pattern",
                                                                                   "ln_final.hook_normalized")),
                                        return_hidden=True)
        ref = hf.model(ids, use_cache=False, output_hidden_states=True, output_attentions=True)
    for i in range(L - 1):
        torch.testing.assert_close(cache["resid_post", i], ref.hidden_states[i + 1], atol=1e-4, rtol=1e-5,
                                   msg=lambda m, i=i: f"resid_post {i}: {m}")
    torch.testing.assert_close(cache["ln_final"], ref.hidden_states[-1], atol=1e-4, rtol=1e-5)
    for i in range(L):
        torch.testing.assert_close(cache["pattern", i], ref.attentions[i], atol=1e-5, rtol=0,
                                   msg=lambda m, i=i: f"pattern {i} ({model.config.layer_types[i]}): {m}")
    assert {SLIDING, FULL} == set(model.config.layer_types)
    _window_is_real(model, cache, 529)


@pytest.mark.slow
def test_rot_q_k_real_270m(real):
    model, tok, _ = real
    ids = torch.tensor([tok.encode("Rotary tables differ between sliding and full layers.")])
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: ".attn.hook_" in n and n.endswith(("q", "k")))
    cfg = model.config
    pos = torch.arange(ids.shape[1])[None]
    tables = {t: rope_table(spec, cfg.head_dim, pos, torch.float32) for t, spec in cfg.rope.items()}
    for i, t in enumerate(cfg.layer_types):
        other = FULL if t == SLIDING else SLIDING
        for n in ("q", "k"):
            torch.testing.assert_close(cache[f"rot_{n}", i], _rope(cache[n, i], *tables[t]), atol=1e-4, rtol=1e-5)
            assert (cache[f"rot_{n}", i] - _rope(cache[n, i], *tables[other])).abs().max() > 1e-2


# ---------------------------------------------------------------------------- TransformerLens
#
# TransformerLens 4 (the dev extra pins it) wraps the transformers model in a TransformerBridge with
# the same hook names. Its unprocessed bridge (no enable_compatibility_mode: nothing folded or
# centred, as ours) is compared hook by hook; where its conventions differ, after the transformation
# written next to the comparison (and in models/common/hooks.py).

def _transformer_bridge_class():
    from transformer_lens.model_bridge import TransformerBridge  # the dev extra pins it: missing fails

    return TransformerBridge


# hooks whose value and shape are TransformerLens' own (q/k/v/z/rot_q/rot_k [batch, pos, head, d_head]
# with the key/value heads not repeated, as in its bridge)
SAME_AS_TL = [
    "hook_resid_pre", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post",
]
NORMS = ["ln1", "ln1_post", "ln2", "ln2_post"]


def _compare_with_transformer_lens(model, bridge, ids, atol):
    """Every per-layer hook point of ours (and embed, ln_final, logits) against the bridge's."""
    with torch.no_grad():
        tl_logits, tl = bridge.run_with_cache(ids)
        logits, ours = model.run_with_cache(ids)
    close = dict(atol=atol, rtol=1e-5)
    torch.testing.assert_close(logits, tl_logits, **close)
    torch.testing.assert_close(ours["hook_embed"], tl["hook_embed"], atol=0, rtol=0)
    for i, layer in enumerate(model.model.layers.values()):
        def at(n, i=i):
            return f"blocks.{i}.{n}"

        compared = set()

        def check(a, b, n, tol=close):
            compared.add(n)
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{n} ({model.config.layer_types[i]}): {m}")

        for n in SAME_AS_TL:
            check(ours[at(n)], tl[at(n)], at(n), dict(atol=1e-5, rtol=0) if n.endswith("pattern") else close)
        check(ours[at("hook_attn_in")], tl[at("ln1.hook_in")], at("hook_attn_in"))  # the residual ln1 reads
        att = layer.self_attn
        for n in ("q", "k"):
            # ours: after the per-head q/k norm (what RoPE reads); TL's hook_q/hook_k are the raw projection
            # and hook_q_normed/hook_k_normed [batch, head, pos, d_head] the normed value
            check(ours[n, i], tl[at(f"attn.hook_{n}_normed")].transpose(1, 2), at(f"attn.hook_{n}"))
            check(ours[n, i], getattr(att, f"{n}_norm")(tl[at(f"attn.hook_{n}")]), at(f"attn.hook_{n}"))
        # scores: the same where a key is visible; masked keys are -inf in ours, finfo.min in TL's
        s, s_tl = ours["attn_scores", i], tl[at("attn.hook_attn_scores")]
        seen = torch.isfinite(s)
        assert not seen.all() and (s[~seen] == -torch.inf).all(), i
        check(s[seen], s_tl[seen], at("attn.hook_attn_scores"))
        assert (s_tl[~seen] < -1e30).all(), i
        for ln in NORMS:
            # ours: the norm's output, rms(x) * (1 + w); TL's hook_normalized is rms(x) before the weight,
            # its hook_out the output
            norm = {"ln1": layer.input_layernorm, "ln1_post": layer.post_attention_layernorm,
                    "ln2": layer.pre_feedforward_layernorm, "ln2_post": layer.post_feedforward_layernorm}[ln]
            mine = ours[at(f"{ln}.hook_normalized")]
            check(mine, tl[at(f"{ln}.hook_out")], at(f"{ln}.hook_normalized"))
            check(mine, tl[at(f"{ln}.hook_normalized")] * norm.scale(), at(f"{ln}.hook_normalized"))
        assert compared == {k for k in ours if k.startswith(f"blocks.{i}.")}  # every hook point of the layer
    torch.testing.assert_close(ours["ln_final"], tl["ln_final.hook_out"], **close)
    torch.testing.assert_close(ours["ln_final"], tl["ln_final.hook_normalized"] * model.model.norm.scale(), **close)


def _compare_weights_with_transformer_lens(model, bridge):
    """Ours are TransformerLens' weights, shape and value: W_K/W_V repeated to the query heads (its
    HookedTransformer's layout; TransformerLens 4's bridge.W_K is the stored kv form, our W_K_kv)."""
    from gemmaforge import interp

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    to_q_heads = [h // (H // Hkv) for h in range(H)]
    with torch.no_grad():
        for name in ("W_Q", "W_O", "W_in", "W_gate", "W_out", "W_E", "W_U", "W_K_kv", "W_V_kv"):
            theirs = getattr(bridge, name.removesuffix("_kv"))  # TL 4's bridge.W_K: the stored kv heads
            ours = getattr(interp, name)(model)
            assert ours.shape == theirs.shape, name
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        for name in ("W_K", "W_V"):
            ours, theirs = getattr(interp, name)(model), getattr(bridge, name)
            assert tuple(ours.shape) == (cfg.num_hidden_layers, H, cfg.hidden_size, cfg.head_dim) != theirs.shape
            torch.testing.assert_close(ours, theirs[:, to_q_heads], atol=0, rtol=0)
    assert Hkv < H  # grouped-query: the repeat is tested


@pytest.fixture(scope="module")
def tl_tiny(tiny, tmp_path_factory):
    TransformerBridge = _transformer_bridge_class()
    hf = hf_model_like(tiny)
    hf.config.architectures = ["Gemma3ForCausalLM"]  # the bridge picks its adapter from this
    path = tmp_path_factory.mktemp("tl_tiny")
    hf.save_pretrained(path)  # the bridge wants a name; with hf_model= it reads nothing from the Hub
    return TransformerBridge.boot_transformers(str(path), hf_model=hf, device="cpu")


def test_against_transformer_lens_gemma3_bridge(tiny, tl_tiny, ids):
    """Same hook names, same values as TransformerLens' Gemma 3 bridge: residual, q/k/v, rotary, scores,
    pattern, z, MLP and every norm, on both layer types (a query past the sliding window)."""
    assert set(tiny.config.layer_types) == {SLIDING, FULL} and S > tiny.config.sliding_window
    _compare_with_transformer_lens(tiny, tl_tiny, ids, atol=1e-5)
    # after fold_norm_weights our ln1/ln2/ln_final show rms(x), TL's hook_normalized
    import copy

    from gemmaforge import interp

    with torch.no_grad():
        folded = interp.fold_norm_weights(copy.deepcopy(tiny))
        _, tl = tl_tiny.run_with_cache(ids)
        _, ours = folded.run_with_cache(ids)
    folded_norms = [f"blocks.{i}.{ln}.hook_normalized" for i in range(4) for ln in ("ln1", "ln2")]
    for n in ["ln_final.hook_normalized", *folded_norms]:
        torch.testing.assert_close(ours[n], tl[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_weights_match_transformer_lens_gemma3_bridge(tiny, tl_tiny):
    _compare_weights_with_transformer_lens(tiny, tl_tiny)


@pytest.fixture(scope="module")
def tl_real(real):
    TransformerBridge = _transformer_bridge_class()
    from gemmaforge.formats.resolve import embedded_dir

    model, _, hf = real
    hf.config.architectures = ["Gemma3ForCausalLM"]
    # the HF-format dir of the embedded model: the bridge loads its tokenizer from there
    return TransformerBridge.boot_transformers(str(embedded_dir()), hf_model=hf, device="cpu")


@pytest.mark.slow
def test_against_transformer_lens_gemma3_bridge_real_270m(real, tl_real):
    model, tok, _ = real
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    _compare_with_transformer_lens(model, tl_real, ids, atol=1e-4)


@pytest.mark.slow
def test_weights_match_transformer_lens_gemma3_bridge_real_270m(real, tl_real):
    _compare_weights_with_transformer_lens(real[0], tl_real)


def _with_random_adapter(model, targets):
    """A copy of ``model`` with an unmerged LoRA adapter (non-zero B, so it changes the outputs)."""
    import copy

    from gemmaforge.adapters.lora import LoraConfig, apply_lora, lora_modules

    m = copy.deepcopy(model).eval()
    apply_lora(m, LoraConfig(rank=4, alpha=8.0, targets=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
    return m


def test_hook_result_uses_the_unmerged_lora_adapter_of_o_proj(tiny, ids):
    import torch.nn.functional as F

    from gemmaforge.adapters.lora import merge

    model = _with_random_adapter(tiny, ["o_proj"])
    L, H, D = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.head_dim
    with torch.no_grad():
        plain = model(ids)
        logits, cache = model.run_with_cache(ids, include_opt_in=True)
        assert all(act_name("result", i) in cache for i in range(L))
        # attn.hook_result changes the o_proj path (per-head einsum, then a sum): the logits stay the adapter's
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
        for i, layer in enumerate(model.model.layers.values()):
            o = layer.self_attn.o_proj
            z, result = cache["z", i], cache["result", i]
            torch.testing.assert_close(result.sum(2), o(z.reshape(*z.shape[:2], -1)), atol=1e-5, rtol=0)
            w = o.weight + (o.lora_B.weight @ o.lora_A.weight) * o.scaling
            for h in range(H):
                torch.testing.assert_close(result[:, :, h], z[:, :, h] @ w[:, h * D:(h + 1) * D].T,
                                           atol=1e-5, rtol=0)
            # the adapter matters: the base weight alone gives something else
            assert (result.sum(2) - F.linear(z.reshape(*z.shape[:2], -1), o.weight)).abs().max() > 1e-3
        merge(model)  # merged: the same numbers through the plain weight
        _, merged = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_result"),
                                         include_opt_in=True)
        for i in range(L):
            torch.testing.assert_close(merged["result", i], cache["result", i], atol=1e-5, rtol=0)


def test_eager_layers_share_one_dense_mask_per_kind(tiny, ids, monkeypatch):
    """Caching scores/pattern runs every layer eager: the dense mask is built once per forward for
    each window kind (sliding / full), not once per layer, and the values stay the transformers ones."""
    from gemmaforge.layers import attention

    built = []
    real = attention.dense_mask_of

    def counting(*a, **k):
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(attention, "dense_mask_of", counting)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert len(cache) == tiny.config.num_hidden_layers
    assert len(built) == len(set(tiny.config.layer_types)) == 2
    monkeypatch.setattr(attention, "dense_mask_of", real)
    _check_against_transformers(tiny, hf_model_like(tiny), ids, atol=1e-5)
