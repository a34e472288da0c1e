"""End to end on the runlocal multi-task experiment (the demo + the masked-video task mixture): every stage runs;
a SIGKILLed stage resumes bit-for-bit (the DiT's tasks, masks and given latents included).

The reference runs all stages uninterrupted in this process. The resume tests run one stage in a
subprocess, kill it with SIGKILL mid-training (after a checkpoint), rerun it, and compare the losses
and data fingerprints of every step with the reference.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest

from experiments import kling
from klingjax.config import to_experiment
from klingjax.eval.report import read_jsonl
from klingjax.experiment import run_experiment

OVERRIDES = {"vae.steps": 12, "dit.steps": 12, "vae.checkpoint_every": 3, "dit.checkpoint_every": 3,
             "distill.steps": 8, "distill.checkpoint_every": 2, "distill.batch_size": 8, "distill.log_every": 1,
             "distill.method": "mean_flow", "distill.student_steps": (1, 2)}
REPO = str(helpers.REPO)


def _config(stages):
    c = kling.get_config("runlocal")
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        c[section][name] = value
    c.stages = stages
    return c


def _per_step(path):
    """Last logged record of each training step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for r in read_jsonl(path) if os.path.exists(path) else []:
        if "loss" in r:
            out[r["step"]] = r
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    results = run_experiment(to_experiment(_config(("data", "vae", "cache", "dit", "distill", "eval"))), workdir)
    return workdir, results


def test_all_stages_produce_report_and_metrics(reference):
    workdir, results = reference
    assert results["vae"]["step"] == 12 and results["dit"]["step"] == 12
    report = open(os.path.join(workdir, "report.md")).read()
    for needle in ("adherence_colour_acc", "samples_grid.png", "sample_00.mp4", "sample_00.gif"):
        assert needle in report
    for name in ("samples_grid.png", "sample_00.mp4", "sample_00.gif", "metrics.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    # The detector reads ground-truth held-out clips perfectly; untrained samples are scored too.
    assert results["eval"]["adherence_colour_acc_on_real"] >= 0.99
    assert 0.0 <= results["eval"]["adherence_colour_acc"] <= 1.0
    vae = _per_step(os.path.join(workdir, "vae_metrics.jsonl"))
    assert sorted(vae) == list(range(1, 13)) and vae[12]["loss"] < vae[1]["loss"]  # it learns
    assert os.path.exists(os.path.join(workdir, "tensorboard", "vae"))
    assert os.path.exists(os.path.join(workdir, "vae", "samples", "recon_step000012.png"))


def _kill_midway(workdir, stage, kill_after_step):
    args = [sys.executable, "-m", "klingjax.main", "--config", "experiments/kling.py:runlocal",
            "--workdir", workdir, f"--config.stages=('{stage}',)"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(workdir, f"{stage}_metrics.jsonl")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if max(_per_step(metrics), default=0) >= kill_after_step:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    return max(_per_step(metrics))


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_sigkill_then_resume_matches_uninterrupted_run(reference, tmp_path, stage):
    ref_dir, _ = reference
    workdir = str(tmp_path)
    needed = ["data"] if stage == "vae" else ["data", "vae", "latents"]
    for name in needed:
        shutil.copytree(os.path.join(ref_dir, name), os.path.join(workdir, name),
                        ignore=shutil.ignore_patterns("samples"))
    killed_at = _kill_midway(workdir, stage, kill_after_step=5)
    assert 5 <= killed_at < 12, "the run finished before it could be killed"
    run_experiment(to_experiment(_config((stage,))), workdir)

    ref = _per_step(os.path.join(ref_dir, f"{stage}_metrics.jsonl"))
    got = _per_step(os.path.join(workdir, f"{stage}_metrics.jsonl"))
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step]["data_fingerprint"] == ref[step]["data_fingerprint"], f"data order differs at step {step}"
        for key in [k for k in ref[step] if k.startswith("loss")]:  # the total and each task's loss
            np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-6, err_msg=f"{key} at step {step}")


