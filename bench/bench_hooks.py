"""Cost of the hook machinery on the embedded Gemma 3 270M (fp32, CPU unless --device).

    .venv/bin/python bench/bench_hooks.py [--threads 2] [--repeats 15] [--out bench/results/hooks.md]

(a) forward with a do-nothing hook (``lambda t, hook: None``) on every hook point, through
    ``run_with_hooks``, vs the plain forward. Two variants: every point except the two that change
    the computation (``attn.hook_attn_scores`` / ``attn.hook_pattern`` switch that layer to the
    eager attention kernel, since the fused kernels never form the probabilities), and literally
    every point (all 18 layers then run eager; compared with a plain forward on the eager kernel
    as well).
(b) ``run_with_cache`` of every ``hook_resid_post`` vs transformers ``output_hidden_states=True``
    on the same weights, both on the SDPA kernel.
(c) ``run_with_cache`` of every hook point (default set) for a 13-token and a 512-token prompt:
    time and tensor count; TransformerLens' ``TransformerBridge`` (4.x) on the same HF model when
    ``transformer_lens`` is importable, and our plain eager forward (no hooks): the floor, since
    caching every point runs every layer on the eager kernel.

Timings are medians and minima of ``--repeats`` runs, the compared variants interleaved run by run,
as wall time and as the process's CPU time (the CPU time is what a shared machine distorts least).
``--device cuda`` times on a GPU (synchronising after each call); ``--random-init`` uses the 270M
config with random weights and random token ids, for machines without the embedded checkpoint
(costs do not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize with --device cuda)


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Per callable: median and min wall seconds, median and min CPU seconds (all threads of this
    process), the callables alternating within every repeat so that load changes hit them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
            SYNC()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            SYNC()
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            SYNC()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: {"med": statistics.median(wall[k]), "min": min(wall[k]), "cpu": statistics.median(cpu[k]),
                "cpu_min": min(cpu[k])} for k in fns}


def per_call_overhead(model, names: list[str], x: torch.Tensor, n: int = 20000) -> float:
    """Seconds one hook site costs with a no-op hook attached: the Hooks object called directly."""
    from gemmaforge.models.common.hooks import Hooks

    h = Hooks(model, [(nm, lambda t, hook: None) for nm in names])
    sites = [(int(nm.split(".")[1]), nm.split(".", 2)[2]) if nm.startswith("blocks.") else (None, nm)
             for nm in names]
    sites = (sites * (n // len(sites) + 1))[:n]
    t0 = time.perf_counter()
    for layer, name in sites:
        h(layer, name, x, "bsd")
    return (time.perf_counter() - t0) / n


def prompt_ids(tok, n: int) -> torch.Tensor:
    if tok is None:  # --random-init: random ids
        return torch.randint(0, 262_144, (1, n), generator=torch.Generator().manual_seed(n))
    text = ("The history of the city begins with a small settlement on the river, where traders from the "
            "north met farmers from the valleys. Over the centuries it grew into a busy port. ") * 40
    ids = tok.encode(text)[:n]
    assert len(ids) == n
    return torch.tensor([ids])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def section_a(model, ids, out, repeats: int) -> None:
    from gemmaforge.models.common.hooks import EAGER, hook_names

    all_points = hook_names(model)
    same_kernel = [n for n in all_points if n.split(".", 2)[-1] not in EAGER]
    noop = lambda t, hook: None  # noqa: E731
    r = interleaved({
        "plain": lambda: model(ids),
        "hooked": lambda: model.run_with_hooks(ids, fwd_hooks=[(n, noop) for n in same_kernel]),
        "plain_eager": lambda: model(ids, attn_backend="eager"),
        "hooked_all": lambda: model.run_with_hooks(ids, fwd_hooks=[(n, noop) for n in all_points]),
    }, repeats)
    out(f"## (a) no-op hooks, {ids.shape[1]}-token prompt")
    out()
    out("| variant | median ms | min ms | median CPU ms | ratio (median) | ratio (min) |")
    out("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [("plain forward (SDPA)", "plain", "plain"),
            (f"no-op hook on {len(same_kernel)} points (all but scores/pattern), SDPA", "hooked", "plain"),
            ("plain forward, eager kernel", "plain_eager", "plain"),
            (f"no-op hook on all {len(all_points)} points (all layers eager) vs eager plain", "hooked_all",
             "plain_eager")]
    for label, k, base in rows:
        out(f"| {label} | {r[k]['med'] * 1e3:.1f} | {r[k]['min'] * 1e3:.1f} | {r[k]['cpu'] * 1e3:.1f} | "
            f"{r[k]['med'] / r[base]['med']:.3f} | {r[k]['min'] / r[base]['min']:.3f} |")
    per = per_call_overhead(model, same_kernel, torch.zeros(1, ids.shape[1], model.config.hidden_size))
    out()
    out(f"One hook site with a no-op hook attached costs {per * 1e6:.2f} us (Hooks called directly): "
        f"{len(same_kernel)} sites per forward = {per * len(same_kernel) * 1e3:.2f} ms, "
        f"{100 * per * len(same_kernel) / r['plain']['min']:.2f}% of the fastest plain forward here.")
    out()


def section_b(model, hf, ids, out, repeats: int) -> None:
    import transformers

    L = model.config.num_hidden_layers
    resid = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    r = interleaved({
        "ours": lambda: model.run_with_cache(ids, names_filter=resid),
        "hf": lambda: hf(ids, use_cache=False, output_hidden_states=True),
    }, repeats)
    out(f"## (b) every resid_post vs transformers output_hidden_states=True, {ids.shape[1]} tokens, SDPA")
    out()
    out("| | median ms | min ms | median CPU ms |")
    out("| --- | ---: | ---: | ---: |")
    out(f"| gemmaforge run_with_cache({L} x hook_resid_post) | {r['ours']['med'] * 1e3:.1f} | "
        f"{r['ours']['min'] * 1e3:.1f} | {r['ours']['cpu'] * 1e3:.1f} |")
    out(f"| transformers {transformers.__version__} output_hidden_states=True | "
        f"{r['hf']['med'] * 1e3:.1f} | {r['hf']['min'] * 1e3:.1f} | {r['hf']['cpu'] * 1e3:.1f} |")
    out(f"| ratio ours / transformers | {r['ours']['med'] / r['hf']['med']:.3f} | "
        f"{r['ours']['min'] / r['hf']['min']:.3f} | {r['ours']['cpu'] / r['hf']['cpu']:.3f} |")
    out()


def tl_bridge(model, random_init: bool):
    """TransformerLens' Gemma 3 TransformerBridge over the transformers model with our weights, or None."""
    try:
        from importlib.metadata import version

        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None, None
    from conftest import hf_model_like

    hf_eager = hf_model_like(model, attn="eager").to(model.device)
    hf_eager.config.architectures = ["Gemma3ForCausalLM"]  # the bridge picks its adapter from this
    if not random_init:
        from gemmaforge.formats.resolve import embedded_dir

        # the embedded model's HF-format dir: the bridge reads the tokenizer from there
        src = str(embedded_dir())
    else:  # no checkpoint here: a config-only dir and a stand-in tokenizer (ids are given, never text)
        import tempfile

        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        src = tempfile.mkdtemp(prefix="tlcfg-")
        hf_eager.config.save_pretrained(src)
        vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                unk_token="<unk>").save_pretrained(src)
    bridge = TransformerBridge.boot_transformers(src, hf_model=hf_eager, device=str(model.device))
    return bridge, version("transformer_lens")


