"""Atomic training checkpoints: exact round trip, partial/corrupt dirs never used, pruning, fingerprints."""

import copy
import json
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemmaforge import from_config
from gemmaforge.train.checkpointer import (
    latest_checkpoint,
    list_checkpoints,
    load_train_state,
    save_train_state,
)
from gemmaforge.models.registry import preset
from gemmaforge.errors import CheckpointError


def _setup(seed=0, **cfg):
    torch.manual_seed(seed)
    m = from_config(preset("gemma-3-tiny", **cfg)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return m, opt, sched


def _train_step(m, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=g)
    logits = m(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _fingerprint(m):
    return {"model": m.config.to_hf(), "training": {"seq_len": 9, "batch": 2, "packed": False}}


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_everything_exactly(tmp_path):
    m, opt, sched = _setup(0)
    for s in range(3):
        _train_step(m, opt, sched, s)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    data_state = {"epoch": 1, "offset": 4711, "order": (3, 1, 2), "shard": "a.jsonl", 7: torch.arange(3)}
    ck = save_train_state(tmp_path, 3, model=m, optimizer=opt, scheduler=sched, data_state=data_state,
                          extra=_fingerprint(m), keep_last=2)
    assert ck == tmp_path / "checkpoints" / "step-000003"
    assert latest_checkpoint(tmp_path) == ck
    assert latest_checkpoint(tmp_path / "checkpoints") == ck  # the checkpoints dir itself works too
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["complete"] is True and meta["step"] == 3
    from torch.distributed.checkpoint import FileSystemReader

    saved = {k for k in FileSystemReader(str(ck)).read_metadata().state_dict_metadata if k.startswith("model.")}
    assert saved == {"model." + k for k in m.state_dict()} - {"model.lm_head.weight"}  # tied head written once
    assert set(meta["files"]) >= {".metadata", "scheduler.json", "rng-rank0.pt", "data_state.pt", "extra.json"}

    after_save = _draws()
    opt_saved, sched_saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    # the original continues one step; remember where it lands
    loss_a = _train_step(m, opt, sched, 99)
    params_a = {k: v.clone() for k, v in m.state_dict().items()}
    lr_a = sched.get_last_lr()

    # a fresh model/optimizer/scheduler with different weights and scrambled RNG
    m2, opt2, sched2 = _setup(5)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    step, ds, extra = load_train_state(ck, model=m2, optimizer=opt2, scheduler=sched2, expect_extra=_fingerprint(m2))
    assert step == 3
    assert ds.keys() == data_state.keys() and ds["order"] == (3, 1, 2) and torch.equal(ds[7], torch.arange(3))
    assert extra == json.loads(json.dumps(_fingerprint(m)))
    assert m2.lm_head.weight is m2.model.embed_tokens.weight  # still tied
    assert _draws() == after_save  # python, numpy and torch RNG continue exactly where they were
    assert sched2.state_dict() == sched_saved and sched_saved["last_epoch"] == 3
    # optimizer moments and hyper-parameters restored exactly
    got = opt2.state_dict()
    assert got["param_groups"] == opt_saved["param_groups"]
    assert got["state"].keys() == opt_saved["state"].keys() and len(got["state"]) == len(list(m.parameters()))
    for k, st in opt_saved["state"].items():
        for name, v in st.items():
            assert torch.equal(got["state"][k][name], v), (k, name)
    # the resumed run takes the identical next step
    loss_b = _train_step(m2, opt2, sched2, 99)
    assert loss_b == loss_a
    assert sched2.get_last_lr() == lr_a
    for k, v in m2.state_dict().items():
        assert torch.equal(v, params_a[k]), k


def _save(tmp_path, step, m, opt=None, sched=None, keep_last=10, **kw):
    return save_train_state(tmp_path, step, model=m, optimizer=opt, scheduler=sched, data_state={"step": step},
                            extra=_fingerprint(m), keep_last=keep_last, **kw)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "no-meta", "meta-not-complete", "bad-meta"])
