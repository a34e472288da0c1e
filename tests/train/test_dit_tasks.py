"""The DiT stage's masked-video task mixture: what each example carries, the config checks, the loss.

The end-to-end run (every stage, SIGKILL + bit-exact resume with the mixture) is tests/train/test_smoke.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kling
from klingjax.config import ConfigError, to_experiment
from klingjax.data import tasks
from klingjax.models.conditions import Conditions
from klingjax.train.batch import latent_batch
from klingjax.train.stages import TASK_IDS, LatentDecoder

GRID = (3, 8, 8, 4)  # (t, h, w, c) latents


def _record(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal(GRID).astype(np.float32),
            "frame_latent": rng.standard_normal(GRID).astype(np.float32),
            "text": rng.standard_normal((5, 6)).astype(np.float16), "text_mask": np.ones(5, bool)}


def _decoder(**weights) -> LatentDecoder:
    return LatentDecoder(mean=np.full(4, 0.5, np.float32), std=np.full(4, 2.0, np.float32),
                         tasks=tuple(sorted(weights.items())), patch=(1, 2, 2))


def test_examples_draw_tasks_from_their_own_stream_and_take_the_tasks_source():
    dec = _decoder(i2v=1.0, flf2v=1.0, inpaint=1.0)
    record = _record()
    latent = (record["latent"] - 0.5) / 2.0
    frames = (record["frame_latent"] - 0.5) / 2.0
    seen = set()
    for index in range(40):
        a = dec.random_map(record, np.random.default_rng([0, 0, index, 0]))
        b = dec.random_map(record, np.random.default_rng([0, 0, index, 0]))
        for key in ("given", "given_mask", "task"):
            np.testing.assert_array_equal(a[key], b[key])  # a pure function of the example's stream
        name = list(TASK_IDS)[int(a["task"])]
        seen.add(name)
        np.testing.assert_allclose(a["latent"], latent)
        want = frames if tasks.TASKS[name].source == tasks.SOURCE_FRAMES else latent
        np.testing.assert_allclose(a["given"], want)
        assert a["given_mask"].shape == GRID[:3] and a["given_mask"].dtype == bool
        tokens = a["given_mask"].reshape(3, 4, 2, 4, 2)  # whole (1, 2, 2) patches: given or generated together
        assert (tokens.all((2, 4)) == tokens.any((2, 4))).all()
        assert a["given_mask"].any() and not a["given_mask"].all()
    assert seen == {"i2v", "flf2v", "inpaint"}


def test_text_to_video_examples_carry_no_given_fields_and_old_caches_fail_clearly():
    out = LatentDecoder(mean=np.zeros(4, np.float32), std=np.ones(4, np.float32)).random_map(
        _record(), np.random.default_rng(0))
    assert set(out) == {"latent", "text", "text_mask"}
    old = {k: v for k, v in _record().items() if k != "frame_latent"}
    with pytest.raises(KeyError, match="frame_latent"):
        _decoder(flf2v=1.0).random_map(old, np.random.default_rng(0))


def test_latent_batch_carries_the_given_fields_in_conditions():
    dec = _decoder(i2v=1.0)
    examples = [dec.random_map(_record(i), np.random.default_rng(i)) for i in range(2)]
    stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch = latent_batch(stacked)
    assert batch.cond.given.shape == (2, *GRID) and batch.cond.given_mask.shape == (2, *GRID[:3])
    assert batch.task.tolist() == [TASK_IDS["i2v"]] * 2
    assert isinstance(batch.cond, Conditions)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.dit.tasks.update({"teleport": 1.0}), "dit.tasks': unknown task"),
    (lambda c: c.dit.tasks.update({"i2v": -1.0}), "dit.tasks.i2v"),
    (lambda c: setattr(c.dit, "visual_dropout", 1.0), "dit.visual_dropout"),
    (lambda c: c.dit.model_overrides.update({"conditions": {"masked_video": "off"}}), "masked_video' is off"),
    (lambda c: c.dit.model_overrides.update({"conditions": {"masked_video": "sideways"}}), "masked_video"),
    (lambda c: setattr(c.dit, "context_noise", 1.0), "dit.context_noise': must be in"),
    (lambda c: (setattr(c.dit, "context_noise", 0.1),
                c.dit.model_overrides.update({"conditions": {"masked_video": "channel_concat"}})),
     "dit.context_noise': noisy given latents need"),
    (lambda c: setattr(c.data, "motion", "wrap"), "data.motion"),
])
def test_bad_task_configs_fail_naming_the_key(edit, match):
    c = kling.get_config("runlocal")
    edit(c)
    with pytest.raises(ConfigError, match=match):
        to_experiment(c)


def test_kling_configs_validate_for_both_modes():
    for arg in ("", "runlocal", "channel_concat", "channel_concat,runlocal"):
        exp = to_experiment(kling.get_config(arg))
        assert exp.dit.tasks["i2v"] > 0
    with pytest.raises(ValueError, match="unknown arg"):
        kling.get_config("sideways")


def test_dit_stage_loss_ignores_predictions_at_given_positions_and_reports_each_task(tmp_path):
    """Through the stage's loss: outputs that differ only at given positions give the same loss; per-task means."""
    from klingjax.train.batch import LatentBatch
    from klingjax.train.stages import dit_stage
    from klingjax.train.step import LossContext

    c = kling.get_config("runlocal")
    c.dit.visual_dropout = 0.0
    exp = to_experiment(c)
    null = (np.zeros((16, 384), np.float32), np.zeros(16, bool))
    spec = dit_stage(exp, str(tmp_path), null)
    b, grid = 4, (3, 8, 8, 8)
    mask = np.zeros((b, *grid[:3]), bool)
    mask[:2, 0] = True  # rows 0-1: i2v, rows 2-3: t2v
    x0 = jax.random.normal(jax.random.key(0), (b, *grid))
    cond = Conditions(text=jnp.ones((b, 16, 384)), text_mask=jnp.ones((b, 16), bool), given=x0,
                      given_mask=jnp.asarray(mask))
    batch = LatentBatch(latent=x0, cond=cond, task=jnp.asarray([TASK_IDS["i2v"]] * 2 + [TASK_IDS["t2v"]] * 2))

    def model(junk):
        return lambda x, t, c: jnp.where(jnp.asarray(mask)[..., None], junk, 0.5 * x)

    ctx = LossContext(step=jnp.zeros((), jnp.int32))
    loss_a, m_a = spec.loss_fn(model(0.0), batch, jax.random.key(1), ctx)
    loss_b, m_b = spec.loss_fn(model(1e3), batch, jax.random.key(1), ctx)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert float(m_a["loss_i2v"]) > 0 and float(m_a["loss_t2v"]) > 0 and float(m_a["loss_inpaint"]) == 0
    np.testing.assert_allclose((m_a["loss_i2v"] + m_a["loss_t2v"]) / 2, loss_a, rtol=1e-5)