def section_c(model, tok, out, repeats: int, long_repeats: int, random_init: bool = False) -> None:
    bridge, tl_version = tl_bridge(model, random_init)
    dev = model.device
    out("## (c) run_with_cache of every hook point")
    out()
    out("| prompt | implementation | median s | min s | median CPU s | min CPU s | tensors cached | MB cached |")
    out("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for n, reps in ((13, repeats), (512, long_repeats)):
        x = prompt_ids(tok, n).to(dev)
        fns = {"ours": lambda x=x: model.run_with_cache(x), "plain": lambda x=x: model(x, attn_backend="eager")}
        if bridge is not None:
            fns["tl"] = lambda x=x: bridge.run_with_cache(x)
        r = interleaved(fns, reps, warmup=1)

        def row(label, k, count="", mb=""):
            out(f"| {n} tokens | {label} | {r[k]['med']:.4f} | {r[k]['min']:.4f} | {r[k]['cpu']:.4f} | "
                f"{r[k]['cpu_min']:.4f} | {count} | {mb} |")

        _, cache = model.run_with_cache(x)
        row("gemmaforge run_with_cache", "ours", len(cache),
            f"{sum(t.numel() * t.element_size() for t in cache.values()) / 2 ** 20:.0f}")
        del cache
        row("gemmaforge plain forward, eager kernel, no hooks (floor)", "plain")
        if bridge is not None:
            _, tl_cache = bridge.run_with_cache(x)
            row(f"TransformerLens {tl_version} TransformerBridge run_with_cache", "tl", len(tl_cache),
                f"{sum(t.numel() * t.element_size() for t in tl_cache.values()) / 2 ** 20:.0f}")
            del tl_cache
            ratios.append((n, {m: r["ours"][m] / r["tl"][m] for m in ("med", "min", "cpu", "cpu_min")},
                           {m: r["plain"][m] / r["tl"][m] for m in ("med", "min", "cpu", "cpu_min")}))
    out()
    if bridge is None:
        out("transformer_lens is not importable here: no TransformerLens row.")
    else:
        out("| prompt | ratio | median wall | min wall | median CPU | min CPU |")
        out("| --- | --- | ---: | ---: | ---: | ---: |")
        for n, ours, floor in ratios:
            for label, d in (("gemmaforge run_with_cache / TransformerLens", ours),
                             ("plain eager forward (floor) / TransformerLens", floor)):
                out(f"| {n} tokens | {label} | {d['med']:.3f} | {d['min']:.3f} | {d['cpu']:.3f} | {d['cpu_min']:.3f} |")
    out()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--long-repeats", type=int, default=5, help="repeats for the 512-token prompt")
    ap.add_argument("--tokens", type=int, default=13, help="prompt length for (a) and (b)")
    ap.add_argument("--sections", default="abc", help="which of (a) (b) (c) to run, e.g. 'ab'")
    ap.add_argument("--out", default=None, help="write the markdown results here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true",
                    help="the 270M config with random weights and random ids (no checkpoint needed)")
    a = ap.parse_args()
    load_before = os.getloadavg()

    import gemmaforge
    from conftest import hf_model_like  # sets 2 threads on import: --threads goes after it

    torch.set_num_threads(a.threads)

    global SYNC
    if a.device.startswith("cuda"):
        SYNC = torch.cuda.synchronize
    if a.random_init:
        model, tok = gemmaforge.from_config("gemma-3-270m", device=a.device, seed=0), None
    else:
        model = gemmaforge.from_pretrained("gemma-3-270m", device=a.device)
        tok = gemmaforge.load_tokenizer("gemma-3-270m")
    ids = prompt_ids(tok, a.tokens).to(a.device)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    with torch.no_grad():
        if "a" in a.sections:
            section_a(model, ids, out, a.repeats)
        if "b" in a.sections:
            section_b(model, hf_model_like(model, attn="sdpa").to(a.device), ids, out, a.repeats)
        if "c" in a.sections:
            section_c(model, tok, out, a.repeats, a.long_repeats, a.random_init)

    head = [
        "# Hook machinery benchmark",
        "",
        f"- machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch.set_num_threads({a.threads}); "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"- model: {'Gemma 3 270M config, random weights' if a.random_init else 'embedded Gemma 3 270M'}, "
        f"fp32, {model.device}" + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- medians and minima of {a.repeats} runs ({a.long_repeats} for 512 tokens), variants interleaved",
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_before)}, at end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
        "",
    ]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
