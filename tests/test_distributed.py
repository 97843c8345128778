"""Parallel layouts against one process: FSDP2, TP, FSDP2 x TP, CP, PP, distributed checkpoints.

Every multi-process test spawns CPU processes with gloo (``gemmaforge.parallel.process.launch``, one
thread each) running tests/dist/workers.py: the tiny Gemma 3 trains 4 AdamW steps (fp32, packed
rows with cu_seqlens, chunked cross-entropy summed over valid tokens / the step's global valid-token
count, grad clipping) and must give the single-process loss after every step and the same final
weights (<= 1e-5). The trainer tests run several DistributedTrainer layouts (FSDP2, TP, PP with
GPipe/1F1B, resumes across layouts) in ONE launch against the single-process Trainer; ``score`` and
the FSDP2 mixed-precision step share another launch; expert parallelism (``dp_shard=2, ep=2`` on the
tiny Gemma 4 MoE, its checkpoint resumed at EP and at FSDP2) one more: each launch costs seconds of
start-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

import workers  # noqa: E402

from gemmaforge.parallel.process import launch  # noqa: E402
from gemmaforge.errors import ConfigError  # noqa: E402
from gemmaforge.parallel.dims import ParallelDims
from gemmaforge.parallel.pp import split_layers  # noqa: E402

dist_mark = pytest.mark.dist
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    """The single-process run: (losses per step, final state dict)."""
    return workers.train_single()


def assert_same_run(ref, out, tol=TOL):
    ref_losses, ref_sd = ref[0], ref[1]
    losses, sd = out[0], out[1]
    assert len(losses) == len(ref_losses)
    for step, (a, b) in enumerate(zip(ref_losses, losses), 1):
        assert abs(a - b) <= tol, f"step {step}: loss {b} vs single-process {a}"
    assert set(sd) == set(ref_sd), set(sd) ^ set(ref_sd)
    for k in ref_sd:
        d = (ref_sd[k].float() - sd[k].float()).abs().max().item()
        assert d <= tol, f"{k}: max |diff| {d:.3g} after {len(losses)} steps"


def assert_same_grads(ref_grads, grads, rel=1e-5):
    """Gradients equal to the single process relative to each tensor's scale (catches scale bugs Adam hides)."""
    for k, g in ref_grads.items():
        scale = g.abs().max().item()
        d = (g - grads[k]).abs().max().item()
        assert d <= rel * scale + 1e-12, f"{k}: grad differs by {d:.3g} (scale {scale:.3g})"


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


# ----------------------------------------------------------------------------- data-parallel / tensor-parallel

@dist_mark
def test_fsdp2_x2_matches_single_process(reference):
    out = launch(workers.train_parallel, 2, dict(dp_shard=2))[0]
    assert_same_run(reference, out)


@dist_mark
def test_tp_x2_matches_single_process(reference):
    out = launch(workers.train_parallel, 2, dict(dp_shard=1, tp=2), workers.STEPS, 0, "load", False,
                 None, None, None, 0, None, True)[0]
    assert_same_run(reference, out)
    assert_same_grads(workers.grads_single(), out[2])


@dist_mark
def test_fsdp2_x2_tp_x2_with_activation_checkpointing_matches_single_process(reference):
    out = launch(workers.train_parallel, 4, dict(dp_shard=2, tp=2), workers.STEPS, 0, "load", True,
                 None, None, None, 0, None, True)[0]
    assert_same_run(reference, out)
    assert_same_grads(workers.grads_single(), out[2])


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


# ----------------------------------------------------------------------------- checkpoints

@dist_mark
def test_dcp_saved_at_2_ranks_resumes_at_1_rank_on_the_same_curve_and_exports_hf(reference, tmp_path):
    import gemmaforge

    half = workers.STEPS // 2
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    first = launch(workers.train_parallel, 2, dict(dp_shard=2), half, 0, "load", False, str(ckpt), str(hf))[0]
    assert (ckpt / "meta.json").exists() and (hf / "model.safetensors").exists()
    second = workers.resume_single(str(ckpt), workers.STEPS - half, half)
    assert_same_run(reference, (first[0] + second[0], second[1]))
    # the exported single HF model holds the sharded run's weights at the save point
    exported = gemmaforge.from_pretrained(str(hf)).state_dict()
    for k, v in first[1].items():
        assert torch.equal(exported[k], v), k


