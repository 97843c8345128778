"""Gemma 4 with the rest of the stack: the trainer, LoRA and hooks, on tiny configs.

E2B-like (per-layer embeddings, KV sharing, double-wide MLP), 31B-like (K=V full layers) and
26B-A4B-like (MoE: dense MLP + 6 packed experts, top-3), as in test_gemma4.py.
"""

import pytest
import torch
from conftest import hf_model_like
from test_train import ByteTok, corpus

import gemmaforge
from gemmaforge import from_config
from gemmaforge.models.gemma4.config import SHARE_REUSE
from gemmaforge.errors import ConfigError
from gemmaforge.train import TrainConfig, Trainer
from gemmaforge.models.common.hooks import hook_names
from gemmaforge.adapters.lora import LoraConfig, apply_lora, lora_modules

PRESETS = {"e2b": "gemma-4-tiny-e2b", "31b": "gemma-4-tiny-31b", "moe": "gemma-4-tiny-moe"}


def _tiny(case, seed=0):
    return from_config(PRESETS[case], seed=seed)


def _trainer(tmp_path, model, **kw):
    docs = corpus()
    base = dict(out=str(tmp_path / "run"), steps=6, lr=1e-2, warmup_steps=2, seq_len=32, batch_tokens=64,
                eval_every=0, save_every=0, keep_last=1, progress=False, eval_rows=2, seed=1)
    base.update(kw)
    return Trainer(TrainConfig(**base), model=model, tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:],
                   log=lambda m: None)


# ----------------------------------------------------------------------------- trainer

@pytest.mark.parametrize("case,extra", [("e2b", dict(activation_checkpointing=True)), ("moe", {})])
def test_trainer_lowers_loss(tmp_path, case, extra):
    """Packed rows (cu_seqlens), chunked softcapped loss, AdamW, checkpoint and HF export on Gemma 4."""
    model = _tiny(case)
    summary = _trainer(tmp_path, model, **extra).run()
    before, after = summary["val_before"]["val_loss"], summary["val_after"]["val_loss"]
    assert after < before - 0.5, (before, after)
    back = gemmaforge.from_pretrained(tmp_path / "run" / "final")
    ids = torch.randint(4, 260, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model.eval()(ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- LoRA

def _expected_lora_modules(cfg) -> set[str]:
    out = set()
    for i, mode in enumerate(cfg.kv_sharing_modes):
        attn = ["q_proj", "o_proj"]
        if mode != SHARE_REUSE:  # reuse layers own no k/v projections
            attn += ["k_proj"] + ([] if cfg.k_eq_v(i) else ["v_proj"])
        out |= {f"model.layers.{i}.self_attn.{n}" for n in attn}
        out |= {f"model.layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    return out


@pytest.mark.parametrize("case", ["e2b", "31b", "moe"])
def test_lora_default_targets_are_attention_and_dense_mlp(case):
    m = _tiny(case)
    names = apply_lora(m, LoraConfig(rank=4))
    assert set(names) == _expected_lora_modules(m.config)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if case == "moe":  # the packed experts and the router stay frozen and unwrapped
        layer = m.model.layers["1"]
        assert not layer.experts.gate_up_proj.requires_grad and not layer.experts.down_proj.requires_grad
        assert isinstance(layer.router.proj, torch.nn.Linear)


@pytest.mark.parametrize("case", ["e2b", "moe"])
def test_lora_training_changes_only_adapter_weights(tmp_path, case):
    model = _tiny(case)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = _trainer(tmp_path, model, steps=3, lora_rank=4, eval_rows=0)
    for _ in range(3):
        row = tr.train_step()
        assert not row.get("skipped")
    params = dict(model.named_parameters())
    for n, before in base.items():
        assert torch.equal(params[n], before), n  # base weights keep their names and values
    adapters = lora_modules(model)
    assert adapters and all(m.lora_B.weight.abs().max() > 0 for m in adapters.values())
    # the adapters of a KV-sharing store layer learn from the reuse layers too: nothing is frozen by accident
    if case == "e2b":
        store = max(i for i, mode in enumerate(model.config.kv_sharing_modes) if mode == "store")
        assert adapters[f"model.layers.{store}.self_attn.k_proj"].lora_B.weight.abs().max() > 0


def test_lora_on_packed_expert_weights_is_a_clear_error():
    for targets, msg in ((["gate_up_proj"], "packed MoE expert weight"),
                         (["q_proj", "experts.down_proj"], "experts.down_proj.*packed MoE expert weight"),
                         (["experts"], "Gemma4Experts.*not a Linear"),
                         (r".*\.router", "Gemma4Router.*not a Linear")):
        m = _tiny("moe")
        with pytest.raises(ConfigError, match=msg) as e:
            apply_lora(m, LoraConfig(rank=2, targets=targets))
        assert "\n" not in str(e.value)
        assert not lora_modules(m) and all(p.requires_grad for p in m.parameters())  # nothing half-applied
    # naming the dense MLP's down_proj is fine: the experts' packed down_proj is not touched
    m = _tiny("moe")
    names = apply_lora(m, LoraConfig(rank=2, targets=["down_proj"]))
    assert names == [f"model.layers.{i}.mlp.down_proj" for i in range(m.config.num_hidden_layers)]


# ----------------------------------------------------------------------------- hooks

@pytest.mark.parametrize("case", ["e2b", "moe"])
def test_run_with_cache_matches_transformers_hidden_states(case):
    torch.manual_seed(0)
    m = _tiny(case)
    with torch.no_grad():  # away from the init so every layer matters
        for p in m.parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.15)
    hf = hf_model_like(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 13))  # longer than the window (6)
    L = m.config.num_hidden_layers
    with torch.no_grad():
        logits, cache = m.run_with_cache(ids)
        ref = hf(ids, use_cache=False, output_hidden_states=True, output_attentions=True)
    assert len(ref.hidden_states) == L + 1 and set(cache) == set(hook_names(m))
    torch.testing.assert_close(cache["embed"], ref.hidden_states[0], atol=1e-5, rtol=0)
    for i in range(L - 1):
        torch.testing.assert_close(cache["resid_post", i], ref.hidden_states[i + 1], atol=1e-4, rtol=1e-5,
                                   msg=lambda s, i=i: f"resid_post {i}: {s}")
    # transformers' last hidden state is after the final norm
    torch.testing.assert_close(cache["ln_final"], ref.hidden_states[-1], atol=1e-4, rtol=1e-5)
    for i in range(L):
        torch.testing.assert_close(cache["pattern", i], ref.attentions[i], atol=1e-5, rtol=0,
                                   msg=lambda s, i=i: f"pattern {i}: {s}")
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)


def test_kv_sharing_layers_have_no_kv_hook_points_and_ablation_reaches_them():
    m = _tiny("e2b")
    reuse = [i for i, mode in enumerate(m.config.kv_sharing_modes) if mode == SHARE_REUSE]
    names = set(hook_names(m))
    for i in reuse:
        assert f"blocks.{i}.attn.hook_q" in names and f"blocks.{i}.attn.hook_k" not in names
        with pytest.raises(KeyError, match=f"blocks.{i}.attn.hook_rot_k"):
            m.run_with_hooks(torch.tensor([[5, 6]]), fwd_hooks=[(f"blocks.{i}.attn.hook_rot_k", lambda t, hook: t)])
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        plain = m(ids)
        zeroed = m.run_with_hooks(ids, fwd_hooks=[(f"blocks.{reuse[-1]}.attn.hook_z", lambda z, hook: z * 0)])
    assert (zeroed - plain).abs().max() > 1e-4
