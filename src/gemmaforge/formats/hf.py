"""Hugging Face checkpoint format, both ways.

Parameter names in gemmaforge equal HF's, so the key map is near-identity: it only strips the
multimodal wrapper prefix (``model.language_model.`` -> ``model.``) and the tied ``lm_head``.
Loading is strict: every missing, unexpected or mis-shaped key is named.

Multimodal checkpoints load whole (towers included, every missing or unexpected tower key named):
the towers live under ``model.`` as in transformers' in-memory model (``model.vision_tower.``,
``model.multi_modal_projector.``); the checkpoint spellings (the Hub's ``vision_tower.vision_model.``,
transformers 5's ``vision_tower.``...) map onto them. ``text_only=True`` (``--text-only``) keeps the
text decoder alone and drops the tower tensors, as does a family whose towers gemmaforge does not
build. Saving a multimodal model writes the Hub's layout (``language_model.model.``,
``vision_tower.vision_model.``, ``multi_modal_projector.``), which every transformers version reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models.common.config import read_json
from ..models.registry import config_from_hf

# (checkpoint prefix, our prefix): multimodal checkpoints keep the text decoder under language_model
PREFIX_MAP = [
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
]
# multimodal towers built by gemmaforge: (checkpoint prefix, our prefix), longest first
TOWER_PREFIX_MAP = [
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
# our prefix -> the on-disk prefix a multimodal architecture is saved with (the Hub's layout); an
# architecture not listed is saved with transformers' in-memory names (``hf_module_name``)
SAVE_PREFIX_MAPS = {
    "Gemma3ForConditionalGeneration": [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ],
}
# checkpoint prefixes that belong to other towers of a multimodal checkpoint (vision, audio, projector)
FOREIGN_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.",
                    "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "model.vision_embedder.")


def _is_multimodal(cfg) -> bool:
    return bool(getattr(cfg, "is_multimodal", False))


def _remap(key: str, table) -> str:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def hf_to_ours(key: str) -> str:
    for src, dst in PREFIX_MAP + TOWER_PREFIX_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, Exception) as e:  # truncated header, bad JSON, I/O error
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _check_complete(f: Path) -> None:
    """A file cut short (interrupted copy or download) is named as truncated, before parsing."""
    if not f.exists():
        raise CheckpointError(f"{f}: file not found")
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise CheckpointError(f"{f}: truncated ({size} bytes; the header alone needs {8 + max(n, 0)})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: not a safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: truncated ({size} bytes, header promises {8 + n + end})")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        _check_complete(f)
        with _open_safetensors(f) as st:
            for k in st.keys():
                try:
                    out[k] = st.get_tensor(k)
                except Exception as e:
                    raise CheckpointError(f"{f}: tensor {k!r} cannot be read ({str(e).splitlines()[0]})") from None
    return out


def checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.exists():
        idx = read_json(index)
        if "weight_map" not in idx:
            raise CheckpointError(f"{index}: missing key 'weight_map'")
        return [d / f for f in sorted(set(idx["weight_map"].values()))]
    if single.exists():
        return [single]
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")


def hf_module_name(model, name: str) -> str:
    """transformers' in-memory name of our module/parameter ``name`` (the whole multimodal model maps
    the text decoder under ``model.language_model.``; a text-only model is the identity)."""
    if not _is_multimodal(model.config):
        return name
    towers = tuple(path + "." for spec in model.media_specs() for path in spec.towers)
    if name.startswith(towers) or not name.startswith("model."):
        return name
    return "model.language_model." + name[len("model."):]


def load_hf_state(d: str | Path, text_only: bool = False):
    """(config, state_dict with our names) from an HF directory. ``text_only``: the text decoder of a
    multimodal checkpoint alone (its tower tensors dropped)."""
    d = Path(d)
    if not d.exists():
        raise CheckpointError(f"{d}: path does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d}: expected an HF model directory (config.json + model.safetensors) or a .gguf file")
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{d}: no config.json")
    cfg = config_from_hf(read_json(cfg_path), str(cfg_path))
    if text_only and _is_multimodal(cfg):
        cfg = cfg.text_only()
    raw = read_safetensors(checkpoint_files(d))
    if _is_multimodal(cfg):
        sd = {hf_to_ours(k): v for k, v in raw.items()}
    else:
        sd = {hf_to_ours(k): v for k, v in raw.items() if not k.startswith(FOREIGN_PREFIXES)}
    return cfg, sd


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, dtype: torch.dtype | None = None,
              device="cpu") -> None:
    """Strictly place ``sd`` into ``model`` (possibly on the meta device); names every problem."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in sd:
        # some exporters write the tied head too; it must equal the embedding
        head = sd.pop("lm_head.weight")
        emb = sd.get("model.embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(f"{where}: lm_head.weight differs from model.embed_tokens.weight but the config ties them")
    ignored = getattr(model, "ignored_checkpoint_keys", None)
    if ignored is not None:  # e.g. k/v weights some exports keep for Gemma 4 KV-sharing layers
        for k in ignored(set(sd)):
            del sd[k]
    want = {k for k in expected if not (tied and k == "lm_head.weight")}
    buffers = {k for k, _ in model.named_buffers()} - set(expected)  # only non-persistent buffers are skipped
    want -= buffers
    missing = sorted(want - sd.keys())
    unexpected = sorted(sd.keys() - want - buffers)
    shaped = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in want & sd.keys() if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if shaped:
        problems.append(f"mis-shaped: {', '.join(shaped[:8])}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    dt = dtype or next(iter(expected.values())).dtype
    converted = {k: sd[k].to(device=device, dtype=dt if sd[k].is_floating_point() else sd[k].dtype) for k in want}
    model.load_state_dict(converted, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def export_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors, contiguous, the tied head dropped (HF re-ties it on load)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()} - set(state)
    out = {}
    mm = _is_multimodal(model.config)
    layout = SAVE_PREFIX_MAPS.get(model.config.to_hf()["architectures"][0]) if mm else None
    for k, v in state.items():
        if (tied and k == "lm_head.weight") or k in buffers:
            continue
        name = (_remap(k, layout) if layout else hf_module_name(model, k)) if mm else k
        out[name] = v.detach().contiguous()
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """A new hidden temp dir in ``parent`` with the permissions a plain ``mkdir`` gives (the user's
    umask), not ``mkdtemp``'s 0700: it is renamed into the user's output."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def default_permissions(d: Path) -> None:
    """Give the files written into ``d`` the mode a plain ``open`` gives (0666 & ~umask): some writers
    (safetensors) create theirs private (0600)."""
    mode = 0o666 & ~_umask()
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, mode)


def atomic_dir(dst: Path):
    """Context manager: yields a temp dir next to ``dst``; renamed over ``dst`` only on success."""
    class _Atomic:
        def __enter__(self):
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = make_temp_dir(f".{dst.name}.tmp-", dst.parent)
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            default_permissions(self.tmp)
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
                os.replace(dst, old)
                os.replace(self.tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, dst)
            return False

    return _Atomic()


def generation_config(cfg, tokenizer=None) -> dict:
    """What ``transformers.generate`` reads: every stop id of the config and of the tokenizer (for Gemma
    ``<eos>`` and ``<end_of_turn>``, without which a chat model runs on past the end of its turn)."""
    eos = list(cfg.eos_token_id)
    for i in getattr(tokenizer, "stop_ids", None) or []:
        if i is not None and i not in eos:
            eos.append(int(i))
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_token_id}


def _shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into parts of at most ``max_bytes`` (a larger tensor alone in its part)."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if max_bytes is not None and parts[-1] and size + n > max_bytes:
            parts.append({})
            size = 0
        parts[-1][k] = v
        size += n
    return parts


def save_hf(model: torch.nn.Module, dst: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
            max_shard_size: int | None = None) -> Path:
    """Write an HF-format dir (config.json, model.safetensors, generation_config.json, tokenizer files).
    Above ``max_shard_size`` bytes of tensors: ``model-0000N-of-0000M.safetensors`` files and
    ``model.safetensors.index.json``, as ``transformers`` writes and reads them."""
    dst = Path(dst)
    state = export_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    cfg = model.config
    with atomic_dir(dst) as tmp:
        hf_cfg = cfg.to_hf()
        hf_cfg["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg, tokenizer), indent=2) + "\n")
        parts = _shards({k: v.cpu() for k, v in state.items()}, max_shard_size)
        if len(parts) == 1:
            save_file(parts[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, part in enumerate(parts, 1):
                name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, name))
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return dst
