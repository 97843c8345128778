"""Shared helpers of the Gemma 4 vision / audio tests: a tiny multimodal model with random weights, the
transformers reference with the same weights, synthetic images (patches) and prompts."""

from __future__ import annotations

import torch

from gemmaforge import from_config
from gemmaforge.models.registry import preset

TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def mm_model(name="gemma-4-tiny-e2b-mm", seed=0, **over):
    """Ours, every parameter and buffer away from its init so each one matters."""
    torch.manual_seed(seed)
    m = from_config(preset(name, **over))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("position_embedding_table"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1:
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
            elif n.endswith("std_bias"):
                b.normal_(0.0, 0.5)
            elif n.endswith("std_scale"):
                b.uniform_(0.5, 1.5)
            elif n.endswith(("input_min", "output_min")):
                b.fill_(-3.0)
            elif n.endswith(("input_max", "output_max")):
                b.fill_(3.0)
    return m


def hf_state(m) -> dict:
    """Our state dict under transformers' Gemma4ForConditionalGeneration names."""
    out = {}
    for k, v in m.state_dict().items():
        if k == "lm_head.weight":
            continue
        out[k if k.startswith(TOWER_PREFIXES) else "model.language_model." + k[len("model."):]] = v
    return out


def hf_like(m):
    import transformers

    d = m.config.to_hf()
    cfg = transformers.Gemma4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state(m), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf


def patches(grids, patch_size, k, max_soft, generator=None):
    """``pixel_values`` / ``image_position_ids`` of images whose patch grids are ``grids`` [(h, w)], padded
    to ``max_soft * k^2`` patches, and each image's soft-token count."""
    maxp = max_soft * k * k
    pix = torch.zeros(len(grids), maxp, 3 * patch_size ** 2)
    pos = torch.full((len(grids), maxp, 2), -1, dtype=torch.long)
    for i, (h, w) in enumerate(grids):
        n = h * w
        pix[i, :n] = torch.rand(n, 3 * patch_size ** 2, generator=generator)
        gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
        pos[i, :n] = torch.stack([gx, gy], -1).reshape(n, 2)
    return pix, pos, [h * w // (k * k) for h, w in grids]


def prompt(cfg, segments, generator=None):
    """ids and the reference's mm_token_type_ids of ``segments``: ("text", n) random text tokens,
    ("image", n) / ("audio", n) n soft tokens wrapped in their begin / end tokens."""
    ids, types = [], []
    for kind, n in segments:
        if kind == "text":
            ids += torch.randint(3, 500, (n,), generator=generator).tolist()
            types += [0] * n
        elif kind == "image":
            ids += [cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id]
            types += [0] + [1] * n + [0]
        else:
            ids += [cfg.boa_token_id] + [cfg.audio_token_id] * n + [cfg.eoa_token_id]
            types += [0] + [3] * n + [0]
    return torch.tensor(ids), torch.tensor(types)
