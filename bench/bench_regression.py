"""Regression check of the CPU headline ratios: the landed commit's benches against this tree's, in one run.

    .venv/bin/python bench/bench_regression.py [--landed /work/landed] [--rounds 3] [--out FILE]

Three ratios, each measured by the tree's OWN bench script with its OWN package (the landed
scripts run from ``LANDED/bench`` with ``PYTHONPATH=LANDED/src``, so their ``from bench_gpu_mfu
import ...`` resolves to the landed bench dir; this tree's from ``bench/`` with ``PYTHONPATH=src``):

(a) full fine-tune step of the real Gemma 3 270M, ``--seq`` 512, ``--threads`` 2, gemmaforge vs a
    plain transformers loop: tokens/s ratio (ratio of median step times; also the median of
    back-to-back pair ratios) and peak-RSS ratio (``bench_train_step.py``);
(b) LoRA r16 vs full fine-tune: speed and peak-RSS ratios (the same ``bench_train_step.py --lora``
    run: its three workers are loaded together and step in turn);
(c) greedy decode vs transformers ``generate``: tokens/s ratio (``bench_generate.py``).

Runs alternate: every round runs each bench for both trees back to back, the tree that goes first
alternating from round to round (landed first in odd rounds), so a slow spell of the machine hits
both alike. Each ratio is the median over the rounds of the per-run ratio (computed from the
per-side lines the benches print: per-step times, peak RSS, tokens/s). A current ratio passes when
it is within ``--tolerance`` (3%) of the landed one or better (higher for speed, lower for memory).
The transformers side is the same code in both trees: its absolute numbers, printed beside, show how
much the machine drifted between the landed and the current runs.

Exit status: 0 every ratio passes, 1 some ratio regressed, 2 some run failed or could not be parsed.
Every run's full output goes to ``--log-dir`` (default: a fresh temporary directory, printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CURRENT = HERE.parent

SIDE = re.compile(r"^(?P<side>gemmaforge-lora|gemmaforge|transformers)\s+step\s+(?P<step>[\d.]+)s\s+"
                  r"(?P<tps>[\d.]+) tokens/s\s+peak RSS\s+(?P<rss>[\d.]+) GiB.*?steps (?P<steps>[\d. ]+)\s*$")
GEN = re.compile(r"^\s+(?P<side>gemmaforge|transformers)\s+(?P<tps>[\d.]+) tokens/s\s*$")
SAME = re.compile(r"identical tokens: (True|False)")

# name, bench, direction (+1: higher is better, -1: lower is better), label
RATIOS = [
    ("ft_speed", "train", +1, "(a) full fine-tune tokens/s, gemmaforge / transformers (ratio of median step times)"),
    ("ft_speed_pairs", "train", +1, "(a) full fine-tune speed, median of back-to-back pair ratios"),
    ("ft_mem", "train", -1, "(a) full fine-tune peak RSS, gemmaforge / transformers"),
    ("lora_speed", "train", +1, "(b) LoRA r16 speed vs full fine-tune (full step time / LoRA step time)"),
    ("lora_mem", "train", -1, "(b) LoRA r16 peak RSS / full fine-tune peak RSS"),
    ("decode", "generate", +1, "(c) greedy decode tokens/s, gemmaforge / transformers"),
]
# absolute numbers shown for context (not judged)
CONTEXT = [
    ("gf_step_s", "train", "gemmaforge full fine-tune s/step"),
    ("hf_step_s", "train", "transformers s/step (same code in both trees: machine drift)"),
    ("lora_step_s", "train", "gemmaforge LoRA r16 s/step"),
    ("gf_rss_gib", "train", "gemmaforge full fine-tune peak RSS GiB"),
    ("hf_rss_gib", "train", "transformers peak RSS GiB (same code in both trees)"),
    ("lora_rss_gib", "train", "gemmaforge LoRA r16 peak RSS GiB"),
    ("gf_decode_tps", "generate", "gemmaforge decode tokens/s"),
    ("hf_decode_tps", "generate", "transformers decode tokens/s (same code in both trees: machine drift)"),
]


class RunError(Exception):
    pass


def parse_train(out: str) -> dict:
    sides = {}
    for line in out.splitlines():
        m = SIDE.match(line)
        if m:
            sides[m["side"]] = {"times": [float(x) for x in m["steps"].split()], "rss": float(m["rss"]),
                                "tps": float(m["tps"])}
    missing = {"gemmaforge", "transformers", "gemmaforge-lora"} - set(sides)
    if missing:
        raise RunError(f"bench_train_step output has no line for {', '.join(sorted(missing))}")
    g, h, lo = sides["gemmaforge"], sides["transformers"], sides["gemmaforge-lora"]
    med = {k: statistics.median(v["times"]) for k, v in sides.items()}
    return {
        "ft_speed": med["transformers"] / med["gemmaforge"],
        "ft_speed_pairs": statistics.median(b / a for a, b in zip(g["times"], h["times"])),
        "ft_mem": g["rss"] / h["rss"],
        "lora_speed": med["gemmaforge"] / med["gemmaforge-lora"],
        "lora_mem": lo["rss"] / g["rss"],
        "gf_step_s": med["gemmaforge"], "hf_step_s": med["transformers"], "lora_step_s": med["gemmaforge-lora"],
        "gf_rss_gib": g["rss"], "hf_rss_gib": h["rss"], "lora_rss_gib": lo["rss"],
    }


def parse_generate(out: str) -> dict:
    tps = {}
    same = None
    for line in out.splitlines():
        m = GEN.match(line)
        if m:
            tps[m["side"]] = float(m["tps"])
        s = SAME.search(line)
        if s:
            same = s.group(1) == "True"
    if set(tps) != {"gemmaforge", "transformers"}:
        raise RunError("bench_generate output has no tokens/s line for both sides")
    return {"decode": tps["gemmaforge"] / tps["transformers"], "gf_decode_tps": tps["gemmaforge"],
            "hf_decode_tps": tps["transformers"], "identical_tokens": same}


def tree_env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "src")  # this tree's package first (before the venv's editable install)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_tree(python: str, tree: Path) -> str:
    """The gemmaforge a bench of ``tree`` imports, as its scripts will (same env, script dir first)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gemmaforge; print(gemmaforge.__file__)")
    p = subprocess.run([python, "-c", code, str(tree / "bench")], env=tree_env(tree), cwd=tree,
                       capture_output=True, text=True)
    where = p.stdout.strip()
    if p.returncode or not Path(where).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"{tree}: gemmaforge imports from {where or p.stderr.strip()[-300:]}, "
                         f"not from {tree / 'src'}")
    return where


