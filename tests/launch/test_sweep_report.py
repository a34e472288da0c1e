"""launch.sweep (expansion, naming, validation, skip/resume) and launch.report (table + plots).

Most tests drive `run_local` with a fake runner (no training); one test runs a real 2-run sweep of tiny
VAE-only runs through `python -m launch.sweep`, kills it after the first run, reruns it, and checks that
only the missing run trained, that a third invocation does nothing, and that the report was written.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import helpers
import numpy as np
import pytest

from launch import report, sweep
from launch.sweep import Sweep, SweepError, product, zipped

REPO = str(helpers.REPO)
ABLATION = os.path.join(REPO, "experiments", "ablation_sweep.py")


# --------------------------------------------------------------------------------------------- expansion


def test_product_and_zipped_expand_in_order():
    runs = product({"a.x": [1, 2], "b": ["u", "v"]}, zipped({"c": [0.1, 0.2], "d": [True, False]}))
    assert len(runs) == 8
    assert runs[0] == {"a.x": 1, "b": "u", "c": 0.1, "d": True}
    assert runs[-1] == {"a.x": 2, "b": "v", "c": 0.2, "d": False}
    with pytest.raises(SweepError, match="different lengths"):
        zipped({"c": [1, 2], "d": [1]})
    with pytest.raises(SweepError, match="more than one axis"):
        product({"a": [1]}, [{"a": 2}])


def test_run_names_are_stable_and_safe():
    assert sweep.run_name({"dit.timestep_sampling": "uniform", "dit.optim.lr": 1e-4}) == \
        "timestep_sampling=uniform,lr=0.0001"
    # Same last component: keep the full key so names stay distinct.
    assert sweep.run_name({"vae.optim.lr": 1e-3, "dit.optim.lr": 2e-3}) == "vae.optim.lr=0.001,dit.optim.lr=0.002"
    assert sweep.run_name({"stages": ("dit", "eval"), "name": "a b/c"}) == "stages=ditxeval,name=a_b_c"
    assert sweep.run_name({}) == "base"


def test_ablation_sweep_expands_to_four_validated_runs(tmp_path):
    s, path = sweep.load_sweep(ABLATION + ":runlocal")
    runs = sweep.expand(s, path, str(tmp_path))
    assert [r.name for r in runs] == [
        "timestep_sampling=logit_normal,loss_weighting=none", "timestep_sampling=logit_normal,loss_weighting=cosmap",
        "timestep_sampling=uniform,loss_weighting=none", "timestep_sampling=uniform,loss_weighting=cosmap"]
    assert len({r.workdir for r in runs}) == 4
    assert all(r.workdir.startswith(str(tmp_path / s.name)) for r in runs)
    # One shared dataset; the config path resolves next to the sweep file.
    argv = runs[3].argv(["klingjax-train"])
    assert argv[:3] == ["klingjax-train", "--config", "experiments/ablation.py:runlocal"] or \
        argv[2].endswith("experiments/ablation.py:runlocal")
    assert f"--config.data.path={tmp_path / s.name / 'data'}" in argv
    assert "--config.dit.timestep_sampling=uniform" in argv and "--config.dit.loss_weighting=cosmap" in argv


def _write_sweep(tmp_path, runs_src, fixed="{}", name="t"):
    path = tmp_path / "my_sweep.py"
    path.write_text(textwrap.dedent(f"""
        from launch.sweep import Sweep, product, zipped
        def get_sweep(arg=None):
            return Sweep(name={name!r}, base={os.path.join(REPO, 'experiments', 'ablation.py')!r} + ":runlocal",
                         runs={runs_src}, fixed={fixed})
    """))
    return str(path)


@pytest.mark.parametrize("runs_src, message", [
    ('product({"dit.no_such_key": [1, 2]})', "override key 'dit.no_such_key' is not in the base config"),
    ('product({"nosection.lr": [1, 2]})', "no section 'nosection'"),
    ('[{"dit.optim.lr": 1e-3}, {"dit.optim.lr": 0.001}]', "duplicate run name 'lr=0.001'"),
    ('product({"dit.timestep_sampling": ["uniform", "bogus"]})', "dit.timestep_sampling"),
    ('product({"dit.steps": ["ten"]})', "wrong type"),
])
def test_bad_sweeps_fail_before_launching(tmp_path, runs_src, message):
    path = _write_sweep(tmp_path, runs_src)
    s, p = sweep.load_sweep(path)
    with pytest.raises(SweepError, match=message):
        sweep.expand(s, p, str(tmp_path / "root"))
    assert sweep.main([path, "--workdir_root", str(tmp_path / "root")]) == 2
    assert not os.path.exists(tmp_path / "root" / "t"), "something was launched or written"


# --------------------------------------------------------------------------------------------- skip / resume


def _fake_runner(calls, finish=lambda name: True):
    """Pretends to train: records the call and writes results.json (finished or not)."""

    def run(argv, log_path):
        workdir = argv[argv.index("--workdir") + 1]
        name = os.path.basename(workdir)
        calls.append(name)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"dit": {"step": 8, "finished": finish(name)}, "eval": {"adherence_all_acc": 0.5}}, f)
        return 0

    return run


def test_skip_finished_and_rerun_interrupted(tmp_path):
    path = _write_sweep(tmp_path, 'product({"dit.optim.lr": [1e-3, 2e-3, 3e-3]})')
    runs = sweep.expand(*sweep.load_sweep(path), str(tmp_path / "root"))
    calls = []
    # The second run is "interrupted": it exits without reaching its last step. The sweep stops there.
    with pytest.raises(RuntimeError, match="did not finish"):
        sweep.run_local(runs, runner=_fake_runner(calls, finish=lambda n: n != "lr=0.002"))
    assert calls == ["lr=0.001", "lr=0.002"]
    assert [sweep.is_finished(r) for r in runs] == [True, False, False]
    calls.clear()
    status = sweep.run_local(runs, runner=_fake_runner(calls))
    assert calls == ["lr=0.002", "lr=0.003"]  # only the missing part
    assert status == {"lr=0.001": "skipped", "lr=0.002": "done", "lr=0.003": "done"}
    calls.clear()
    assert set(sweep.run_local(runs, runner=_fake_runner(calls)).values()) == {"skipped"} and not calls
    # A finished run whose settings changed is refused (its directory holds another experiment).
    changed = sweep.expand(Sweep("t", os.path.join(REPO, "experiments", "ablation.py:runlocal"),
                                 product({"dit.optim.lr": [1e-3]}), fixed={"dit.steps": 9}),
                           path, str(tmp_path / "root"))
    with pytest.raises(SweepError, match="different settings"):
        sweep.run_local(changed, runner=_fake_runner(calls))
    assert not calls


def test_failed_run_stops_the_sweep_without_marker(tmp_path):
    path = _write_sweep(tmp_path, 'product({"dit.optim.lr": [1e-3, 2e-3]})')
    runs = sweep.expand(*sweep.load_sweep(path), str(tmp_path / "root"))
    with pytest.raises(RuntimeError, match="exit code 3"):
        sweep.run_local(runs, runner=lambda argv, log: 3)
    assert not any(sweep.is_finished(r) for r in runs)


def test_dry_run_and_cluster_commands(tmp_path, capsys):
    assert sweep.main([ABLATION + ":runlocal", "--dry_run", "--workdir_root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("python -m klingjax.main --config ") for line in lines)
    assert "--config.dit.loss_weighting=cosmap" in lines[1]
    assert not os.listdir(tmp_path), "a dry run wrote something"
    assert sweep.main([ABLATION, "--launcher=slurm", "--workdir_root", "/shared/sweeps"]) == 0
    slurm = capsys.readouterr().out.splitlines()
    assert slurm[0].startswith("sbatch --job-name=timestep_sampling=logit_normal,loss_weighting=none "
                               "launch/slurm_gpu.sbatch klingjax-train --config ")
    assert "experiments/ablation.py --workdir /shared/sweeps/ablation_tsampling_x_weighting/" in slurm[0]
    assert sweep.main([ABLATION, "--launcher=tpu_pod", "--workdir_root", "gs://b/sweeps"]) == 0
    tpu = capsys.readouterr().out.splitlines()
    assert len(tpu) == 4
    assert tpu[0].startswith("launch/tpu_pod.sh --tpu=${TPU_NAME} --zone=${ZONE} -- klingjax-train --config ")
    assert "--workdir gs://b/sweeps/ablation_tsampling_x_weighting/timestep_sampling=logit_normal," in tpu[0]
    assert "--config.data.path=gs://b/sweeps/ablation_tsampling_x_weighting/data" in tpu[0]


# --------------------------------------------------------------------------------------------- report


def test_report_table_and_plots(tmp_path):
    path = _write_sweep(tmp_path, 'product({"dit.timestep_sampling": ["logit_normal", "uniform"], '
                                  '"dit.loss_weighting": ["none", "cosmap"]})')
    s, p = sweep.load_sweep(path)
    runs = sweep.expand(s, p, str(tmp_path / "root"))
    sweep_dir = str(tmp_path / "root" / "t")
    sweep.write_sweep_json(s, p, runs, sweep_dir)
    rng = np.random.default_rng(0)
    for i, run in enumerate(runs[:3]):  # the fourth never started
        os.makedirs(run.workdir)
        with open(os.path.join(run.workdir, "dit_metrics.jsonl"), "w") as f:
            for step in range(1, 9):
                f.write(json.dumps({"step": step, "loss": 1.0 / step + 0.01 * rng.random()}) + "\n")
            f.write(json.dumps({"step": 8, "loss": 0.125 + i}) + "\n")  # a resumed run re-logs: last one wins
        with open(os.path.join(run.workdir, "results.json"), "w") as f:
            json.dump({"dit": {"finished": True}, "eval": {"fvd": 100.0 + i, "adherence_all_acc": 0.1 * i,
                                                           "adherence_all_acc_on_real": 1.0}}, f)
        if i < 2:
            open(os.path.join(run.workdir, "DONE.json"), "w").write("{}")
    md_path = report.write_report(sweep_dir)
    md = open(md_path).read()
    header = "| run | dit.timestep_sampling | dit.loss_weighting | status | dit_final_loss | adherence_all_acc | fvd |"
    assert header in md
    row = "| timestep_sampling=logit_normal,loss_weighting=cosmap | logit_normal | cosmap | done | 1.125 | 0.1 | 101 |"
    assert row in md
    assert "| started |" in md and "| not started |" in md
    assert "all_acc 1" in md  # the ground-truth ceiling line
    for png in ("loss_curves.png", "metrics_vs_dit_timestep_sampling.png", "metrics_vs_dit_loss_weighting.png"):
        assert f"]({png})" in md
        with open(os.path.join(sweep_dir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    steps, loss = report.loss_curve(runs[1].workdir, "dit")
    assert steps.tolist() == list(range(1, 9)) and loss[-1] == 1.125
    os.remove(md_path)
    assert report.main([sweep_dir]) == 0 and os.path.exists(md_path)


# --------------------------------------------------------------------------------------------- end to end


def test_real_sweep_killed_midway_then_rerun(tmp_path):
    # Data-only runs keep this under the test budget: the sweep mechanics are the same for any stages (the
    # train loop's own kill/resume is tested in tests/train/test_smoke.py).
    tiny = '{"stages": ("data",), "data.num_train": 8, "data.num_eval": 4}'
    path = _write_sweep(tmp_path, 'product({"vae.optim.lr": [4e-4, 1e-3]})', fixed=tiny, name="e2e")
    root = tmp_path / "root"
    args = [sys.executable, "-m", "launch.sweep", path, "--workdir_root", str(root)]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    first, second = root / "e2e" / "lr=0.0004", root / "e2e" / "lr=0.001"
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (first / "DONE.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the training run it started
    proc.wait()
    assert (first / "DONE.json").exists(), proc.stderr.read().decode()[-3000:]
    assert not (second / "DONE.json").exists()
    done_before = (first / "DONE.json").stat().st_mtime

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 run(s) done, 1 skipped" in rerun.stderr
    assert (first / "DONE.json").stat().st_mtime == done_before
    assert (second / "DONE.json").exists()
    assert json.load(open(second / "results.json"))["data"]["data_dir"] == str(first.parent / "data")  # shared
    md = open(root / "e2e" / "report.md").read()
    assert "| lr=0.0004 | 0.0004 | done |" in md and "| lr=0.001 | 0.001 | done |" in md

    t0 = time.time()
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 run(s) done, 2 skipped" in again.stderr
    assert time.time() - t0 < 30