def test_damaged_checkpoint_is_never_latest_and_load_names_the_file(tmp_path, damage):
    m, opt, sched = _setup(0)
    good = _save(tmp_path, 1, m, opt, sched)
    bad = _save(tmp_path, 2, m, opt, sched)
    assert latest_checkpoint(tmp_path) == bad
    victim = next(bad.glob("*.distcp"))  # the model and optimizer shard
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    elif damage == "flip":  # same size, different bytes: only the hash notices
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "no-meta":
        victim = bad / "meta.json"
        victim.unlink()
    elif damage == "meta-not-complete":
        victim = bad / "meta.json"
        meta = json.loads(victim.read_text())
        meta["complete"] = False
        victim.write_text(json.dumps(meta))
    else:
        victim = bad / "meta.json"
        victim.write_text(victim.read_text()[:40])
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path, verify="hash") == [good]
    if damage != "flip":
        assert list_checkpoints(tmp_path) == [good]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    changed = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_train_state(bad, model=m, optimizer=opt, scheduler=sched, expect_extra=None)
    msg = str(e.value)
    assert "\n" not in msg and str(victim) in msg
    for k, v in m.state_dict().items():  # nothing was touched by the failed load
        assert torch.equal(v, changed[k]), k
    load_train_state(good, model=m, optimizer=opt, scheduler=sched, expect_extra=_fingerprint(m))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_leftover_temp_dir_and_missing_dir(tmp_path):
    m, _, _ = _setup(0)
    good = _save(tmp_path, 1, m)
    # what a save killed after writing every file (but before the rename) leaves behind
    shutil.copytree(good, tmp_path / "checkpoints" / ".step-000002.tmp-abc123")
    # an empty / partial step dir (no meta.json)
    (tmp_path / "checkpoints" / "step-000003").mkdir()
    (tmp_path / "checkpoints" / "step-000003" / "__0_0.distcp").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="step-000003/meta.json"):
        load_train_state(tmp_path / "checkpoints" / "step-000003", model=m, expect_extra=None)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_train_state(tmp_path / "checkpoints" / "step-000009", model=m, expect_extra=None)
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    # the next save clears the leftover temp dir (single writer), never a real checkpoint
    _save(tmp_path, 4, m)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000003", "step-000004"]


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from gemmaforge.train import checkpointer as train_state
    run_dir = sys.argv[1]
    m = torch.nn.Linear(4, 4)
    train_state.save_train_state(run_dir, 1, model=m, keep_last=1)
    real = torch.save
    def dying_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        if str(f).endswith("data_state.pt"):
            os._exit(9)  # killed mid-write: no cleanup, no exception handlers
    torch.save = dying_save
    with torch.no_grad():
        m.weight.fill_(7.0)
    train_state.save_train_state(run_dir, 2, model=m, keep_last=1)
""")


def test_kill_mid_write_leaves_previous_checkpoint_intact(tmp_path):
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    ckdir = tmp_path / "checkpoints"
    leftovers = [p.name for p in ckdir.iterdir()]
    assert "step-000001" in leftovers and "step-000002" not in leftovers
    assert any(n.startswith(".step-000002.tmp-") for n in leftovers)  # the killed save's temp dir
    assert latest_checkpoint(tmp_path) == ckdir / "step-000001"
    m = torch.nn.Linear(4, 4)
    step, ds, extra = load_train_state(ckdir / "step-000001", model=m, expect_extra={})
    assert step == 1 and ds == {} and extra == {}
    assert not torch.all(m.weight == 7.0)


def test_keep_last_prunes_oldest_complete_checkpoints(tmp_path):
    m, opt, sched = _setup(0)
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, m, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000040", "step-000030"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000030", "step-000040"]
    # steps past 999999 still sort numerically
    _save(tmp_path, 1_000_000, m, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000", "step-000040"]
    # a damaged newer checkpoint does not count towards keep_last (it is never a complete one)
    (tmp_path / "checkpoints" / "step-1000000" / "rng-rank0.pt").write_bytes(b"")
    _save(tmp_path, 1_000_001, m, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000001", "step-000040"]
    with pytest.raises(ValueError):
        _save(tmp_path, 5, m, keep_last=0)


def test_incompatible_fingerprint_names_dir_and_first_differing_key(tmp_path):
    m, opt, sched = _setup(0)
    ck = _save(tmp_path, 7, m, opt, sched)
    other, opt_o, sched_o = _setup(0, intermediate_size=96)
    with pytest.raises(CheckpointError) as e:
        load_train_state(ck, model=other, optimizer=opt_o, scheduler=sched_o, expect_extra=_fingerprint(other))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(ck)) and "model.intermediate_size" in msg and "128" in msg and "96" in msg
    # training-shape difference
    fp = _fingerprint(m)
    fp["training"]["seq_len"] = 4096
    with pytest.raises(CheckpointError, match=r"training\.seq_len \(checkpoint 9, expected 4096\)"):
        load_train_state(ck, model=m, expect_extra=fp)
    # a key the checkpoint never recorded
    with pytest.raises(CheckpointError, match=r"tokenizer \(missing in the checkpoint"):
        load_train_state(ck, model=m, expect_extra={**_fingerprint(m), "tokenizer": "abc"})
    # without expect_extra, a model of another shape is still refused, naming the weights file
    with pytest.raises(CheckpointError, match=r"step-000007: does not fit the model: mis-shaped"):
        load_train_state(ck, model=other, expect_extra=None)
    # the matching fingerprint (tuples vs lists, key order) loads
    load_train_state(ck, model=m, optimizer=opt, scheduler=sched, expect_extra=_fingerprint(m))


def test_an_incompatible_checkpoint_names_the_setting_before_what_derives_from_it(tmp_path):
    """A changed --seq-len also changes the packed data's digest: the setting (the cause) is named."""
    from gemmaforge.errors import CheckpointError
    from gemmaforge.train.checkpointer import check_extra

    saved = {"seq_len": 32, "seed": 1, "data": "69 rows, sha256 aaaa"}
    want = {"seq_len": 16, "seed": 1, "data": "129 rows, sha256 bbbb"}
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: seq_len \(checkpoint 32, expected 16\)$"):
        check_extra(tmp_path, saved, want)
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: data \(checkpoint"):
        check_extra(tmp_path, saved, {**want, "seq_len": 32})
    check_extra(tmp_path, {**saved, "bookkeeping": 1}, saved)  # extra keys of the checkpoint are not compared
