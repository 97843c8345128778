"""Media in a causal LM: what every multimodal family shares (Gemma 3 vision, Gemma 4 vision and audio).

A multimodal family model declares its media with ``media_specs()``: one ``MediaSpec`` per
modality, naming the forward keywords that carry it (``pixel_values``, ``audio_features``...), the
placeholder token its features replace, the per-token type the processor writes for it, whether
the tokens of one item attend to each other bidirectionally, and the module path of its encoder
(tower + embedder into the text width; activation checkpointing and freezing find the towers by
these paths). ``CausalLM.forward`` routes those keywords here: each spec's ``encode`` turns its
inputs into features ``[n_items, tokens_per_item, hidden]`` (or ``[n_tokens, hidden]``) that are
placed, in order, at the placeholder tokens of ``input_ids`` (padded rows, packed rows: the
placeholders are read row-major, so images go in the order they appear). A count that does not
match is one ``InputError`` line; a text-only model given media names the keyword.

Token types (what processors return per token): 0 text, 1 image, 2 video, 3 audio, as
transformers' ``mm_token_type_ids`` (Gemma 3's ``token_type_ids`` uses 0/1 the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import InputError

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3

# forward keywords that carry media in any family: a text-only model given one of them refuses it
MEDIA_INPUTS = ("pixel_values", "pixel_position_ids", "image_position_ids", "pixel_values_videos",
                "audio_features", "audio_mask", "input_features", "input_features_mask")


@dataclass
class MediaSpec:
    """One modality of a multimodal model."""

    modality: str  # "image", "audio", ...
    inputs: tuple[str, ...]  # forward keywords; the first one must be given for this modality to run
    token_id: int  # placeholder token in input_ids that the features replace
    token_type: int  # the per-token type processors write (IMAGE, AUDIO, ...)
    bidirectional: bool  # the tokens of one item attend to each other (mm_groups)
    encode: Callable[..., torch.Tensor]  # encode(**inputs) -> [n_items, n, hidden] or [n_tokens, hidden]
    towers: tuple[str, ...] = ()  # module paths of its encoder and embedder (freezing, checkpointing, LoRA)


def refuse_media(model, given: dict) -> None:
    """A text-only model given media: one line naming the keyword."""
    names = ", ".join(sorted(given))
    raise InputError(f"{names} given to a text-only model ({type(model).__name__}); load the multimodal "
                     "checkpoint without --text-only, or drop the media")


def split_media(model, family_inputs: dict) -> dict:
    """Take the media keywords out of ``family_inputs`` (in place); refuses them on a text-only model."""
    specs = model.media_specs()
    names = {n for s in specs for n in s.inputs} | set(MEDIA_INPUTS)
    media = {k: family_inputs.pop(k) for k in list(family_inputs) if k in names}
    media = {k: v for k, v in media.items() if v is not None}
    if media and not specs:
        refuse_media(model, media)
    return media


def place_media(model, h: torch.Tensor, ids: torch.Tensor | None, media: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode every given modality and put its features at its placeholder tokens of ``ids``.

    Returns the new embeddings and the ``mm_groups`` of the bidirectional modalities that ran
    (None when none ran)."""
    if ids is None:
        raise InputError(f"{', '.join(sorted(media))} need input_ids (the placeholder tokens say where they go)")
    groups = None
    used = set()
    for spec in model.media_specs():
        if spec.inputs[0] not in media:
            continue
        kwargs = {k: media[k] for k in spec.inputs if k in media}
        used |= set(kwargs)
        feats = spec.encode(**kwargs)
        h = place_features(h, ids, spec.token_id, feats, spec.modality)
        if spec.bidirectional:
            g = group_ids(ids == spec.token_id)
            groups = g if groups is None else torch.where(g >= 0, g + int(groups.max()) + 1, groups)
    left = set(media) - used
    if left:
        raise InputError(f"{', '.join(sorted(left))} given without "
                         f"{' / '.join(s.inputs[0] for s in model.media_specs())} ({type(model).__name__})")
    return h, groups


def place_features(h: torch.Tensor, ids: torch.Tensor, token_id: int, feats: torch.Tensor,
                   modality: str = "media") -> torch.Tensor:
    """``h`` [B, S, H] with ``feats`` (``[n_items, n, H]`` or ``[n_tokens, H]``) at the tokens equal to
    ``token_id``, in row-major order (out of place, differentiable in ``feats``)."""
    mask = ids.reshape(h.shape[:2]) == token_id
    n_tokens = int(mask.sum())
    flat = feats.reshape(-1, feats.shape[-1])
    if flat.shape[-1] != h.shape[-1]:
        raise InputError(f"{modality} features have width {flat.shape[-1]} but the text model {h.shape[-1]}")
    if n_tokens != flat.shape[0]:
        items = f" ({feats.shape[0]} {modality}s of {feats.shape[1]} tokens)" if feats.dim() == 3 else ""
        raise InputError(f"{n_tokens} {modality} placeholder tokens (id {token_id}) in input_ids but "
                         f"{flat.shape[0]} {modality} feature vectors{items}")
    b, s = mask.nonzero(as_tuple=True)
    return h.index_put((b, s), flat.to(h.dtype))


def group_ids(is_media: torch.Tensor) -> torch.Tensor:
    """One group id per maximal run of True along the last dim (0, 1, ... per row), -1 elsewhere."""
    prev = torch.nn.functional.pad(is_media, (1, 0), value=False)[..., :-1]
    starts = is_media & ~prev
    ids = torch.cumsum(starts.long(), dim=-1) - 1
    return torch.where(is_media, ids, -1)


def token_types(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token types (0 text, or each spec's ``token_type`` at its placeholders) of ``ids``."""
    out = torch.zeros_like(ids)
    for spec in model.media_specs():
        out = torch.where(ids == spec.token_id, spec.token_type, out)
    return out


def tower_modules(model, modalities: tuple[str, ...] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(qualified name, module)`` of the encoders and embedders of ``modalities`` (all when None)."""
    out = []
    for spec in model.media_specs():
        if modalities is not None and spec.modality not in modalities:
            continue
        for path in spec.towers:
            out.append((path, model.get_submodule(path)))
    return out
