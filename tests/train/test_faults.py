"""Fault injection: what survives a corrupt or truncated checkpoint, a failing writer, kill -9 during a
save, a deleted data shard and SIGTERM during a periodic eval, and what the user is told.

Most tests train a toy stage (a 4x4 linear map on synthetic Grain data, ~1 s to compile) through the real
`train_stage` loop, checkpointer and metric writer. The fault table of the issue is measured here.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import grain
import helpers
import numpy as np
import optax
import pytest
from fault_fixtures import (
    Linear4,
    leaves,
    records,
    run_toy,
    saved_states,
    toy_loss,
    toy_spec,
)
from flax import nnx

from klingjax.config import to_experiment
from klingjax.data import shard_check
from klingjax.data.pipeline import make_dataset
from klingjax.data.records import list_shards, write_shards
from klingjax.data.shard_check import ShardCheckIterDataset
from klingjax.sharding.rules import get_rules
from klingjax.train import checkpoint
from klingjax.train import guard as step_guard
from klingjax.train.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    CorruptCheckpointError,
    list_steps,
    restore_model,
)
from klingjax.train.loop import StageSpec
from klingjax.train.state import create_trainer

# ---------------------------------------------------------------------------------------------------------
# Checkpoint integrity
# ---------------------------------------------------------------------------------------------------------


def _truncate(step_dir: str) -> None:
    """Cut every array data file (OCDBT `d/` files) of a checkpoint step to half its size."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(r) == "d"]
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, mesh, monkeypatch):
    run_toy(tmp_path, mesh, steps=6)
    ckpt_dir = os.path.join(tmp_path, "toy", "checkpoints")
    assert list_steps(ckpt_dir) == [4, 6]
    _truncate(os.path.join(ckpt_dir, "6"))
    warned = []
    monkeypatch.setattr(checkpoint.logging, "warning", lambda msg, *args: warned.append(msg % args))
    summary = run_toy(tmp_path, mesh, steps=8)
    assert any("checkpoint step 6 in" in w and "is unreadable" in w for w in warned), warned
    assert summary["start_step"] == 4 and summary["finished"]
    assert list_steps(ckpt_dir) == [6, 8]  # step 6 written again by this run
    assert [d.split("-")[0] for d in os.listdir(ckpt_dir + "_corrupt")] == ["6"]  # the bad one, kept aside


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, mesh):
    run_toy(tmp_path, mesh, steps=4)
    ckpt_dir = os.path.join(tmp_path, "toy", "checkpoints")
    for step in list_steps(ckpt_dir):
        _truncate(os.path.join(ckpt_dir, str(step)))
    with pytest.raises(CorruptCheckpointError, match=r"can be restored:\n  step 4: .*\n  step 2: "):
        run_toy(tmp_path, mesh, steps=6)
    assert list_steps(ckpt_dir) == [2, 4]  # nothing moved when no checkpoint is good


def test_a_checkpoint_from_before_the_guard_still_resumes(tmp_path, mesh):
    """Checkpoints written before the step guard existed have no `guard` subtree: resume restores the rest."""
    run_toy(tmp_path / "new", mesh, steps=4)
    new = saved_states(tmp_path / "new", mesh)[4]
    ckpt = Checkpointer(os.path.join(tmp_path, "old", "toy", "checkpoints"), async_save=False)
    ckpt.save(4, nnx.State({k: new[k] for k in new if k != "guard"}), {}, force=True)
    ckpt.close()
    summary = run_toy(tmp_path / "old", mesh, steps=6)
    assert summary["start_step"] == 4 and summary["finished"] and summary["skipped_steps"] == 0


@pytest.fixture
def pipeline_workdir(tmp_path):
    sys.path.insert(0, str(helpers.REPO / "tests" / "export"))
    from export_fixtures import make_workdir

    return make_workdir(str(tmp_path / "work"))[0]