def test_dcp_refuses_an_incomplete_checkpoint(tmp_path):
    from gemmaforge.train.checkpointer import load_distributed
    from gemmaforge.errors import CheckpointError

    (tmp_path / "ck").mkdir()
    model = gemmaforge_tiny()
    with pytest.raises(CheckpointError, match="not a complete distributed checkpoint"):
        load_distributed(tmp_path / "ck", model)


def test_dcp_optimizer_groups_are_saved_per_parameter_and_old_versions_refused(tmp_path):
    """The optimizer state is flattened per parameter (each rank saves the group settings of its own
    parameters): a round trip into an optimizer whose groups list the parameters in another order
    and with other settings restores every parameter's lr/weight decay and moments; a checkpoint of
    another format version is refused in one line."""
    import json

    from gemmaforge.train.checkpointer import load_distributed, save_distributed
    from gemmaforge.errors import CheckpointError

    model = gemmaforge_tiny()
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": mats, "lr": 1e-3, "weight_decay": 0.1},
                             {"params": vecs, "lr": 5e-4, "weight_decay": 0.0}])
    model(torch.tensor([[3, 4, 5, 6]])).float().pow(2).mean().backward()
    opt.step()
    save_distributed(tmp_path / "ck", model, opt, extra={"step": 1})
    names = {id(p): n for n, p in model.named_parameters()}
    want = {names[id(p)]: (g["lr"], g["weight_decay"], opt.state[p]["exp_avg"].clone())
            for g in opt.param_groups for p in g["params"]}

    model2 = gemmaforge_tiny()
    mats2 = [p for p in model2.parameters() if p.dim() >= 2]
    vecs2 = [p for p in model2.parameters() if p.dim() < 2]
    opt2 = torch.optim.AdamW([{"params": vecs2, "lr": 9.0, "weight_decay": 9.0},
                              {"params": mats2, "lr": 9.0, "weight_decay": 9.0}])
    assert load_distributed(tmp_path / "ck", model2, opt2) == {"step": 1}
    names2 = {id(p): n for n, p in model2.named_parameters()}
    got = {names2[id(p)]: (g["lr"], g["weight_decay"], opt2.state[p]["exp_avg"])
           for g in opt2.param_groups for p in g["params"]}
    assert got.keys() == want.keys()
    for n, (lr, wd, m) in want.items():
        assert got[n][:2] == (lr, wd), n
        torch.testing.assert_close(got[n][2], m, rtol=0, atol=0, msg=n)

    meta = tmp_path / "ck" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 1}))
    with pytest.raises(CheckpointError, match="format version 1"):
        load_distributed(tmp_path / "ck", model2, opt2)


def gemmaforge_tiny():
    import gemmaforge

    return gemmaforge.from_config(workers.tiny_config(), seed=0)


# ----------------------------------------------------------------------------- context parallelism

