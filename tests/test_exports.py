"""Exports load everywhere: generation_config.json lists every stop id (a chat model stops at
<end_of_turn> in transformers.generate), a trained adapter names its base model (PEFT's
AutoPeftModelForCausalLM loads it), and output directories get the user's default permissions."""

import json
import os
import stat

import pytest
import torch

from gemmaforge import from_config
from gemmaforge.data import Document
from gemmaforge.formats.gguf import gguf_tokenizer
from gemmaforge.formats.hf import save_hf
from gemmaforge.models.registry import preset

END_OF_TURN = 106


def _small(seed=0, **over):
    """A small Gemma 3 with the real 262k vocabulary (so the real tokenizer fits)."""
    torch.manual_seed(seed)
    return from_config(preset("gemma-3-tiny", vocab_size=262_144, hidden_size=32, intermediate_size=64, head_dim=16,
                              num_attention_heads=2, num_key_value_heads=1, **over))


def _always_end_of_turn(model):
    """Weights that make every next token <end_of_turn>: the blocks add nothing, the final norm keeps
    only hidden dimension 0, and the (tied) table's dimension 0 is 1 for every token and 2 for 106, so
    the residual's dim 0 is positive and 106 has the largest logit."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        w = model.model.embed_tokens.weight
        w[:, 0] = 1.0
        w[END_OF_TURN, 0] = 2.0
        model.model.norm.weight.fill_(-1.0)  # Gemma's (1 + w): scale 0 ...
        model.model.norm.weight[0] = 0.0  # ... but 1 on dimension 0
    return model


def test_chat_model_export_stops_at_end_of_turn_in_transformers(real_gguf, tmp_path):
    import transformers

    tok = gguf_tokenizer(real_gguf)
    assert tok.stop_ids == [1, END_OF_TURN]
    d = save_hf(_always_end_of_turn(_small()), tmp_path / "m", tokenizer=tok)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, END_OF_TURN]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    prompt = torch.tensor([tok.encode("Hello there")])
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [END_OF_TURN]  # stopped at the end of the turn
    # the generation config is what makes it stop: without 106 it runs on to max_new_tokens
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=1)
    assert out.shape[1] == prompt.shape[1] + 8


def test_trainer_exports_stop_ids_and_an_adapter_that_names_its_base(real_gguf, tmp_path):
    """A LoRA run of the Trainer on a model it loads from a directory: ``final/generation_config.json``
    lists <eos> and <end_of_turn>; ``adapter/adapter_config.json`` names the base model, and PEFT's
    AutoPeftModelForCausalLM loads base + adapter with the merged export's logits."""
    import peft

    from gemmaforge.train import TrainConfig, Trainer

    tok = gguf_tokenizer(real_gguf)
    base = save_hf(_small(), tmp_path / "base", tokenizer=tok)
    docs = [Document(tok.encode(f"user says {i} and the model answers {i + 1}.") + [tok.eos_id]) for i in range(12)]
    cfg = TrainConfig(model=str(base), out=str(tmp_path / "run"), steps=2, seq_len=32, batch_tokens=64,
                      micro_batch_rows=1, eval_every=0, save_every=0, progress=False, lora_rank=2, lr=1e-2)
    Trainer(cfg, tokenizer=tok, train_docs=docs[:10], val_docs=docs[10:], log=lambda m: None).run()
    gen = json.loads((tmp_path / "run" / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, END_OF_TURN]
    conf = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base.resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run" / "adapter")).eval()
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final")).eval()
    ids = torch.tensor([tok.encode("user says 3")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_users_default_permissions(tmp_path, umask):
    """An exported model dir and a checkpoint dir are created as ``mkdir`` would (mode 0777 & ~umask),
    not as private temp dirs (0700)."""
    from gemmaforge.train.checkpointer import save_train_state

    old = os.umask(umask)
    try:
        m = from_config(preset("gemma-3-tiny"))
        d = save_hf(m, tmp_path / "export")
        ck = save_train_state(tmp_path / "run", 1, model=m, keep_last=1)
    finally:
        os.umask(old)
    for path in (d, ck):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, (path, oct(path.stat().st_mode))
    for f in list(d.iterdir()) + list(ck.iterdir()):
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 & ~umask, (f, oct(f.stat().st_mode))
