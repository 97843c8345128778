"""Interpretability tools on top of the hook points (``models/common/hooks.py``).

    import gemmaforge
    from gemmaforge import interp
    model = gemmaforge.from_pretrained("gemma-3-270m"); tok = gemmaforge.load_tokenizer("gemma-3-270m")
    ids = torch.tensor([tok.encode("The capital of France is")])
    interp.W_Q(model).shape                       # [n_layers, n_heads, d_model, d_head]
    interp.W_Q(model, layer=3).shape              # [n_heads, d_model, d_head]: Gemma 4 layers differ, ask per layer
    interp.W_K(model).shape                       # [n_layers, n_heads, ...]: kv heads repeated, as TransformerLens
    interp.W_K_kv(model).shape                    # [n_layers, n_kv_heads, d_model, d_head]: as stored
    lens = interp.logit_lens(model, ids, k=5)     # top-5 tokens of every layer's residual stream
    dla = interp.direct_logit_attribution(model, ids, tok.token_to_id("▁Paris"))
    scores = interp.activation_patching(model, clean, corrupted, "resid_post", metric)
    interp.attention_heatmaps(model, tok, "The capital of France is", "out/")

Conventions follow TransformerLens: weights act on the right (``x @ W``), per-head weights are
``[head, d_model, d_head]``, the residual stream is ``[batch, pos, d_model]``. Unlike
TransformerLens nothing is folded or centred by default: every tool reads the model exactly as it
computes. ``fold_norm_weights`` is the one opt-in weight rewrite.
"""

from ..models.common.hooks import ActivationCache, act_name, hook_names, hooks, run_with_cache, run_with_hooks
from .fold import fold_norm_weights
from .lens import LogitLens, direct_logit_attribution, logit_lens
from .patching import activation_patching
from .plots import attention_heatmaps, logit_lens_table, token_labels
from .weights import TLWeights, W_E, W_K, W_K_kv, W_O, W_Q, W_U, W_V, W_V_kv, W_gate, W_in, W_out

__all__ = [
    "TLWeights", "W_E", "W_U", "W_Q", "W_K", "W_V", "W_K_kv", "W_V_kv", "W_O", "W_gate", "W_in", "W_out",
    "fold_norm_weights", "activation_patching", "logit_lens", "LogitLens", "direct_logit_attribution",
    "attention_heatmaps", "logit_lens_table", "token_labels",
    "ActivationCache", "act_name", "hook_names", "hooks", "run_with_cache", "run_with_hooks",
]
