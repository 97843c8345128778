"""What the model families' configs share: layer types, rotary specs, reading HF ``config.json`` files.

Per-layer patterns are explicit lists (``layer_types``); nothing branches on a model's name string.
``rope_from_hf`` accepts both the transformers 5.x form (``rope_parameters`` per layer type) and the
older flat keys (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``) found in checkpoints on
the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ConfigError
from ...layers.rope import RopeSpec

SLIDING = "sliding_attention"
FULL = "full_attention"


def read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def rope_from_hf(d: dict, where: str, default_theta: dict[str, float], local_key: str | None) -> dict[str, RopeSpec]:
    """Per-layer-type rotary specs from either ``rope_parameters`` (5.x) or legacy flat keys."""
    rp = d.get("rope_parameters")
    out: dict[str, RopeSpec] = {}
    if isinstance(rp, dict) and any(k in rp for k in (FULL, SLIDING)):
        for t, theta in default_theta.items():
            out[t] = RopeSpec.from_hf(rp.get(t) or {}, theta, f"{where}: rope_parameters.{t}")
        return out
    # legacy: rope_theta for global layers, rope_local_base_freq for sliding, rope_scaling on global only
    legacy = dict(rp or {})
    full = {"rope_theta": d.get("rope_theta", legacy.get("rope_theta", default_theta[FULL]))}
    scaling = d.get("rope_scaling") or {k: v for k, v in legacy.items() if k != "rope_theta"}
    if scaling:
        full.update(scaling)
    out[FULL] = RopeSpec.from_hf(full, default_theta[FULL], f"{where}: rope_scaling")
    local = d.get(local_key, default_theta[SLIDING]) if local_key else default_theta[SLIDING]
    out[SLIDING] = RopeSpec(theta=float(local))
    return out
