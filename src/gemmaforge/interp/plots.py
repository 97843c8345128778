"""Pictures: attention heatmaps and the logit-lens table, as PNG files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..errors import InputError
from ..models.common.hooks import act_name
from .common import _layers
from .lens import logit_lens

# ============================================================================ pictures

def _piece(tokenizer, i: int) -> str:
    if tokenizer is None:
        return str(i)
    if hasattr(tokenizer, "id_to_token"):
        s = tokenizer.id_to_token(int(i))
    else:  # a transformers tokenizer
        s = tokenizer.convert_ids_to_tokens(int(i))
    return f"<{i}>" if s is None else s


def _raw_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    return [_piece(tokenizer, i).replace("▁", " ") for i in ids]


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Printable token strings: sentencepiece's ``▁`` shown as a space, newlines as ``\\n``."""
    return [s.replace("\n", "\\n").replace("\t", "\\t") for s in _raw_labels(tokenizer, ids)]


_GLYPHS: set | None = None


def _font_glyphs() -> set:
    """Code points matplotlib's default font can draw (read once)."""
    global _GLYPHS
    if _GLYPHS is None:
        from matplotlib import font_manager, ft2font

        path = font_manager.findfont(font_manager.FontProperties())
        _GLYPHS = set(ft2font.FT2Font(path).get_charmap())
    return _GLYPHS


def _mpl_safe(s: str) -> str:
    """A label matplotlib draws as written: ``$`` escaped (it would start mathtext), characters its font
    has no glyph for (CJK, emoji... drawn as empty boxes) written as ``\\uXXXX`` escapes."""
    glyphs = _font_glyphs()
    s = "".join(c if ord(c) in glyphs or c in " \t" else _escape(c) for c in s)
    return s.replace("$", r"\$")


def _escape(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("the prompt is empty")
        return list(tokenizer.encode(prompt))
    ids = [int(x) for x in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    if not ids:
        raise InputError("the prompt is empty")
    return ids


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _tick_step(n: int, most: int = 48) -> int:
    return max(1, math.ceil(n / most))


@torch.no_grad()
def attention_heatmaps(model, tokenizer, prompt, out_dir, layers: Iterable[int] | None = None,
                       max_layers: int | None = None, on_layer: Callable[[int], None] | None = None,
                       dpi: int = 100) -> list[Path]:
    """One PNG per layer (``attn_layer_XX.png``), one panel per head: query tokens down, key tokens
    across, colour = attention probability. ``prompt``: text (encoded with BOS) or token ids.
    ``layers`` / ``max_layers`` choose the layers (default all); ``on_layer(i)`` is called after each."""
    plt = _pyplot()
    ids = _encode(tokenizer, prompt)
    n_layers = len(_layers(model))
    chosen = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    if max_layers is not None:
        chosen = chosen[:max(0, int(max_layers))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [act_name("pattern", i) for i in chosen]
    _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names_filter=names, return_hidden=True)
    labels = [_mpl_safe(s) for s in token_labels(tokenizer, ids)]
    S = len(ids)
    step = _tick_step(S)
    ticks = list(range(0, S, step))
    types = getattr(model.config, "layer_types", None)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fonts lack glyphs for some tokens
        for i in chosen:
            paths.append(_heatmap(plt, cache["pattern", i][0].float().cpu(), i, types, labels, ticks, out, dpi))
            if on_layer is not None:
                on_layer(i)
    return paths


def colour_scale(pat: torch.Tensor) -> float:
    """The top of a heatmap's colour scale: the largest weight outside the first key column ``pat[..., 0]``."""
    rest = pat[..., 1:] if pat.shape[-1] > 1 else pat
    return max(float(rest.max()), 1e-6)


def _heatmap(plt, pat: torch.Tensor, i: int, types, labels, ticks, out: Path, dpi: int) -> Path:
    """One layer's figure: pat [H, q, k], the heads in a near-square grid.

    The colour scale ends at the largest weight outside the first key column: the first token (``<bos>``)
    soaks up most of many heads' attention and would otherwise leave every other cell dark; its
    column saturates (the colour bar's arrow) and its own weights are in the title."""
    S = len(labels)
    H = pat.shape[0]
    ncols = math.ceil(math.sqrt(H))
    nrows = math.ceil(H / ncols)
    side = min(8.0, max(3.0, 0.2 * S + 1.8))
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 1.2, side * nrows + 0.8), squeeze=False,
                             layout="constrained")
    kind = f" ({types[i]})" if types is not None else ""
    vmax = colour_scale(pat)
    first = float(pat[:, :, 0].mean())
    fig.suptitle(f"layer {i}{kind}: attention pattern, query rows x key columns\n"
                 f"colour scale 0..{vmax:.2f}; the first key column (mean weight {first:.2f}) saturates")
    fs = 9 if S <= 24 else 8
    im = None
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(pat[h].numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"head {h}")
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=fs)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=fs)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, extend="max" if float(pat.max()) > vmax else "neither")
    path = out / f"attn_layer_{i:02d}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.no_grad()
