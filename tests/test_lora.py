"""LoRA: PEFT format both ways, merge/unmerge, only adapters train, clear errors."""

import json

import pytest
import torch
from conftest import hf_model_like

from gemmaforge import from_config
from gemmaforge.models.registry import preset
from gemmaforge.errors import CheckpointError
from gemmaforge.adapters.lora import DEFAULT_TARGETS, LoraConfig, apply_lora, lora_modules, merge, merged_copy, unmerge
from gemmaforge.formats.peft import load_adapter, save_adapter


def _base(seed=0):
    torch.manual_seed(seed)
    return from_config(preset("gemma-3-tiny"))


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_default_targets_are_all_seven_projections_of_every_layer():
    m = _base()
    names = apply_lora(m, LoraConfig(rank=4))
    assert len(names) == 7 * m.config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_ours_to_peft_logits_match(tmp_path):
    import peft

    m = _base()
    hf = hf_model_like(m)  # base weights, before wrapping
    apply_lora(m, LoraConfig(rank=4, alpha=8, rslora=True))
    _randomize_adapters(m)
    save_adapter(m, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["use_rslora"] is True
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(ids), pm(ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_peft_to_ours_logits_match(tmp_path):
    import peft

    m = _base()
    hf = hf_model_like(m)
    pcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=DEFAULT_TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    load_adapter(m, tmp_path / "peft")
    ids = torch.randint(0, 512, (1, 21))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(ids), pm.eval()(ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_merge_unmerge_and_merged_copy():
    m = _base()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, LoraConfig(rank=4))
    _randomize_adapters(m)
    ids = torch.randint(0, 512, (1, 13))
    with torch.no_grad():
        unmerged = m(ids)
        merge(m)
        torch.testing.assert_close(m(ids), unmerged, atol=1e-5, rtol=0)
        unmerge(m)
        for k, v in base.items():
            torch.testing.assert_close(m.state_dict()[k], v, atol=1e-6, rtol=0)
        plain = merged_copy(m)
        assert not lora_modules(plain)
        torch.testing.assert_close(plain(ids), unmerged, atol=1e-5, rtol=0)
        assert set(plain.state_dict()) == set(base)


def test_training_step_changes_only_adapters():
    m = _base().train()
    apply_lora(m, LoraConfig(rank=4))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (1, 24))
    for _ in range(2):  # two steps: B moves in step 1, so A gets gradient in step 2
        loss = m(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().neg()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_A." in n or ".lora_B." in n), n


def test_bad_adapters_name_the_module(tmp_path):
    m = _base()
    apply_lora(m, LoraConfig(rank=4))
    save_adapter(m, tmp_path / "ok")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    # a target that does not exist
    bad = dict(sd)
    bad["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    save_file(bad, tmp_path / "missing" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.9\.self_attn\.q_proj'"):
        load_adapter(_base(), tmp_path / "missing")
    # a rank/shape mismatch
    bad = dict(sd)
    k = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    bad[k] = torch.zeros(5, 64)
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    save_file(bad, tmp_path / "shape" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.1\.mlp\.up_proj'.*shape \(5, 64\)"):
        load_adapter(_base(), tmp_path / "shape")
    with pytest.raises(CheckpointError, match="match no Linear"):
        apply_lora(_base(), LoraConfig(rank=2, targets=["nonexistent_proj"]))