def test_distill_stage_stopped_midway_resumes_exactly_and_its_student_generates(reference, tmp_path):
    """The mean_flow student of the multi-task teacher: 3 + 5 steps in two runs equal 8 in one (losses, data
    order); the student then samples held-out captions and image-to-video requests with its own few-step solver."""
    from klingjax.eval.generate import load_generator
    from klingjax.sharding.mesh import make_mesh

    ref_dir, _ = reference
    workdir = str(tmp_path)
    for name in ("data", "vae", "latents", "dit"):
        shutil.copytree(os.path.join(ref_dir, name), os.path.join(workdir, name),
                        ignore=shutil.ignore_patterns("samples"))
    c = _config(("distill",))
    c.distill.max_steps_per_run = 3
    first = run_experiment(to_experiment(c), workdir)["distill"]
    assert first["step"] == 3 and not first["finished"]
    c.distill.max_steps_per_run = 0
    exp = to_experiment(c)
    assert run_experiment(exp, workdir)["distill"]["step"] == 8
    ref = _per_step(os.path.join(ref_dir, "distill_metrics.jsonl"))
    got = _per_step(os.path.join(workdir, "distill_metrics.jsonl"))
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert got[step]["data_fingerprint"] == ref[step]["data_fingerprint"], f"data order differs at step {step}"
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-6, err_msg=f"loss at step {step}")

    gen = load_generator(exp, workdir, make_mesh(exp.mesh.sizes), student=True)
    assert (gen.sample.sampler.value, gen.sample.num_steps, gen.sample.cfg_scale) == ("flow_map", 1, 1.0)
    assert gen.dit.cfg.conditions.flow_map

    # The step curves score the student on held-out captions, text-to-video and image-to-video (its i2v output
    # frame 0 against the given frame): one step count here; the teacher's solvers are rows of the same kind.
    from klingjax.eval.step_curves import step_curves

    out = step_curves(workdir, str(tmp_path / "steps"), students=[workdir], steps=(2,), samplers=(), num_clips=2,
                      fvd=False)
    (row,) = out["rows"]
    assert (row["model"], row["sampler"], row["steps"], row["nfe"]) == ("student:mean_flow", "flow_map", 2, 2)
    assert 0.0 <= row["adherence_colour_acc"] <= 1.0 and row["i2v_first_frame_psnr"] > 0
    assert os.path.getsize(tmp_path / "steps" / "step_curves.png") > 0


