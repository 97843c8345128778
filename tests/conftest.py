import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def hf_model_like(model, attn="eager"):
    """The transformers reference model with the same config and weights (fp32, eval)."""
    import transformers

    d = model.config.to_hf()
    cls_name = d["architectures"][0]
    cfg_cls = transformers.AutoConfig.for_model(d["model_type"]).__class__
    cfg = cfg_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})
    cfg._attn_implementation = attn
    hf = getattr(transformers, cls_name)(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if getattr(model.config, "tie_word_embeddings", False):
        hf.tie_weights()
    return hf


def run_cli(*args, env=None, timeout=600):
    """Run `python -m gemmaforge ...` in a subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gemmaforge", *args], capture_output=True, text=True,
                          env=e, timeout=timeout)
