"""Every experiment config variant validates, and its docstring holds a launch command for that file."""

import importlib
import os

import pytest

from klingjax.config import to_experiment

VARIANTS = {
    "demo": [None, "runlocal"],
    "ablation": [None, "runlocal"],
    "vae_recipe": [None, "demo", "runlocal"],
    "t2v_recipe": ["stage1", "stage2", "stage3", "stage1,runlocal", "stage2,runlocal", "stage3,runlocal"],
    "distill": ["trajectory", "trajectory,steps=2", "shortcut", "mean_flow", "trajectory,runlocal",
                "shortcut,runlocal"],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_validate_and_docstring_has_launch_command(name):
    module = importlib.import_module(f"experiments.{name}")
    assert f"--config experiments/{name}.py" in module.__doc__
    exps = {arg: to_experiment(module.get_config(arg)) for arg in VARIANTS[name]}
    runlocal = [e for arg, e in exps.items() if arg and "runlocal" in arg]
    assert runlocal
    for e in runlocal:  # tiny: few steps in every stage it trains, no I3D
        assert all(getattr(e, s).steps <= 20 for s in ("vae", "dit", "distill") if s in e.stages)
        assert "eval" not in e.stages or not e.eval.fvd
    with pytest.raises(ValueError, match="unknown arg"):
        module.get_config("no_such_variant")


def test_t2v_curriculum_grows_and_chains():
    from experiments import t2v_recipe, vae_recipe

    exps = [to_experiment(t2v_recipe.get_config(s)) for s in ("stage1", "stage2", "stage3")]
    assert [e.data.num_frames for e in exps] == [1, 17, 33]  # images first, then clips
    assert [e.data.height * e.data.width for e in exps] == sorted(e.data.height * e.data.width for e in exps)
    steps = [e.dit.steps for e in exps]
    assert steps == sorted(steps) and len(set(steps)) == 3  # cumulative: each stage resumes the previous one
    vae = to_experiment(vae_recipe.get_config(None)).vae
    assert all((e.vae.variant, dict(e.vae.model_overrides)) == (vae.variant, dict(vae.model_overrides)) for e in exps)
    assert all("vae" not in e.stages for e in exps)


def test_ablation_sweep_file_sits_next_to_its_base():
    from launch import sweep

    s, path = sweep.load_sweep(os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                                            "ablation_sweep.py"))
    assert os.path.exists(os.path.join(os.path.dirname(path), s.base.split(":")[0]))
    assert "python -m launch.sweep experiments/ablation_sweep.py" in importlib.import_module(
        "experiments.ablation_sweep").__doc__
