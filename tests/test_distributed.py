"""Parallel layouts against one process: FSDP2, TP, FSDP2 x TP, CP, PP, distributed checkpoints.

Every multi-process test spawns CPU processes with gloo (``gemmaforge.distributed.launch``, one
thread each) running tests/dist/workers.py: the tiny Gemma 3 trains 4 AdamW steps (fp32, packed
rows with cu_seqlens, chunked cross-entropy summed over valid tokens / the step's global valid-token
count, grad clipping) and must give the single-process loss after every step and the same final
weights (<= 1e-5).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

import workers  # noqa: E402

from gemmaforge.distributed import launch  # noqa: E402
from gemmaforge.errors import ConfigError  # noqa: E402
from gemmaforge.transforms.parallel import ParallelDims, split_layers  # noqa: E402

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
])
def test_wrong_layout_is_one_clear_line(layout, world, needle):
    cfg = workers.tiny_config()
    with pytest.raises(ConfigError) as e:
        ParallelDims(**layout).validate(world, cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_layout_resolves_dp_shard_and_cp_divides_seq_len():
    d = ParallelDims(tp=2).validate(8, workers.tiny_config())
    assert (d.dp_shard, d.tp, d.world_size, d.fsdp_size) == (4, 2, 8, 4)
    with pytest.raises(ConfigError, match="cp=2 does not divide --seq-len 33"):
        ParallelDims(cp=2).validate(2, seq_len=33)


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
    from gemmaforge.transforms.parallel import build_meta_model, materialize

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
    from gemmaforge.checkpoint.dcp import load_distributed
    from gemmaforge.errors import CheckpointError

    (tmp_path / "ck").mkdir()
    model = gemmaforge_tiny()
    with pytest.raises(CheckpointError, match="not a complete distributed checkpoint"):
        load_distributed(tmp_path / "ck", model)


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

@dist_mark
@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_pp_x2_matches_single_process(reference, schedule):
    out = launch(workers.train_pipeline, 2, dict(dp_shard=1, pp=2), schedule)[0]
    assert_same_run(reference, out)


@dist_mark
def test_pp_x2_fsdp2_x2_matches_single_process(reference):
    out = launch(workers.train_pipeline, 4, dict(dp_shard=2, pp=2), "1F1B")[0]
    assert_same_run(reference, out)


# ----------------------------------------------------------------------------- the trainer

@dist_mark
def test_distributed_trainer_fsdp_x2_then_resume_at_tp_x2_matches_single_trainer(tmp_path):
    """DistributedTrainer (FSDP2 x 2) for 2 steps, resumed from its DCP checkpoint at TP x 2 for 2
    more: the metrics (train and validation loss per step) and the exported HF model equal the plain
    single-process Trainer's."""
    import gemmaforge

    over = dict(schedule="constant")
    single, m1 = workers.run_trainer_single(str(tmp_path / "single"), **over)
    launch(workers.run_trainer_parallel, 2, str(tmp_path / "par"), dict(dp_shard=2), dict(over, steps=2))
    _, m2 = launch(workers.run_trainer_parallel, 2, str(tmp_path / "par"), dict(dp_shard=1, tp=2),
                   dict(over, resume=str(tmp_path / "par")))[0]
    train1 = [(r["step"], r["loss"]) for r in m1 if "loss" in r]
    train2 = [(r["step"], r["loss"]) for r in m2 if "loss" in r]
    assert [s for s, _ in train2] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(train1, train2):
        assert abs(a - b) <= TOL, (s, a, b)
    val1 = [r["val_loss"] for r in m1 if "val_loss" in r]
    val2 = [r["val_loss"] for r in m2 if "val_loss" in r]
    assert len(val1) == len(val2) and all(abs(a - b) <= TOL for a, b in zip(val1, val2))
    A = gemmaforge.from_pretrained(str(tmp_path / "single" / "final")).state_dict()
    B = gemmaforge.from_pretrained(str(tmp_path / "par" / "final")).state_dict()
    assert max((A[k] - B[k]).abs().max().item() for k in A) <= TOL
