"""HF checkpoint format both ways, strict loading, and the one-line errors of bad checkpoints."""

import json

import pytest
import torch
from conftest import hf_model_like, run_cli

import gemmaforge
from gemmaforge import from_config
from gemmaforge.formats.hf import save_hf
from gemmaforge.models.registry import preset
from gemmaforge.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = from_config(preset("gemma-3-tiny"))
    d = tmp_path_factory.mktemp("tiny") / "hf"
    save_hf(model, d)
    return model, d


def test_roundtrip_transformers_loads_identical_logits(tiny_dir, tmp_path):
    import transformers

    model, d = tiny_dir
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, model(ids), atol=0, rtol=0)
    # HF dir -> transformers save -> gemmaforge -> HF dir -> transformers: identical logits
    hf_dir = tmp_path / "from_hf"
    hf.save_pretrained(hf_dir)
    ours = gemmaforge.from_pretrained(hf_dir)
    save_hf(ours, tmp_path / "again")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(ids, use_cache=False).logits, hf(ids, use_cache=False).logits, atol=0, rtol=0)
        torch.testing.assert_close(ours(ids), model(ids), atol=0, rtol=0)


def test_sharded_and_multimodal_prefix(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, d = tiny_dir
    sd = load_file(d / "model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((d / "config.json").read_text())
    wm = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        # multimodal checkpoints keep the text decoder under model.language_model.
        save_file({k.replace("model.", "model.language_model.", 1): sd[k] for k in part}, out / name)
        wm.update({k.replace("model.", "model.language_model.", 1): name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    loaded = gemmaforge.from_pretrained(out)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def _copy_with(d, tmp_path, edit_sd=None, edit_cfg=None):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    if edit_cfg:
        edit_cfg(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(d / "model.safetensors")
    if edit_sd:
        edit_sd(sd)
    save_file(sd, out / "model.safetensors")
    return out


def test_missing_tensor_named(tiny_dir, tmp_path):
    _, d = tiny_dir
    out = _copy_with(d, tmp_path, edit_sd=lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.2\.mlp\.up_proj\.weight"):
        gemmaforge.from_pretrained(out)


def test_misshaped_and_unexpected_named(tiny_dir, tmp_path):
    _, d = tiny_dir

    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
        sd["model.layers.0.extra.weight"] = torch.zeros(2)

    out = _copy_with(d, tmp_path, edit_sd=edit)
    with pytest.raises(CheckpointError) as e:
        gemmaforge.from_pretrained(out)
    msg = str(e.value)
    assert "model.layers.0.extra.weight" in msg and "model.layers.0.self_attn.k_proj.weight (checkpoint (3, 3)" in msg
    assert "\n" not in msg


def test_unsupported_architecture(tiny_dir, tmp_path):
    _, d = tiny_dir
    out = _copy_with(d, tmp_path, edit_cfg=lambda c: c.update(model_type="llama4", architectures=["Llama4ForCausalLM"]))
    with pytest.raises(ConfigError, match="unsupported architecture.*llama4"):
        gemmaforge.from_pretrained(out)


def test_cli_bad_inputs_one_line_exit_2(tiny_dir, tmp_path):
    _, d = tiny_dir
    # truncated safetensors
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    data = (d / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    # unsupported architecture
    arch = tmp_path / "arch"
    arch.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (arch / "config.json").write_text(json.dumps(cfg))
    (arch / "model.safetensors").write_bytes(data)
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(bad): "truncated",
        str(arch): "unsupported architecture",
    }
    for model, needle in cases.items():
        r = run_cli("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2")
        assert r.returncode == 2, (model, r.stderr)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