def _docs_cross_shard_boundary(rows, cp: int) -> bool:
    for r in rows:
        T = r.seq_len
        cuts = [T * i // cp for i in range(1, cp)]
        cu = r.cu_seqlens.tolist()
        for c in cuts:
            for s, e in zip(cu[:-1], cu[1:]):
                if s < c < e and e - s > 1:
                    return True
    return False


@dist_mark
def test_cp_x2_matches_single_process(reference):
    rows = workers.make_rows(0)
    cfg = workers.tiny_config()
    # the premise: shards longer than the sliding window, documents crossing the shard boundary
    assert workers.SEQ_LEN // 2 > cfg.sliding_window
    assert _docs_cross_shard_boundary(rows, 2)
    out = launch(workers.train_parallel, 2, dict(dp_shard=1, cp=2), workers.STEPS, 0, "load", False,
                 None, None, None, 0, None, True)[0]
    assert_same_run(reference, out)
    assert_same_grads(workers.grads_single(), out[2])


# ----------------------------------------------------------------------------- pipeline parallelism

# PP x 2 alone (1F1B for 4 steps, GPipe resumed from checkpoints) runs through the trainer below
# (test_distributed_trainer_pp_x2_matches_single_trainer); here the Pipeline API itself, with FSDP
# inside each stage (4 processes).

@dist_mark
def test_pp_x2_fsdp2_x2_matches_single_process(reference):
    out = launch(workers.train_pipeline, 4, dict(dp_shard=2, pp=2), "1F1B")[0]
    assert_same_run(reference, out)


# ----------------------------------------------------------------------------- the trainer

TRAINER_RUNS = {
    # name: (layout, TrainConfig overrides, ParallelConfig kwargs); run in this order in ONE launch
    "fsdp": (dict(dp_shard=2), dict(), None),
    "tp_from_fsdp": (dict(dp_shard=1, tp=2), dict(resume="{fsdp}/checkpoints/step-000002"), None),
    "pp_1f1b": (dict(dp_shard=1, pp=2), dict(), dict(pp_schedule="1f1b")),
    "pp_gpipe_from_pp": (dict(dp_shard=1, pp=2), dict(resume="{pp_1f1b}/checkpoints/step-000002"),
                         dict(pp_schedule="gpipe")),
    "pp_gpipe_from_fsdp": (dict(dp_shard=1, pp=2), dict(resume="{fsdp}/checkpoints/step-000002"),
                           dict(pp_schedule="gpipe")),
    "fsdp_from_pp": (dict(dp_shard=2), dict(resume="{pp_1f1b}/checkpoints/step-000002"), None),
    "pp_1f1b_too_few_rows": (dict(dp_shard=1, pp=2), dict(batch_tokens=32), dict(pp_schedule="1f1b")),
}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The single-process Trainer and, in one 2-process launch, DistributedTrainer runs at several
    layouts (4 steps, cosine schedule, evaluation and a checkpoint every 2 steps, final HF export).
    Returns ``(single metrics, {name: (summary, metrics, rank-0 log) or ("error", line)}, {name: dir})``."""
    d = tmp_path_factory.mktemp("trainers")
    _, single = workers.run_trainer_single(str(d / "single"))
    dirs = {name: str(d / name) for name in TRAINER_RUNS}
    specs = []
    for name, (layout, over, pcfg) in TRAINER_RUNS.items():
        over = {k: (v.format(**dirs) if isinstance(v, str) else v) for k, v in over.items()}
        specs.append(dict(out=dirs[name], layout=layout, over=over, pcfg=pcfg))
    runs = launch(workers.run_trainers, 2, specs)[0]
    dirs["single"] = str(d / "single")
    return single, dict(zip(TRAINER_RUNS, runs)), dirs


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


@dist_mark
def test_distributed_trainer_fsdp_x2_then_resume_at_tp_x2_matches_single_trainer(trainer_runs):
    """DistributedTrainer (FSDP2 x 2) for 4 steps, and resumed from its step-2 DCP checkpoint at TP x 2:
    the metrics (train and validation loss, lr per step) and the exported HF models equal the plain
    single-process Trainer's."""
    single, runs, dirs = trainer_runs
    assert_same_curve(single, runs["fsdp"][1], [1, 2, 3, 4])
    _, rows, log = runs["tp_from_fsdp"]
    assert any("resumed from" in m and "at step 2 (saved at dp_shard=2 x cp=1 x tp=1 x pp=1)" in m for m in log), log
    assert_same_curve(single, rows, [3, 4])
    assert_same_export(dirs["single"], dirs["fsdp"])
    assert_same_export(dirs["single"], dirs["tp_from_fsdp"])


@dist_mark
def test_distributed_trainer_pp_x2_matches_single_trainer(trainer_runs):
    """``--pp 2`` (1F1B) through the trainer: 4 steps, every train and validation loss, the learning
    rate and the exported HF model equal the single-process Trainer's; rank 0 (the first stage)
    logs the last stage's loss; DCP checkpoints are complete."""
    single, runs, dirs = trainer_runs
    summary, rows, log = runs["pp_1f1b"]
    assert any("pipeline 1F1B, stage 1/2 (layers 0-1), 4 micro-batches per step" in m for m in log), log
    assert_same_curve(single, rows, [1, 2, 3, 4])
    ref = {r["step"]: r for r in single if "grad_norm" in r}
    for r in rows:
        if "grad_norm" in r:  # the tied embedding/head counted once over the two stages
            assert abs(r["grad_norm"] - ref[r["step"]]["grad_norm"]) <= 1e-5 * ref[r["step"]]["grad_norm"]
    assert abs(summary["val_after"]["val_loss"] - summary["val_before"]["val_loss"]) > 1e-3  # it trained
    ck = Path(dirs["pp_1f1b"]) / "checkpoints"
    assert sorted(c.name for c in ck.iterdir() if (c / "meta.json").exists()) == ["step-000002", "step-000004"]
    assert (Path(dirs["pp_1f1b"]) / "loss.png").exists()
    assert_same_export(dirs["single"], dirs["pp_1f1b"])


@dist_mark
@pytest.mark.parametrize("name", ["pp_gpipe_from_pp", "pp_gpipe_from_fsdp", "fsdp_from_pp"])
def test_pipeline_checkpoints_resume_across_layouts_and_schedules(trainer_runs, name):
    """A PP x 2 DCP checkpoint resumes at PP x 2 with the other schedule (GPipe) and at FSDP2 x 2; an
    FSDP2 x 2 checkpoint resumes at PP x 2: steps 3-4 and the final model continue the single curve."""
    single, runs, dirs = trainer_runs
    _, rows, log = runs[name]
    assert any("resumed from" in m and "at step 2" in m for m in log), log
    assert_same_curve(single, rows, [3, 4])
    assert_same_export(dirs["single"], dirs[name])


@dist_mark
def test_pipeline_layout_error_in_the_trainer_is_one_line(trainer_runs):
    status, msg = runs_error = trainer_runs[1]["pp_1f1b_too_few_rows"]
    assert status == "error", runs_error
    assert msg.startswith("parallel layout: the 1F1B schedule needs at least pp=2 micro-batches per step") and \
        "--pp-schedule gpipe" in msg and "\n" not in msg, msg


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
def score_and_precision():
    """One 2-process launch: ``score`` under FSDP2 x 2 and TP x 2, one FSDP2 bf16/fp32 mixed-precision step."""
    return launch(workers.score_and_mixed_precision, 2)


@dist_mark
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_score_under_fsdp2_and_tp_matches_single_process(score_and_precision, layout):
    """gemmaforge.score (soft-capped logits, temperature 0.7, chunked head) under FSDP2 x 2 (each rank
    scores its own packed row; FSDP sums the gradients) and TP x 2: per-token log-probs and entropies
    equal one process's (<= 1e-5), and so do the gradients of a weighted sum of them."""
    ref_rows, ref_grads = workers.score_single()
    if layout == "fsdp":  # rank r scored row r
        rows = [score_and_precision[r][layout][0][0] for r in range(2)]
    else:
        rows = score_and_precision[0][layout][0]
    grads = score_and_precision[0][layout][1]
    for (lp, ent, valid), (rlp, rent, rvalid) in zip(rows, ref_rows):
        assert torch.equal(valid, rvalid) and int(valid.sum()) > 20
        assert rlp[valid].min() < -3  # real distributions, not a degenerate check
        torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, rent, atol=1e-5, rtol=0)
    assert set(grads) == set(ref_grads)
    assert_same_grads(ref_grads, grads)