def git_desc(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        head = head if len(head) <= 80 else head[:79] + "..."
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git tree"


def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "absent"
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": tv, "python": platform.python_version(), "cores": os.cpu_count()}


def run_one(python: str, tree: Path, bench: str, args: list[str], log: Path, timeout: float) -> tuple[dict, float]:
    script = tree / "bench" / ("bench_train_step.py" if bench == "train" else "bench_generate.py")
    cmd = [python, str(script), *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=tree_env(tree), cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {' '.join(cmd)}\nTIMED OUT after {timeout:.0f} s\n{e.stdout or ''}\n{e.stderr or ''}")
        raise RunError(f"timed out after {timeout:.0f} s (log {log})") from None
    dt = time.perf_counter() - t0
    log.write_text(f"$ PYTHONPATH={tree / 'src'} {' '.join(cmd)}  (cwd {tree})\n# exit {p.returncode}, "
                   f"{dt:.0f} s\n# stdout\n{p.stdout}\n# stderr\n{p.stderr}")
    if p.returncode:
        tail = "\n".join(p.stderr.strip().splitlines()[-8:])
        raise RunError(f"exit {p.returncode} (log {log}):\n{tail}")
    return (parse_train if bench == "train" else parse_generate)(p.stdout), dt


def fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--landed", default="/work/landed", help="worktree of the landed commit (its bench/ and src/)")
    ap.add_argument("--current", default=str(CURRENT), help="the tree under test (default: this script's repo)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both trees (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every bench once per tree (>= 2)")
    ap.add_argument("--benches", default="train,generate", help="train (ratios a, b) and/or generate (c)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side of each bench_train_step run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-repeats", type=int, default=3, help="bench_generate --repeats")
    ap.add_argument("--tolerance", type=float, default=0.03, help="allowed relative loss vs landed (0.03 = 3%%)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per bench run")
    ap.add_argument("--log-dir", default=None, help="where each run's full output goes (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as markdown here")
    a = ap.parse_args()

    trees = {"landed": Path(a.landed).resolve(), "current": Path(a.current).resolve()}
    benches = [b for b in a.benches.split(",") if b]
    if not set(benches) <= {"train", "generate"}:
        raise SystemExit(f"--benches: train and/or generate, got {a.benches!r}")
    if a.rounds < 2:
        print(f"warning: --rounds {a.rounds}: a dry run; the regression check wants at least 2", flush=True)
    for name, tree in trees.items():
        for s in ("bench_train_step.py", "bench_generate.py"):
            if not (tree / "bench" / s).exists():
                raise SystemExit(f"{name} tree {tree}: no bench/{s}")
    imports = {name: check_tree(a.python, tree) for name, tree in trees.items()}
    log_dir = Path(a.log_dir) if a.log_dir else Path(tempfile.mkdtemp(prefix="gf-regression-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    mach = machine()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()
    args = {"train": ["--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads), "--lora"],
            "generate": ["--new-tokens", str(a.new_tokens), "--repeats", str(a.gen_repeats),
                         "--threads", str(a.threads)]}
    head = [
        f"- machine: {mach['cpu']}, {mach['cores']} cores visible, torch CPU capability "
        f"{mach['capability']}, torch {mach['torch']}, transformers {mach['transformers']}, "
        f"Python {mach['python']}",
        f"- landed: `{trees['landed']}` ({git_desc(trees['landed'])}), gemmaforge from `{imports['landed']}`",
        f"- current: `{trees['current']}` ({git_desc(trees['current'])}), gemmaforge from `{imports['current']}`",
        f"- benches: `bench_train_step.py {' '.join(args['train'])}`, "
        f"`bench_generate.py {' '.join(args['generate'])}`, each tree's own script and package",
        f"- {a.rounds} rounds, landed and current alternating (landed first in odd rounds); "
        f"medians over rounds; tolerance {a.tolerance:.0%}",
        f"- started {started}, load average at start {'/'.join(f'{x:.1f}' for x in load0)}; logs in `{log_dir}`",
    ]
    print("\n".join(head), flush=True)

    per_round = {name: {b: [] for b in benches} for name in trees}
    failures = []
    for r in range(a.rounds):
        order = ["landed", "current"] if r % 2 == 0 else ["current", "landed"]
        for bench in benches:
            for name in order:
                log = log_dir / f"round{r + 1}-{bench}-{name}.log"
                print(f"round {r + 1}/{a.rounds}: {bench:8s} {name:7s} ...", end=" ", flush=True)
                try:
                    res, dt = run_one(a.python, trees[name], bench, args[bench], log, a.timeout)
                except RunError as e:
                    failures.append(f"round {r + 1} {bench} {name}: {e}")
                    print(f"FAILED: {e}", flush=True)
                    continue
                per_round[name][bench].append(res)
                shown = {k: v for k, v in res.items() if k in {n for n, *_ in RATIOS}}
                print(f"{dt:4.0f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)

    def med(name: str, key: str, bench: str):
        vals = [res[key] for res in per_round[name].get(bench, []) if res.get(key) is not None]
        return (statistics.median(vals) if vals else None), vals

    lines = ["| ratio | better | landed | current | change | within "
             f"{a.tolerance:.0%} or better | landed runs | current runs |",
             "|---|---|---:|---:|---:|---|---|---|"]
    verdicts = []
    for key, bench, sign, label in RATIOS:
        if bench not in benches:
            continue
        (lm, lv), (cm, cv) = med("landed", key, bench), med("current", key, bench)
        if lm is None or cm is None:
            ok, change = None, None
        else:
            change = cm / lm - 1
            ok = cm >= lm * (1 - a.tolerance) if sign > 0 else cm <= lm * (1 + a.tolerance)
        if key != "ft_speed_pairs":  # the pair median is shown beside the headline speed, not judged
            verdicts.append(ok)
        mark = "n/a" if ok is None else ("yes" if ok else "**NO**")
        if key == "ft_speed_pairs":
            mark = f"({mark}, not judged)"
        lines.append(f"| {label} | {'higher' if sign > 0 else 'lower'} | {fmt(lm)} | {fmt(cm)} | "
                     f"{'-' if change is None else f'{change:+.1%}'} | {mark} | "
                     f"{' '.join(fmt(x) for x in lv) or '-'} | {' '.join(fmt(x) for x in cv) or '-'} |")
    ctx = ["| context (medians over rounds) | landed runs | current runs | change |", "|---|---:|---:|---:|"]
    for key, bench, label in CONTEXT:
        if bench not in benches:
            continue
        (lm, _), (cm, _) = med("landed", key, bench), med("current", key, bench)
        change = f"{cm / lm - 1:+.1%}" if lm and cm else "-"
        ctx.append(f"| {label} | {fmt(lm, 2)} | {fmt(cm, 2)} | {change} |")
    if "generate" in benches:
        same = {n: [res.get("identical_tokens") for res in per_round[n]["generate"]] for n in trees}
        ctx.append(f"| decode: identical tokens to transformers | {same['landed']} | {same['current']} | |")
    load1 = os.getloadavg()
    tail = [f"- finished {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, load average at end "
            f"{'/'.join(f'{x:.1f}' for x in load1)} on {os.cpu_count()} cores"]
    if failures:
        tail += ["", "Failed runs:", ""] + [f"- {f.splitlines()[0]}" for f in failures]
    if failures or None in verdicts:
        status, rc = "INCOMPLETE: some runs failed or could not be parsed", 2
    elif all(verdicts):
        status, rc = f"PASS: every current ratio is within {a.tolerance:.0%} of the landed one or better", 0
    else:
        status, rc = f"REGRESSION: some current ratio is more than {a.tolerance:.0%} worse than the landed one", 1
    body = ["", *lines, "", *ctx, "", *tail, "", f"**{status}**"]
    print("\n".join(body), flush=True)
    if a.out:
        cmd = " ".join([os.path.relpath(a.python), *sys.argv])
        md = ["# CPU ratios: landed vs current", "", f"- command: `{cmd}`", *head, *body]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(md) + "\n")
        print(f"wrote {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