@pytest.mark.parametrize("damage", ["truncate", "no_metadata"])
def test_export_of_a_corrupt_checkpoint_is_a_clear_error(pipeline_workdir, tmp_path, damage):
    from klingjax.export.export import export_checkpoint, main

    step_dir = os.path.join(pipeline_workdir, "dit", "checkpoints", "6")
    if damage == "truncate":
        _truncate(step_dir)
    else:
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    match = r"dit checkpoint step 6 .* is unreadable|checkpoint .*/dit/checkpoints/6/state is unreadable"
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        export_checkpoint(pipeline_workdir, str(tmp_path / "out"))
    assert "--step" in str(info.value)
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if "out.tmp" in p]
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, exit status 2
        main(["--checkpoint", pipeline_workdir, "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    export_checkpoint(pipeline_workdir, str(tmp_path / "out3"), step=3)  # the older step still exports


@pytest.mark.parametrize("damage", ["truncate", "no_metadata"])
def test_restore_model_of_a_corrupt_checkpoint_is_a_clear_error(tmp_path, mesh, damage):
    (tmp_path / "config.json").write_text("{}")
    st = create_trainer(Linear4, optax.sgd(0.1), mesh, get_rules("fsdp", "dit"), 0)
    ckpt = Checkpointer(os.path.join(tmp_path, "dit", "checkpoints"), async_save=False, keep=3)
    for step in (1, 2):
        ckpt.save(step, st.state, {}, force=True)
    ckpt.close()
    step_dir = os.path.join(tmp_path, "dit", "checkpoints", "2")
    if damage == "truncate":
        _truncate(step_dir)
    else:
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    rules = get_rules("fsdp", "dit")
    with pytest.raises(CorruptCheckpointError, match=r"dit checkpoint step 2 .* is unreadable: .*other checkpoints "
                                                     r"there: steps \[1\]"):
        restore_model(Linear4, str(tmp_path / "dit"), mesh=mesh, rules=rules)
    assert isinstance(restore_model(Linear4, str(tmp_path / "dit"), mesh=mesh, rules=rules, step=1), Linear4)


def test_a_failing_writer_is_a_clear_error_and_earlier_checkpoints_survive(tmp_path, mesh, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith("6."):  # step 6's temporary directory
            (directory / "metadata").write_text('{"trunc')  # a partial write, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(CheckpointSaveError) as info:
        run_toy(tmp_path, mesh, steps=10)
    message = str(info.value)
    ckpt_dir = os.path.join(tmp_path, "toy", "checkpoints")
    assert f"saving step 6 to {ckpt_dir} failed: the disk is full" in message
    assert "already written are intact (steps [2, 4])" in message
    monkeypatch.undo()
    states = saved_states(tmp_path, mesh)
    assert sorted(states) == [2, 4] and all(step_guard.state_is_finite(s) for s in states.values())
    summary = run_toy(tmp_path, mesh, steps=10)  # space freed: the rerun resumes from step 4
    assert summary["start_step"] == 4 and summary["finished"]


# ---------------------------------------------------------------------------------------------------------
# A data shard deleted mid-run
# ---------------------------------------------------------------------------------------------------------


def shard_spec(data_dir: str, on_sample=None) -> StageSpec:
    """The toy stage reading ArrayRecord shards through the real pipeline, as the VAE and DiT stages do."""

    def dataset(per_host, seed, index, count):
        shards = list_shards(data_dir, "train")
        ds = make_dataset(shards, decode=lambda r: {"x": r["x"]}, batch_size=per_host, seed=seed, shuffle=True,
                          num_epochs=None, process_index=index, process_count=count)
        return ShardCheckIterDataset(ds, shards)

    return StageSpec("toy", "dit", Linear4, toy_loss, dataset, lambda d: {"x": d["x"]}, on_sample)


def test_a_data_shard_deleted_mid_run_is_reported_on_resume(tmp_path, mesh, monkeypatch):
    data_dir = str(tmp_path / "data")
    rng = np.random.default_rng(0)
    paths = write_shards(({"x": rng.standard_normal(4).astype(np.float32)} for _ in range(64)), data_dir, "train", 4)

    def delete_a_shard(model, step, out_dir):
        if os.path.exists(paths[1]):
            os.remove(paths[1])
        return {}

    warned = []
    monkeypatch.setattr(shard_check.logging, "warning", lambda msg, *args: warned.append(msg % args))
    first = run_toy(tmp_path, mesh, shard_spec(data_dir, delete_a_shard), steps=4, sample_every=2)
    assert first["finished"] and not warned  # the open shard stays readable: this run is unaffected
    second = run_toy(tmp_path, mesh, shard_spec(data_dir), steps=6)
    assert second["start_step"] == 4 and second["finished"]
    assert len(warned) == 1 and "train-00001-of-00004.array_record is missing" in warned[0]
    assert "resume is not exact" in warned[0]
    with pytest.raises(FileNotFoundError, match="train-00001-of-00004.array_record"):
        iter(ShardCheckIterDataset(grain.MapDataset.range(4).to_iter_dataset(), paths))


# ---------------------------------------------------------------------------------------------------------
# kill -9 during a checkpoint save; SIGTERM during a periodic eval
# ---------------------------------------------------------------------------------------------------------

CHILD = """
import os, sys, time
sys.path[:0] = [{tests!r}, {train!r}]
import conftest  # 8 fake CPU devices, as in the parent
from orbax.checkpoint._src.handlers import json_checkpoint_handler as j
original = j.JsonCheckpointHandler._save_fn
async def slow(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith("6."):
        open({marker!r}, "w").close()  # step 6's arrays are being written: the parent kills us now
        time.sleep(120)
    return await original(self, x, directory)
j.JsonCheckpointHandler._save_fn = slow
import test_faults
from klingjax.data import shard_check
from klingjax.data.pipeline import make_dataset
from klingjax.data.records import list_shards, write_shards
from klingjax.data.shard_check import ShardCheckIterDataset
from klingjax.sharding.mesh import make_mesh
test_faults.run_toy({workdir!r}, make_mesh((-1, 1, 1, 1)))
"""


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, mesh):
    workdir, marker = str(tmp_path / "work"), str(tmp_path / "saving")
    code = CHILD.format(tests=str(helpers.REPO / "tests"), train=os.path.dirname(__file__), marker=marker,
                        workdir=workdir)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(helpers.REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert os.path.exists(marker), proc.stderr.read().decode()[-3000:]
    ckpt_dir = os.path.join(workdir, "toy", "checkpoints")
    assert list_steps(ckpt_dir) == [2, 4]  # step 6 never completed
    assert any(d.startswith("6.") for d in os.listdir(ckpt_dir))  # its temporary directory is left behind
    summary = run_toy(workdir, mesh)
    assert summary["start_step"] == 4 and summary["finished"]
    assert list_steps(ckpt_dir) == [8, 10]
    reference = run_toy(tmp_path / "reference", mesh)
    assert reference["finished"]
    a, b = saved_states(workdir, mesh)[10], saved_states(str(tmp_path / "reference"), mesh)[10]
    for x, y in zip(leaves(a), leaves(b), strict=True):  # the kill cost nothing but time
        np.testing.assert_array_equal(x, y)


def test_sigterm_during_a_periodic_eval_checkpoints_and_the_eval_reruns(tmp_path, mesh):
    calls = []

    def on_sample(model, step, out_dir):
        calls.append(step)
        if step == 4 and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the eval runs
        return {"eval_metric": float(step)}

    first = run_toy(tmp_path, mesh, toy_spec(on_sample=on_sample), sample_every=4, steps=8)
    assert not first["finished"] and first["step"] == 5  # the next step ran, was saved, and the run stopped
    assert list_steps(os.path.join(tmp_path, "toy", "checkpoints")) == [4, 5]
    second = run_toy(tmp_path, mesh, toy_spec(on_sample=on_sample), sample_every=4, steps=8)
    assert second["start_step"] == 5 and second["finished"]
    assert calls == [4, 8]
    evals = [r["step"] for r in records(tmp_path) if "eval_metric" in r]
    assert evals == [4, 8]


def _files(root: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(root) for f in fs}


@pytest.mark.slow
def test_sigterm_during_the_eval_stage_leaves_checkpoints_intact_and_eval_reruns(pipeline_workdir):
    """`klingjax-train ... stages=('eval',)` gets SIGTERM while generating: it dies (eval holds no state worth
    saving), the checkpoints it read are byte-identical, and rerunning the eval stage writes the report."""
    import threading

    from experiments import demo
    from klingjax.experiment import run_experiment, with_stages

    workdir = pipeline_workdir
    exp = to_experiment(demo.get_config("runlocal"))  # the config make_workdir wrote
    run_experiment(with_stages(exp, "data"), workdir)  # held-out clips and captions
    before = {stage: _files(os.path.join(workdir, stage, "checkpoints")) for stage in ("dit", "vae")}
    args = [sys.executable, "-m", "klingjax.main", "--config", "experiments/demo.py:runlocal", "--workdir", workdir,
            "--config.stages=('eval',)"]
    proc = subprocess.Popen(args, cwd=str(helpers.REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while not any("=== stage eval ===" in line for line in lines) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # loading the models / generating
    assert proc.poll() is None, "".join(lines)[-3000:]
    assert not os.path.exists(os.path.join(workdir, "report.md"))  # the eval has not finished
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM, "".join(lines)[-3000:]
    for stage in ("dit", "vae"):
        assert _files(os.path.join(workdir, stage, "checkpoints")) == before[stage]
    results = run_experiment(with_stages(exp, "eval"), workdir)  # the rerun starts the eval afresh
    assert "adherence_colour_acc" in results["eval"]
    assert os.path.getsize(os.path.join(workdir, "report.md")) > 0
