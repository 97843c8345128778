"""Parallel layouts against one process, through the production Trainer.

Every multi-process test spawns CPU processes with gloo (``gemmaforge.parallel.process.launch``, one
thread each) running tests/dist/workers.py, which only hands a layout (``ParallelDims`` /
``ParallelConfig``) to ``gemmaforge.train.Trainer``: the tiny Gemma 3 (the Gemma 4 MoE for expert
parallelism, the Gemma 4 E2B-like preset with per-layer embeddings and KV sharing) trains 4 AdamW
steps (fp32, packed rows, evaluation and checkpoints every 2 steps, final HF export) and must give
the single-process Trainer's loss and learning rate at every step, its validation losses and its
exported weights (<= 1e-5); for FSDP2, TP and CP the first step's fp32 gradients before clipping
(``forward_backward``, the step the Trainer runs) equal one process's too, relative to each
tensor's scale. The layouts of 2 processes share ONE launch (each launch costs seconds of
start-up), those of 4 another.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

import workers  # noqa: E402

from gemmaforge.errors import ConfigError  # noqa: E402
from gemmaforge.parallel.dims import ParallelDims  # noqa: E402
from gemmaforge.parallel.pp import split_layers  # noqa: E402
from gemmaforge.parallel.process import launch  # noqa: E402

dist_mark = pytest.mark.dist
TOL = 1e-5


def assert_same_grads(ref_grads, grads, rel=1e-5):
    """Gradients equal to the single process relative to each tensor's scale (catches scale bugs Adam hides)."""
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for k, g in ref_grads.items():
        scale = g.abs().max().item()
        d = (g - grads[k]).abs().max().item()
        assert d <= rel * scale + 1e-12, f"{k}: grad differs by {d:.3g} (scale {scale:.3g})"


