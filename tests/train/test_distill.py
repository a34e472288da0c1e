"""The distill stage's loss and config (klingjax/train/distill.py): the student starts as its teacher, given
positions stay out of the loss, and bad distill configs fail naming the key. Resume is in test_smoke.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import distill as distill_exp
from experiments import kling
from klingjax import layout
from klingjax.config import ConfigError, to_experiment
from klingjax.models.conditions import Conditions
from klingjax.models.dit import WanDiT
from klingjax.train import distill
from klingjax.train.batch import LatentBatch
from klingjax.train.step import LossContext

NULL = (np.zeros((16, 384), np.float32), np.zeros(16, bool))
GRID = (3, 8, 8, 8)  # the kling runlocal latents (t, h, w, C)


def _exp(method, **distill_keys):
    c = kling.get_config("runlocal")
    c.distill.method = method
    for k, v in distill_keys.items():
        c.distill[k] = v
    return to_experiment(c)


def _batch(b=4, masked=True):
    x0 = jax.random.normal(jax.random.key(0), (b, *GRID))
    mask = np.zeros((b, *GRID[:3]), bool)
    mask[:2, 0] = True  # rows 0-1: the first latent frame given (i2v), rows 2-3: text-to-video
    text = jax.random.normal(jax.random.key(1), (b, 16, 384))
    cond = Conditions(text=text, text_mask=jnp.ones((b, 16), bool))
    if masked:
        cond = cond.replace(given=x0, given_mask=jnp.asarray(mask))
    return LatentBatch(latent=x0, cond=cond), mask


def _models(exp):
    teacher = WanDiT(layout.dit_model_config(exp, 384), rngs=nnx.Rngs(3))
    student = WanDiT(distill.student_model_config(exp, 384), rngs=nnx.Rngs(3))  # same base params, adapters zero
    return teacher, student


@pytest.mark.parametrize("method,keys", [
    ("trajectory", dict(student_steps=(2,), teacher_steps=2)),  # K = 1: the teacher's jump is its own Euler step
    ("mean_flow", dict(student_steps=(1, 2), instant_fraction=1.0)),  # r = t: the target is the teacher's velocity
    ("shortcut", dict(student_steps=(2,), teacher_steps=2)),  # one level, from the teacher's own Euler step
])
def test_a_student_at_init_is_its_teacher_so_its_loss_is_zero(method, keys):
    exp = _exp(method, cfg_scale=1.0, visual_cfg_scale=1.0, **keys)  # guidance 1: the teacher is one evaluation
    spec = distill.distill_stage(exp, "/nonexistent", None, NULL)
    teacher, student = _models(exp)
    batch, _ = _batch()
    ctx = LossContext(step=jnp.zeros((), jnp.int32), frozen={"teacher": nnx.state(teacher)})
    loss, metrics = spec.loss_fn(student, batch, jax.random.key(2), ctx)
    assert float(loss) < 1e-9, float(loss)
    if method == "mean_flow":
        return
    # With guidance the targets move away from the student's own velocity: the loss is not trivially 0.
    exp4 = _exp(method, cfg_scale=4.0, **keys)
    loss4, _ = distill.distill_stage(exp4, "/nonexistent", None, NULL).loss_fn(student, batch, jax.random.key(2), ctx)
    assert float(loss4) > 1e-4


class _Junk(nnx.Module):
    """A student whose outputs at given positions are `junk` and elsewhere a function of (x, t, interval)."""

    def __init__(self, mask, junk):
        self.w = nnx.Param(jnp.asarray(0.5))
        self.mask, self.junk = mask, junk

    def __call__(self, x, t, c):
        h = 0.0 if c.interval is None else c.interval.reshape(-1, 1, 1, 1, 1)
        out = self.w[...] * x * (1.0 + t.reshape(-1, 1, 1, 1, 1) / 1000.0 + h)
        return jnp.where(jnp.asarray(self.mask)[..., None], self.junk, out)


@pytest.mark.parametrize("method", ["trajectory", "mean_flow", "shortcut"])
def test_the_loss_ignores_the_student_at_given_positions(method):
    exp = _exp(method, student_steps=(2,) if method == "trajectory" else (2, 1), teacher_steps=4)
    spec = distill.distill_stage(exp, "/nonexistent", None, NULL)
    teacher, _ = _models(exp)
    batch, mask = _batch()
    ctx = LossContext(step=jnp.zeros((), jnp.int32), frozen={"teacher": nnx.state(teacher)})
    loss_a, _ = spec.loss_fn(_Junk(mask, 0.0), batch, jax.random.key(1), ctx)
    loss_b, _ = spec.loss_fn(_Junk(mask, 1e3), batch, jax.random.key(1), ctx)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    assert float(loss_a) > 0


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.distill.update(student_steps=(2, 4)), "distill.student_steps"),
    (lambda c: c.distill.update(teacher_steps=10), "distill.teacher_steps"),
    (lambda c: c.distill.update(student_steps=(0,)), "distill.student_steps"),
    (lambda c: c.distill.update(instant_fraction=1.5), "distill.instant_fraction"),
    (lambda c: c.distill.update(cfg_scale=-1.0), "distill.cfg_scale"),
    (lambda c: c.distill.update(variant="S"), "distill.variant"),
    (lambda c: c.distill.update(method="dmd"), "distill.method"),
    (lambda c: c.distill.update(method="shortcut", student_steps=(1, 3)), "shortcut levels double"),
    (lambda c: c.distill.update(method="shortcut", student_steps=(4, 8), teacher_steps=12), "distill.teacher_steps"),
    (lambda c: c.sample.update(sampler="flow_map"), "sample.sampler"),
])
def test_bad_distill_configs_fail_naming_the_key(edit, match):
    c = kling.get_config("runlocal")
    edit(c)
    with pytest.raises(ConfigError, match=match):
        to_experiment(c)


def test_students_sample_with_guidance_one_and_their_own_solver():
    for arg in ("trajectory", "trajectory,steps=2,runlocal", "mean_flow", "shortcut,runlocal", "shortcut,steps=2"):
        exp = to_experiment(distill_exp.get_config(arg))
        s = distill.student_sample_config(exp)
        assert (s.cfg_scale, s.visual_cfg_scale) == (1.0, 1.0)
        assert s.num_steps == exp.distill.student_steps[0]
        assert s.sampler.value == ("euler" if arg.startswith("trajectory") else "flow_map")
    assert dataclasses.replace(exp.sample).sampler.value == "euler"  # the teacher's own sampling is untouched
    with pytest.raises(ValueError, match="unknown arg"):
        distill_exp.get_config("dmd")