def logit_lens_table(model, tokenizer, prompt, out_dir, k: int = 5, stem: str = "logit_lens",
                     dpi: int = 100) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (rows = embedding and each layer, columns = positions, colour = top-1
    probability, text = top-1 token) and ``<stem>.txt`` (the top-``k`` tokens with probabilities of
    every layer at every position). Returns the two paths."""
    plt = _pyplot()
    ids = _encode(tokenizer, prompt)
    lens = logit_lens(model, torch.tensor([ids], device=model.device), k=k)
    top_i, top_p = lens.top_ids[:, 0].cpu(), lens.top_probs[:, 0].cpu()  # [R, S, k]
    R, S = top_i.shape[:2]
    raw = _raw_labels(tokenizer, ids)
    inputs = token_labels(tokenizer, ids)
    rows = ["embed"] + [f"layer {x}" for x in lens.labels[1:]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # text table
    lines = [f"logit lens: top-{k} next-token predictions of the residual stream after each layer",
             f"(decoded through the final norm and the LM head); {S} tokens, {R - 1} layers", ""]
    width = max(len(r) for r in rows)
    for s in range(S):
        lines.append(f"position {s}  input {raw[s]!r}")
        for r in range(R):
            cells = "  ".join(f"{t!r} {p:.3f}" for t, p in zip(_raw_labels(tokenizer, top_i[r, s].tolist()),
                                                              top_p[r, s].tolist()))
            lines.append(f"  {rows[r]:<{width}}  {cells}")
        lines.append("")
    txt = out / f"{stem}.txt"
    txt.write_text("\n".join(lines), encoding="utf-8")

    # picture
    png = out / f"{stem}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fonts lack glyphs for some tokens
        _lens_figure(plt, top_i[:, :, 0], top_p[:, :, 0].numpy(), tokenizer, inputs, rows, png, dpi)
    return png, txt


def _lens_figure(plt, top1: torch.Tensor, probs, tokenizer, inputs, rows, path: Path, dpi: int) -> None:
    R, S = top1.shape
    fig_w = min(40.0, max(6.0, 1.0 * S + 2.5))
    fig_h = min(40.0, max(3.0, 0.38 * R + 1.8))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    im = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fs = 8 if S <= 24 else 7
    for r in range(R):
        for s, t in enumerate(token_labels(tokenizer, top1[r].tolist())):
            t = t if len(t) <= 10 else t[:9] + "…"
            ax.text(s, r, _mpl_safe(t), ha="center", va="center", fontsize=fs,
                    color="white" if probs[r, s] > 0.5 else "black")
    step = _tick_step(S)
    ax.set_xticks(range(0, S, step), [_mpl_safe(inputs[s]) for s in range(0, S, step)], rotation=90, fontsize=8)
    ax.set_yticks(range(R), rows, fontsize=8)
    ax.set_xlabel("input token (prediction is for the next one)")
    ax.set_title("logit lens: top-1 token per layer and position (colour: its probability)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