@dist_mark
def test_fsdp2_mixed_precision_bf16_params_fp32_reduce_runs_a_step(score_and_precision):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on CPU gloo: the step computes in bf16
    (its loss differs from fp32's, slightly), keeps fp32 sharded parameters and fp32 gradients close to
    the fp32 ones, and the optimizer step moves the weights."""
    mp = score_and_precision[0]["mixed_precision"]
    ref_loss = workers.train_single(steps=1)[0][0]
    assert 1e-6 < abs(mp["loss"] - ref_loss) < 1e-2, (mp["loss"], ref_loss)
    assert mp["dtypes"] == {(torch.float32, torch.float32)}
    ref = workers.grads_single()
    num = sum((mp["grads"][k] - g).pow(2).sum() for k, g in ref.items()).sqrt()
    den = sum(g.pow(2).sum() for g in ref.values()).sqrt()
    # bf16 compute: a few % of the gradient (measured 2.6%); a scale bug (mean instead of sum: 50%) is far above
    assert num / den < 0.1, float(num / den)
    assert 1e-4 < mp["moved"] < 1e-2  # ~lr: Adam's first step


# ----------------------------------------------------------------------------- expert parallelism

EP_RUNS = {
    # name: (layout, TrainConfig overrides, model); run in this order in ONE 2-process launch
    "ep": (dict(dp_shard=2, ep=2), dict(), "moe"),
    "ep_from_ep": (dict(dp_shard=2, ep=2), dict(resume="{ep}/checkpoints/step-000002"), "moe"),
    "fsdp_from_ep": (dict(dp_shard=2), dict(resume="{ep}/checkpoints/step-000002"), "moe"),
    "ep_dense": (dict(dp_shard=2, ep=2), dict(), "gemma3"),
}


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    """The single-process Trainer on the tiny Gemma 4 MoE (6 experts, top-3) and, in ONE 2-process
    launch, DistributedTrainer runs with ``dp_shard=2, ep=2`` (4 steps, checkpoints every 2 steps,
    final HF export), resumed from its step-2 DCP checkpoint at ``ep=2`` and at plain FSDP2 x 2, and
    ``--ep 2`` on the dense tiny Gemma 3 (a layout error)."""
    d = tmp_path_factory.mktemp("ep")
    _, single = workers.run_trainer_single(str(d / "single"), model="moe")
    dirs = {name: str(d / name) for name in EP_RUNS}
    specs = []
    for name, (layout, over, model) in EP_RUNS.items():
        over = {k: (v.format(**dirs) if isinstance(v, str) else v) for k, v in over.items()}
        specs.append(dict(out=dirs[name], layout=layout, over=over, model=model))
    runs = launch(workers.run_trainers, 2, specs)[0]
    dirs["single"] = str(d / "single")
    return single, dict(zip(EP_RUNS, runs)), dirs


@dist_mark
def test_distributed_trainer_ep_x2_matches_single_trainer(ep_runs):
    """``dp_shard=2, ep=2`` on the tiny Gemma 4 MoE: each rank holds 3 of the 6 experts of every MoE
    layer (all-to-all token exchange), FSDP2 shards the rest over both ranks. Every train and
    validation loss, the learning rate, the first step's gradient norm (experts included: a wrong
    expert-gradient scale would show) and the exported HF model (expert tensors gathered whole)
    equal the single-process Trainer's."""
    single, runs, dirs = ep_runs
    _, rows, log = runs["ep"]
    assert any("dp_shard=2 x cp=1 x tp=1 x pp=1 (ep=2 within dp_shard) on 2 processes" in m and
               "ep=2 (experts sharded over ep" in m for m in log), log
    assert_same_curve(single, rows, [1, 2, 3, 4])
    ref = {r["step"]: r for r in single if "grad_norm" in r}
    first = next(r for r in rows if "grad_norm" in r)
    assert abs(first["grad_norm"] - ref[first["step"]]["grad_norm"]) <= 1e-5 * ref[first["step"]]["grad_norm"]
    assert_same_export(dirs["single"], dirs["ep"])
    import gemmaforge

    sd = gemmaforge.from_pretrained(str(Path(dirs["ep"]) / "final")).state_dict()
    assert tuple(sd["model.layers.0.experts.gate_up_proj"].shape) == (6, 48, 64)  # all experts, not a rank's 3


@dist_mark
@pytest.mark.parametrize("name", ["ep_from_ep", "fsdp_from_ep"])
def test_expert_parallel_checkpoint_resumes_at_ep_and_at_fsdp(ep_runs, name):
    """The ``ep=2`` DCP checkpoint (expert tensors saved as their global [E, ...] shards) resumes at
    ``ep=2`` and at plain FSDP2 x 2: steps 3-4 and the final model continue the single curve."""
    single, runs, dirs = ep_runs
    _, rows, log = runs[name]
    assert any("resumed from" in m and "at step 2 (saved at dp_shard=2 x cp=1 x tp=1 x pp=1 (ep=2 within "
               "dp_shard))" in m for m in log), log
    assert_same_curve(single, rows, [3, 4])
    assert_same_export(dirs["single"], dirs[name])


@dist_mark
def test_expert_parallel_on_a_dense_model_is_a_one_line_layout_error(ep_runs):
    status, msg = ep_runs[1]["ep_dense"]
    assert status == "error"
    assert msg.startswith("parallel layout: --ep 2 needs a mixture-of-experts model") and "\n" not in msg, msg