def test_init_from_loads_params_and_starts_fresh(reference, tmp_path):
    """`dit.init_from` starts a new run from another run's EMA params (fresh optimiser, step 0)."""
    from flax import nnx

    from klingjax import layout
    from klingjax.models.dit import WanDiT
    from klingjax.train.checkpoint import restore_params

    ref_dir, _ = reference
    workdir = str(tmp_path)
    for name in ("data", "vae", "latents"):
        shutil.copytree(os.path.join(ref_dir, name), os.path.join(workdir, name),
                        ignore=shutil.ignore_patterns("samples"))
    c = _config(("dit",))
    c.dit.init_from = os.path.join(ref_dir, "dit")
    c.dit.steps, c.dit.checkpoint_every = 1, 1  # step 1 runs at warmup lr 0: params stay the loaded ones
    exp = to_experiment(c)
    run_experiment(exp, workdir)

    abstract = nnx.eval_shape(lambda: WanDiT(layout.dit_model_config(exp, 384), rngs=nnx.Rngs(0)))
    want = restore_params(os.path.join(ref_dir, "dit"), abstract, use_ema=True)
    got = restore_params(os.path.join(workdir, "dit"), abstract, use_ema=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(_per_step(os.path.join(workdir, "dit_metrics.jsonl"))) == 1


def test_eval_cli_generates_from_a_trained_workdir(reference, tmp_path):
    """`klingjax-eval --checkpoint WORKDIR --dataset DIR`: generate held-out captions, then score them."""
    from klingjax.eval import cli

    ref_dir, _ = reference
    out = str(tmp_path / "eval")
    result = cli.main(["--checkpoint", ref_dir, "--dataset", os.path.join(ref_dir, "data"), "--out", out,
                       "--metrics", "adherence,psnr", "--limit", "2"])
    videos = np.load(os.path.join(out, "generated", "videos.npy"))
    assert videos.shape[0] == 2 and videos.dtype == np.uint8
    assert "adherence_colour_acc" in result["metrics"] and "psnr" in result["metrics"]
    assert os.path.exists(os.path.join(out, "report.md"))
    with pytest.raises(SystemExit, match="exactly one"):
        cli.main(["--out", out])


def _safetensors(folder):
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def test_lora_fine_tune_exports_and_merges(reference, tmp_path):
    """A LoRA fine-tune of the reference (its VAE, its frozen DiT, a new colour) exports the base's transformer + a
    PEFT LoRA file, and `klingjax-merge-lora` gives a plain work dir computing what base + factors compute."""
    import jax.numpy as jnp

    from klingjax import layout
    from klingjax.export.export import export_checkpoint
    from klingjax.export.merge_lora import merge_workdir
    from klingjax.models.conditions import Conditions
    from klingjax.sharding.mesh import make_mesh
    from klingjax.train.stages import trained_dit

    ref_dir, _ = reference
    c = _config(("data", "cache", "dit"))
    c.vae.from_workdir = ref_dir
    c.data.extra_colours = {"pink": (250, 190, 210)}
    c.dit.init_from = os.path.join(ref_dir, "dit")
    c.dit.trainable.mode, c.dit.trainable.lora_rank, c.dit.trainable.lora_alpha = "lora", 2, 4.0
    c.dit.steps, c.dit.checkpoint_every, c.dit.optim.warmup_steps = 3, 3, 1
    exp = to_experiment(c)
    ft = str(tmp_path / "ft")
    run_experiment(exp, ft)

    out, base_out = str(tmp_path / "export"), str(tmp_path / "base_export")
    summary = export_checkpoint(ft, out, ema=True)
    export_checkpoint(os.path.join(ref_dir, "dit"), base_out, ema=True)
    assert summary["components"]["transformer"]["base"]["step"] == 12
    got, want = _safetensors(os.path.join(out, "transformer")), _safetensors(os.path.join(base_out, "transformer"))
    assert got.keys() == want.keys()
    for k in want:  # the transformer is the base's: the fine-tune trained only its factors
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    lora = _safetensors(os.path.join(out, "lora"))
    layers = layout.dit_model_config(exp, 384).num_layers
    assert len(lora) == 2 * layers * 10 and all(k.startswith("transformer.blocks.") for k in lora)

    merged = str(tmp_path / "merged")
    merge_workdir(ft, merged)
    mesh = make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
    models = {name: trained_dit(layout.load_workdir_config(w), w, mesh, text_dim=384)
              for name, w in (("lora", ft), ("merged", merged), ("base", ref_dir))}
    assert models["merged"].cfg.lora is None
    t, h, w, ch = layout.latent_grid(exp)
    x = jax.random.normal(jax.random.key(0), (2, t, h, w, ch))
    cond = Conditions(text=jax.random.normal(jax.random.key(1), (2, 5, 384)), text_mask=jnp.ones((2, 5), bool))
    y = {name: np.asarray(m(x, jnp.array([200.0, 800.0]), cond)) for name, m in models.items()}
    assert np.abs(y["lora"] - y["base"]).max() > 1e-4  # the factors trained
    np.testing.assert_allclose(y["merged"], y["lora"], atol=1e-5, rtol=0)
    merged_export = str(tmp_path / "merged_export")
    export_checkpoint(ft, merged_export, ema=True, merge_lora=True)
    plain_export = str(tmp_path / "plain_export")
    export_checkpoint(os.path.join(merged, "dit"), plain_export, ema=True)
    a, b = _safetensors(os.path.join(merged_export, "transformer")), _safetensors(os.path.join(plain_export,
                                                                                              "transformer"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
    assert not os.path.exists(os.path.join(merged_export, "lora"))