def test_context_noise_feeds_noisy_given_latents_and_tells_the_model_their_level(tmp_path):
    """dit.context_noise: the model sees (1 - s) x0 + s e at given positions with Conditions.given_time = s in
    [0, context_noise); the generated positions see the usual x_t."""
    from klingjax.train.batch import LatentBatch
    from klingjax.train.stages import dit_stage
    from klingjax.train.step import LossContext

    c = kling.get_config("runlocal")
    c.dit.visual_dropout, c.dit.context_noise = 0.0, 0.2
    spec = dit_stage(to_experiment(c), str(tmp_path), (np.zeros((16, 384), np.float32), np.zeros(16, bool)))
    b, grid = 4, (3, 8, 8, 8)
    mask = np.zeros((b, *grid[:3]), bool)
    mask[:, 0] = True
    x0 = jax.random.normal(jax.random.key(0), (b, *grid))
    cond = Conditions(text=jnp.ones((b, 16, 384)), text_mask=jnp.ones((b, 16), bool), given=x0,
                      given_mask=jnp.asarray(mask))
    seen = {}

    def model(x, t, c):
        seen.update(x=x, level=c.given_time)
        return x

    ctx = LossContext(step=jnp.zeros((), jnp.int32))
    spec.loss_fn(model, LatentBatch(latent=x0, cond=cond), jax.random.key(1), ctx)
    level = np.asarray(seen["level"])
    assert level.shape == (b,) and (level >= 0).all() and (level < 0.2).all() and np.ptp(level) > 0
    err = np.asarray(seen["x"] - x0)[:, 0]  # the given frame: s (e - x0), of std s sqrt(2) (x0, e ~ N(0, 1))
    np.testing.assert_allclose(err.std(axis=(1, 2, 3)), level * np.sqrt(2.0), rtol=0.1)


def test_long_video_configs_validate():
    from experiments import long_video

    for arg in ("", "runlocal"):
        exp = to_experiment(long_video.get_config(arg))
        assert exp.data.motion == "bounce" and exp.dit.context_noise > 0 and exp.dit.tasks["prefix"] > 0
    with pytest.raises(ValueError, match="unknown arg"):
        long_video.get_config("sideways")