def _train_losses(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _val_losses(rows):
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def assert_same_curve(single_rows, rows, steps, tol=TOL):
    """Train loss (and lr) at ``steps`` and every validation loss logged there equal the single Trainer's."""
    ref = {r["step"]: r for r in single_rows if "loss" in r}
    got = _train_losses(rows)
    assert [s for s, _ in got] == list(steps), got
    for r in rows:
        if "loss" in r:
            assert abs(r["loss"] - ref[r["step"]]["loss"]) <= tol, (r["step"], r["loss"], ref[r["step"]]["loss"])
            assert abs(r["lr"] - ref[r["step"]]["lr"]) <= 1e-12, (r["step"], r["lr"], ref[r["step"]]["lr"])
    ref_val = dict(_val_losses(single_rows))
    val = _val_losses(rows)
    assert val, "no validation rows"
    for step, v in val:
        assert abs(v - ref_val[step]) <= tol, (step, v, ref_val[step])


def assert_same_export(dir_a, dir_b, tol=TOL):
    import gemmaforge

    A = gemmaforge.from_pretrained(str(Path(dir_a) / "final")).state_dict()
    B = gemmaforge.from_pretrained(str(Path(dir_b) / "final")).state_dict()
    assert set(A) == set(B)
    worst = max((A[k] - B[k]).abs().max().item() for k in A)
    assert worst <= tol, worst


# ----------------------------------------------------------------------------- layout validation

@pytest.mark.parametrize("layout,world,needle", [
    (dict(dp_shard=2, tp=2), 2, "needs 4 processes, but the world size is 2"),
    (dict(dp_shard=1, tp=3), 3, "tp=3 does not divide num_attention_heads=4"),
    (dict(dp_shard=1, tp=4), 4, "tp=4 does not divide num_key_value_heads=2"),
    (dict(cp=3, tp=1), 4, "cp=3 x tp=1 x pp=1 = 3 does not divide the world size 4"),
    (dict(dp_shard=1, pp=8), 8, "pp=8 is more stages than the 4 decoder layers"),
    (dict(dp_shard=0), 1, "--dp-shard must be a positive integer"),
    (dict(dp_shard=1, cp=2, pp=2), 4, "pipeline parallelism (pp=2) cannot be combined with context parallelism"),
])
def test_wrong_layout_is_one_clear_line(layout, world, needle):
    cfg = workers.tiny_config()
    with pytest.raises(ConfigError) as e:
        ParallelDims(**layout).validate(world, cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def _moe_config(**over):
    import gemmaforge

    return gemmaforge.preset(workers.MOE_PRESET, **over)  # 6 experts


@pytest.mark.parametrize("layout,world,moe,needle", [
    (dict(dp_shard=4, ep=3), 4, True, "parallel layout: ep=3 does not divide dp_shard=4 (expert parallelism borrows"),
    (dict(ep=3), 2, True, "ep=3 does not divide dp_shard=2"),
    (dict(dp_shard=4, ep=4), 4, True, "parallel layout: ep=4 does not divide num_experts=6"),
    (dict(dp_shard=2, ep=2), 2, False, "parallel layout: --ep 2 needs a mixture-of-experts model, and Gemma3Config"),
    (dict(dp_shard=2, tp=2, ep=2), 4, True, "expert parallelism (ep=2) cannot be combined with --tp 2 yet"),
    (dict(dp_shard=2, pp=2, ep=2), 4, True, "expert parallelism (ep=2) cannot be combined with --pp 2 yet"),
    (dict(dp_shard=2, ep=0), 2, True, "--ep must be a positive integer"),
])
def test_wrong_expert_parallel_layout_is_one_clear_line(layout, world, moe, needle):
    from gemmaforge.parallel.dims import LayoutError

    cfg = _moe_config() if moe else workers.tiny_config()
    with pytest.raises(LayoutError) as e:
        ParallelDims(**layout).validate(world, cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_expert_parallel_layout_borrows_ranks_from_dp_shard():
    """ep divides dp_shard and leaves the world size alone; ep=1 is today's layout (and description)."""
    d = ParallelDims(ep=2).validate(4, _moe_config())
    assert (d.dp_shard, d.ep, d.dp_mod_ep, d.world_size, d.fsdp_size) == (4, 2, 2, 4, 4)
    assert d.describe() == "dp_shard=4 x cp=1 x tp=1 x pp=1 (ep=2 within dp_shard)"
    assert ParallelDims(dp_shard=2).validate(2, _moe_config()).describe() == "dp_shard=2 x cp=1 x tp=1 x pp=1"
    assert ParallelDims(dp_shard=2, cp=2, ep=2).validate(4, _moe_config(), seq_len=32).ep == 2
    # without a model config only the layout itself is checked; the dense-model check comes with the config
    assert ParallelDims(ep=2).validate(2).ep == 2


def test_train_cli_exposes_ep_flag_and_needs_torchrun_layout_error():
    from gemmaforge.cli.main import build_parser

    assert build_parser().parse_args(["train"]).ep == 1
    a = build_parser().parse_args(["train", "--dp-shard", "4", "--ep", "2"])
    assert (a.dp_shard, a.ep) == (4, 2)


def test_layout_resolves_dp_shard_and_cp_divides_seq_len():
    d = ParallelDims(tp=2).validate(8, workers.tiny_config())
    assert (d.dp_shard, d.tp, d.world_size, d.fsdp_size) == (4, 2, 8, 4)
    with pytest.raises(ConfigError, match="cp=2 does not divide --seq-len 33"):
        ParallelDims(cp=2).validate(2, seq_len=33)


def test_pipeline_schedule_names_and_wrong_layouts_are_layout_errors():
    from gemmaforge.parallel.dims import LayoutError, pipeline_schedule_name

    assert [pipeline_schedule_name(n) for n in ("gpipe", "GPipe", "1f1b", "1F1B")] == ["GPipe", "GPipe", "1F1B", "1F1B"]
    with pytest.raises(LayoutError, match="--pp-schedule must be one of gpipe, 1f1b"):
        pipeline_schedule_name("interleaved")
    with pytest.raises(LayoutError):  # every layout error is one the CLI may print on rank 0 only
        ParallelDims(dp_shard=2, tp=2).validate(2)


def test_split_layers_is_balanced_and_contiguous():
    assert [list(r) for r in split_layers(4, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in split_layers(18, 4)] == [list(range(0, 5)), list(range(5, 10)),
                                                       list(range(10, 14)), list(range(14, 18))]


@dist_mark
def test_wrong_layout_fails_at_start_in_every_process():
    errs = launch(workers.layout_error, 2, dict(dp_shard=1, tp=4))
    assert errs == ["parallel layout dp_shard=1 x cp=1 x tp=4 x pp=1 needs 4 processes, but the world size is 2"] * 2


@dist_mark
def test_init_after_sharding_is_layout_independent():
    """materialize(seed=...) on FSDP x2 and on TP x2 gives exactly the weights of one process."""
    from gemmaforge.parallel.init import build_meta_model, materialize

    model = materialize(build_meta_model(workers.tiny_config()), "cpu", seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after to_empty
    single = model.state_dict()
    fsdp, tp = launch(workers.materialized_states, 2, [dict(dp_shard=2), dict(dp_shard=1, tp=2)])[0]
    for sd in (fsdp, tp):
        assert set(sd) == set(single)
        for k in single:
            assert torch.equal(sd[k], single[k]), k
    assert single["model.layers.0.self_attn.q_proj.weight"].std() > 0.01  # actually initialised
    assert torch.equal(single["model.norm.weight"], torch.zeros(64))  # the model's own rule (zero-centred norms)


# ----------------------------------------------------------------------------- the trainer, every layout

AC = dict(activation_checkpointing=True)
CP_ROWS = dict(micro_batch_rows=1)
CKPT = "{%s}/checkpoints/step-000002"

TWO = {
    # name: spec (workers.run_trainers); run in this order in ONE 2-process launch
    "fsdp": dict(layout=dict(dp_shard=2), grads=True),
    "fsdp_ac": dict(layout=dict(dp_shard=2), pcfg=AC),
    "tp": dict(layout=dict(dp_shard=1, tp=2), grads=True),
    "tp_ac": dict(layout=dict(dp_shard=1, tp=2), pcfg=AC),
    # one row per micro-batch: each rank holds half of every row, documents cross the cut (see below)
    "cp": dict(layout=dict(dp_shard=1, cp=2), over=CP_ROWS, grads=True),
    "cp_ac": dict(layout=dict(dp_shard=1, cp=2), over=CP_ROWS, pcfg=AC, grads=True),
    "cp_forwards": dict(layout=dict(dp_shard=1, cp=2), over=CP_ROWS, recompute=True),
    "cp_ac_forwards": dict(layout=dict(dp_shard=1, cp=2), over=CP_ROWS, pcfg=AC, recompute=True),
    "pp_1f1b": dict(layout=dict(dp_shard=1, pp=2), pcfg=dict(pp_schedule="1f1b")),
    "pp_gpipe": dict(layout=dict(dp_shard=1, pp=2), pcfg=dict(pp_schedule="gpipe")),
    "pp_1f1b_ac": dict(layout=dict(dp_shard=1, pp=2), pcfg=dict(pp_schedule="1f1b", **AC)),
    "ep": dict(layout=dict(dp_shard=2, ep=2), model="moe"),
    "ep_ac": dict(layout=dict(dp_shard=2, ep=2), model="moe", pcfg=AC),
    "e2b_fsdp": dict(layout=dict(dp_shard=2), model="e2b"),
    "lora_fsdp": dict(layout=dict(dp_shard=2), over=dict(lora_rank=4)),
    "nan_fsdp": dict(layout=dict(dp_shard=2), nan=dict(module="model.layers.1.mlp", step=2, rank=0)),
    # checkpoints move between layouts (saved at step 2, resumed for steps 3-4)
    "tp_from_fsdp": dict(layout=dict(dp_shard=1, tp=2), over=dict(resume=CKPT % "fsdp")),
    "pp_gpipe_from_fsdp": dict(layout=dict(dp_shard=1, pp=2), pcfg=dict(pp_schedule="gpipe"),
                               over=dict(resume=CKPT % "fsdp")),
    "fsdp_from_pp": dict(layout=dict(dp_shard=2), over=dict(resume=CKPT % "pp_1f1b")),
    "fsdp_from_ep": dict(layout=dict(dp_shard=2), model="moe", over=dict(resume=CKPT % "ep")),
    # resume picks the newest complete checkpoint numerically, checks the fingerprint, refuses damage
    "resume_numeric": dict(layout=dict(dp_shard=2), over=dict(resume="{resume_numeric_src}"),
                           copy=[(CKPT % "fsdp", "{resume_numeric_src}/checkpoints/step-9"),
                                 ("{fsdp}/checkpoints/step-000004", "{resume_numeric_src}/checkpoints/step-10")]),
    "resume_other_seq_len": dict(layout=dict(dp_shard=2), over=dict(resume=CKPT % "fsdp", seq_len=16)),
    "resume_truncated_shard": dict(layout=dict(dp_shard=2), over=dict(resume="{trunc_src}/checkpoints/step-000002"),
                                   copy=[(CKPT % "fsdp", "{trunc_src}/checkpoints/step-000002")],
                                   truncate=["{trunc_src}/checkpoints/step-000002/__1_0.distcp"]),
    "resume_truncated_metadata": dict(layout=dict(dp_shard=2),
                                      over=dict(resume="{trunc_md_src}/checkpoints/step-000002"),
                                      copy=[(CKPT % "fsdp", "{trunc_md_src}/checkpoints/step-000002")],
                                      truncate=["{trunc_md_src}/checkpoints/step-000002/.metadata"]),
    # layout errors: one line on every rank
    "pp_1f1b_too_few_rows": dict(layout=dict(dp_shard=1, pp=2), pcfg=dict(pp_schedule="1f1b"),
                                 over=dict(batch_tokens=32)),
    "ep_dense": dict(layout=dict(dp_shard=2, ep=2)),
    "lora_tp": dict(layout=dict(dp_shard=1, tp=2), over=dict(lora_rank=4)),
}

FOUR = {
    "fsdp_tp": dict(layout=dict(dp_shard=2, tp=2), grads=True),
    "fsdp_tp_ac": dict(layout=dict(dp_shard=2, tp=2), pcfg=AC),
    "pp_fsdp": dict(layout=dict(dp_shard=2, pp=2), pcfg=dict(pp_schedule="1f1b")),
}

EXTRA_DIRS = ("resume_numeric_src", "trunc_src", "trunc_md_src")


def _specs(runs: dict, dirs: dict) -> list:
    def fill(v):
        if isinstance(v, str):
            return v.format(**dirs)
        if isinstance(v, (list, tuple)):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v

    return [dict(fill(spec), out=dirs[name]) for name, spec in runs.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process Trainer runs and, in one 2-process and one 4-process launch, the Trainer at
    every layout. Returns ``(singles, results by name, dirs by name)``."""
    d = tmp_path_factory.mktemp("layouts")
    dirs = {name: str(d / name) for name in (*TWO, *FOUR, *EXTRA_DIRS)}
    singles = {}
    for kind, over in (("gemma3", {}), ("moe", {}), ("e2b", {}), ("lora", dict(lora_rank=4))):
        out = str(d / f"single_{kind}")
        summary, metrics, grads = workers.run_single(out, "gemma3" if kind == "lora" else kind,
                                                     grads=kind == "gemma3", **over)
        singles[kind] = dict(summary=summary, metrics=metrics, grads=grads, out=out)
    results = dict(zip(TWO, launch(workers.run_trainers, 2, _specs(TWO, dirs))[0]))
    results.update(zip(FOUR, launch(workers.run_trainers, 4, _specs(FOUR, dirs))[0]))
    return singles, results, dirs


def _ok(results, name):
    res = results[name]
    assert "error" not in res, res
    return res


@dist_mark
@pytest.mark.parametrize("name", ["fsdp", "fsdp_ac", "tp", "tp_ac", "cp", "cp_ac", "pp_1f1b", "pp_gpipe",
                                  "pp_1f1b_ac", "fsdp_tp", "fsdp_tp_ac", "pp_fsdp"])
def test_trainer_at_every_layout_equals_one_process(runs, name):
    """FSDP2 x 2, TP x 2, CP x 2 (packed documents across the shard boundary), PP x 2 (1F1B and GPipe),
    FSDP2 x 2 + TP x 2 and PP x 2 + FSDP2 x 2, with and without activation checkpointing: every train
    and validation loss, the learning rate and the exported HF model equal the single-process
    Trainer's; checkpoints are complete."""
    singles, results, dirs = runs
    res = _ok(results, name)
    assert_same_curve(singles["gemma3"]["metrics"], res["metrics"], [1, 2, 3, 4])
    assert_same_export(singles["gemma3"]["out"], dirs[name])
    ck = Path(dirs[name]) / "checkpoints"
    assert sorted(c.name for c in ck.iterdir() if (c / "meta.json").exists()) == ["step-000002", "step-000004"]
    assert (Path(dirs[name]) / "loss.png").exists()
    if "ac" in name.split("_"):
        assert any("activation_checkpointing(every=1)" in m for m in res["log"]), res["log"]


@dist_mark
@pytest.mark.parametrize("name", ["fsdp", "tp", "cp", "cp_ac", "fsdp_tp"])
def test_first_step_fp32_gradients_before_clipping_equal_one_process(runs, name):
    """The gradients the step hands to clipping, whole, equal one process's relative to each tensor's
    scale (a scale bug, e.g. a mean where the sum belongs, is far above that; AdamW and clipping after
    it would hide one)."""
    singles, results, _ = runs
    assert_same_grads(singles["gemma3"]["grads"], _ok(results, name)["grads"])


def test_context_parallel_runs_split_documents_across_the_shard_boundary():
    """The premise of the CP x 2 runs: packed documents cross the middle of a row (where the two ranks'
    shards meet), and a shard is no shorter than the sliding window, so attention reads keys of the
    other rank."""
    from gemmaforge.data import pack_documents

    rows = pack_documents(workers.trainer_inputs()["train_docs"], workers.SEQ_LEN)
    cut = workers.SEQ_LEN // 2
    crossing = sum(any(s < cut < e for s, e in zip(r.cu_seqlens[:-1].tolist(), r.cu_seqlens[1:].tolist()))
                   for r in rows)
    assert crossing >= len(rows) // 2, (crossing, len(rows))
    assert cut >= workers.MODELS["gemma3"][1]["sliding_window"]


@dist_mark
def test_context_parallel_checkpointing_really_recomputes(runs):
    """Under CP x 2 with activation checkpointing every decoder layer runs twice per micro-batch (the
    forward, then the recompute in the backward: the key exchange keeps nothing between calls, so
    checkpointing is not skipped as for a KV cache), once without; loss and gradients are the same."""
    singles, results, _ = runs
    n_layers, micro_batches = 4, 4
    assert _ok(results, "cp_forwards")["forwards"] == n_layers * micro_batches
    assert _ok(results, "cp_ac_forwards")["forwards"] == 2 * n_layers * micro_batches
    assert_same_grads(_ok(results, "cp")["grads"], _ok(results, "cp_ac")["grads"])


@dist_mark
@pytest.mark.parametrize("name", ["ep", "ep_ac"])
def test_expert_parallel_equals_one_process(runs, name):
    """``dp_shard=2, ep=2`` on the tiny Gemma 4 MoE (each rank holds 3 of the 6 experts of every MoE
    layer): losses, lr, the first step's gradient norm (experts included) and the exported model
    (expert tensors gathered whole) equal the single-process Trainer's."""
    import gemmaforge

    singles, results, dirs = runs
    res = _ok(results, name)
    assert any("ep=2 (experts sharded over ep" in m for m in res["log"]), res["log"]
    assert_same_curve(singles["moe"]["metrics"], res["metrics"], [1, 2, 3, 4])
    ref = {r["step"]: r for r in singles["moe"]["metrics"] if "grad_norm" in r}
    first = next(r for r in res["metrics"] if "grad_norm" in r)
    assert abs(first["grad_norm"] - ref[first["step"]]["grad_norm"]) <= 1e-5 * ref[first["step"]]["grad_norm"]
    assert_same_export(singles["moe"]["out"], dirs[name])
    sd = gemmaforge.from_pretrained(str(Path(dirs[name]) / "final")).state_dict()
    assert tuple(sd["model.layers.0.experts.gate_up_proj"].shape) == (6, 48, 64)  # all experts, not a rank's 3


@dist_mark
def test_gemma4_kv_sharing_and_per_layer_embeddings_under_fsdp2_equal_one_process(runs):
    """The E2B-like tiny Gemma 4 (per-layer embeddings, KV-sharing layers reading a store layer's keys
    through the forward context) trains under FSDP2 x 2 exactly as in one process."""
    singles, results, dirs = runs
    assert_same_curve(singles["e2b"]["metrics"], _ok(results, "e2b_fsdp")["metrics"], [1, 2, 3, 4])
    assert_same_export(singles["e2b"]["out"], dirs["e2b_fsdp"])


@dist_mark
def test_lora_under_fsdp2_equals_one_process_lora(runs):
    """LoRA (rank 4, the seven projections) under FSDP2 x 2: the curve, the merged export and the PEFT
    adapter equal single-process LoRA's."""
    from safetensors.torch import load_file

    singles, results, dirs = runs
    res = _ok(results, "lora_fsdp")
    assert_same_curve(singles["lora"]["metrics"], res["metrics"], [1, 2, 3, 4])
    assert_same_export(singles["lora"]["out"], dirs["lora_fsdp"])
    a = load_file(str(Path(singles["lora"]["out"]) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(dirs["lora_fsdp"]) / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and len(a) == 4 * 7 * 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0, msg=k)
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # the adapters trained


@dist_mark
def test_nan_under_fsdp2_skips_the_step_and_names_the_module(runs):
    """A NaN born in rank 0's forward of ``model.layers.1.mlp`` at step 2: every rank skips the step
    (nothing is clamped), the metrics row names the module and the rank, the other steps train."""
    _, results, _ = runs
    rows = [r for r in _ok(results, "nan_fsdp")["metrics"] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    bad = rows[1]
    assert bad.get("skipped") is True, bad
    assert "non-finite (nan) in forward of model.layers.1.mlp" in bad["reason"] and "on rank 0" in bad["reason"], bad
    assert not any(r.get("skipped") for r in (rows[0], rows[2], rows[3]))


@dist_mark
@pytest.mark.parametrize("name", ["tp_from_fsdp", "pp_gpipe_from_fsdp", "fsdp_from_pp"])
def test_checkpoints_resume_across_layouts(runs, name):
    """A checkpoint saved at one layout (step 2) resumes at another: steps 3-4, their validation and
    the final model continue the single-process curve."""
    singles, results, dirs = runs
    res = _ok(results, name)
    assert any("resumed from" in m and "at step 2 (saved at" in m for m in res["log"]), res["log"]
    assert_same_curve(singles["gemma3"]["metrics"], res["metrics"], [3, 4])
    assert_same_export(singles["gemma3"]["out"], dirs[name])


@dist_mark
def test_expert_parallel_checkpoint_resumes_at_fsdp(runs):
    singles, results, dirs = runs
    res = _ok(results, "fsdp_from_ep")
    assert any("resumed from" in m and "(ep=2 within dp_shard)" in m for m in res["log"]), res["log"]
    assert_same_curve(singles["moe"]["metrics"], res["metrics"], [3, 4])
    assert_same_export(singles["moe"]["out"], dirs["fsdp_from_ep"])


@dist_mark
def test_fsdp2_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The FSDP2 x 2 checkpoint of step 2 resumes in one plain process on the same curve."""
    from gemmaforge.train import read_metrics

    singles, _, dirs = runs
    out = str(tmp_path / "single_from_fsdp")
    summary = workers.make_trainer(out, resume=str(Path(dirs["fsdp"]) / "checkpoints" / "step-000002")).run()
    assert "val_after" in summary
    assert_same_curve(singles["gemma3"]["metrics"], read_metrics(f"{out}/metrics.jsonl"), [3, 4])
    assert_same_export(singles["gemma3"]["out"], out)


@dist_mark
def test_distributed_resume_picks_the_newest_numerically_and_refuses_what_does_not_fit(runs):
    """``--resume RUN_DIR`` takes the newest complete checkpoint by step number (step-10 after step-9,
    not lexicographically); a checkpoint of another training shape (--seq-len) or with a truncated
    shard or metadata file is refused with one line on every rank."""
    singles, results, dirs = runs
    res = _ok(results, "resume_numeric")
    assert any("resumed from" in m and m.split(" at step ")[0].endswith("step-10") for m in res["log"]), res["log"]
    err = results["resume_other_seq_len"]["error"]
    assert "incompatible checkpoint: seq_len (checkpoint 32, expected 16)" in err and "\n" not in err, err
    err = results["resume_truncated_shard"]["error"]
    assert "__1_0.distcp" in err and "truncated" in err and "\n" not in err, err
    err = results["resume_truncated_metadata"]["error"]
    assert ".metadata" in err and "truncated" in err and "\n" not in err, err


@dist_mark
def test_layout_errors_in_the_trainer_are_one_line(runs):
    results = runs[1]
    msg = results["pp_1f1b_too_few_rows"]["error"]
    assert msg.startswith("parallel layout: the 1F1B schedule needs at least pp=2 micro-batches per step") and \
        "--pp-schedule gpipe" in msg and "\n" not in msg, msg
    msg = results["ep_dense"]["error"]
    assert msg.startswith("parallel layout: --ep 2 needs a mixture-of-experts model") and "\n" not in msg, msg
    msg = results["lora_tp"]["error"]
    assert msg.startswith("parallel layout: LoRA adapters are not sharded by tensor parallelism") and \
        "\n" not in msg, msg


def test_train_cli_exposes_pp_flags():
    from gemmaforge.cli.main import build_parser

    a = build_parser().parse_args(["train", "--pp", "2", "--pp-schedule", "GPipe", "--dp-shard", "1"])
    assert (a.pp, a.pp_schedule, a.dp_shard) == (2, "gpipe", 1)
    assert build_parser().parse_args(["train"]).pp_schedule == "1f1b"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--pp-schedule", "zigzag"])


def test_train_cli_layout_without_torchrun_is_one_line(tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--pp", "2", "--out", str(tmp_path / "o"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("gemmaforge: error: parallel layout dp_shard=1 x cp=1 x tp=1 x pp=2 needs 2 "
                                "processes: run it under torchrun --nproc-per-node 2 -m gemmaforge train ..."), r.stderr


@dist_mark
def test_torchrun_wrong_pipeline_layout_fails_at_start_with_one_line(tmp_path):
    """Under torchrun every rank hits the same layout error before any data or model is loaded;
    rank 0 alone prints it (torchrun then reports the failed workers)."""
    import subprocess

    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gemmaforge",
                        "train", "--data", str(data), "--out", str(tmp_path / "o"), "--pp", "2", "--pp-schedule",
                        "1f1b", "--seq-len", "64", "--batch-tokens", "64", "--model", str(tmp_path / "not-loaded")],
                       capture_output=True, text=True, env=env, timeout=300)
    ours = [l for l in r.stderr.splitlines() if l.startswith("gemmaforge: error:")]
    assert r.returncode != 0
    assert ours == ["gemmaforge: error: parallel layout: the 1F1B schedule needs at least pp=2 micro-batches per "
                    "step, but each pipeline gets 1 row(s) (--batch-tokens 64 / --seq-len 64 / dp_shard 1); raise "
                    "--batch-tokens or use --pp-schedule gpipe"], r.stderr
    assert "src/gemmaforge" not in r.stderr  # no traceback of ours
    assert not (tmp_path / "o").exists()  # failed before the run directory was made


# ----------------------------------------------------------------------------- scoring, mixed precision

@pytest.fixture(scope="module")
def score_and_precision(tmp_path_factory):
    """One 2-process launch: ``score`` under FSDP2 x 2 and TP x 2; another: one FSDP2 bf16/fp32
    mixed-precision Trainer step."""
    out = str(tmp_path_factory.mktemp("mp") / "run")
    return launch(workers.score_layouts, 2), launch(workers.mixed_precision_step, 2, out)[0]


@dist_mark
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_score_under_fsdp2_and_tp_matches_single_process(score_and_precision, layout):
    """gemmaforge.score (soft-capped logits, temperature 0.7, chunked head) under FSDP2 x 2 (each rank
    scores its own packed row; FSDP sums the gradients) and TP x 2: per-token log-probs and entropies
    equal one process's (<= 1e-5), and so do the gradients of a weighted sum of them."""
    scored = score_and_precision[0]
    ref_rows, ref_grads = workers.score_single()
    if layout == "fsdp":  # rank r scored row r
        rows = [scored[r][layout][0][0] for r in range(2)]
    else:
        rows = scored[0][layout][0]
    grads = scored[0][layout][1]
    for (lp, ent, valid), (rlp, rent, rvalid) in zip(rows, ref_rows):
        assert torch.equal(valid, rvalid) and int(valid.sum()) > 20
        assert rlp[valid].min() < -3  # real distributions, not a degenerate check
        torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, rent, atol=1e-5, rtol=0)
    assert_same_grads(ref_grads, grads)


@dist_mark
def test_fsdp2_mixed_precision_bf16_params_fp32_reduce_runs_a_step(score_and_precision, tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on CPU gloo through the Trainer: the step
    computes in bf16 (its loss differs from fp32's, slightly), keeps fp32 sharded parameters and fp32
    gradients close to the fp32 ones, and the optimizer step moves the weights."""
    mp = score_and_precision[1]
    single = workers.make_trainer(str(tmp_path / "single"), steps=1)
    ref = workers.first_step_grads(single)
    ref_loss = single.train_step()["loss"]
    assert 1e-6 < abs(mp["loss"] - ref_loss) < 1e-2, (mp["loss"], ref_loss)
    assert mp["dtypes"] == {(torch.float32, torch.float32)}
    num = sum((mp["grads"][k] - g).pow(2).sum() for k, g in ref.items()).sqrt()
    den = sum(g.pow(2).sum() for g in ref.values()).sqrt()
    # bf16 compute: a few % of the gradient; a scale bug (mean instead of sum: 50%) is far above
    assert num / den < 0.1, float(num / den)
    assert 1e-4 < mp["moved"] < 1e-2  # ~lr: Adam's first step
