"""Zero-initialised condition adapters (models/layers/adapters.py): a camera model starts as its text-to-video base,
FIRST_BLOCKS gates the later blocks off, Conditions.camera is validated; a flow-map student starts as its teacher for
every jump length and then reads it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.conditions import CameraCondition, Conditions, ConditionSpec
from klingjax.models.dit import WanDiT, dit_config

CFG = dit_config("XS", num_layers=3, dim=32, ffn_dim=64, num_heads=2, in_channels=4, out_channels=4)
X = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, 4))
T = jnp.array([100.0, 700.0])
COND = Conditions(text=jax.random.normal(jax.random.key(2), (2, 5, 384)), text_mask=jnp.ones((2, 5), bool))
CAMERA = jax.random.normal(jax.random.key(5), (2, 3, 4))


def _camera_model(mode: CameraCondition) -> WanDiT:
    return WanDiT(dataclasses.replace(CFG, conditions=ConditionSpec(camera=mode, camera_blocks=2)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", [CameraCondition.ALL_BLOCKS, CameraCondition.FIRST_BLOCKS])
def test_zero_initialised_adapter_leaves_the_t2v_output_unchanged(mode):
    base = WanDiT(CFG, rngs=nnx.Rngs(0))
    model = _camera_model(mode)
    np.testing.assert_array_equal(base(X, T, COND), model(X, T, COND.replace(camera=CAMERA)))
    model.blocks.camera_proj.kernel[...] = 0.1 * jax.random.normal(jax.random.key(3),
                                                                   model.blocks.camera_proj.kernel.shape)
    assert float(jnp.abs(base(X, T, COND) - model(X, T, COND.replace(camera=CAMERA))).max()) > 1e-3
    want = [1.0, 1.0, 0.0] if mode is CameraCondition.FIRST_BLOCKS else [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(model.blocks.camera_gate[...], want)
    assert "camera_gate" not in str(nnx.state(model, nnx.Param))  # a fixed gate, never trained


def test_camera_is_validated():
    model = _camera_model(CameraCondition.ALL_BLOCKS)
    with pytest.raises(ValueError, match=r"Conditions.camera must be \(B, t, 4\) = \(2, 3, 4\)"):
        model(X, T, COND.replace(camera=CAMERA[:, :2]))
    with pytest.raises(ValueError, match="ConditionSpec has camera=off"):
        WanDiT(CFG, rngs=nnx.Rngs(0))(X, T, COND.replace(camera=CAMERA))
    with pytest.raises(ValueError, match="conditions.camera: 'sideways' is not one of"):
        ConditionSpec.from_config({"camera": "sideways"})


def test_flow_map_student_starts_as_its_teacher_then_reads_the_jump_length():
    base = WanDiT(CFG, rngs=nnx.Rngs(0))
    student = WanDiT(dataclasses.replace(CFG, conditions=ConditionSpec(flow_map=True)), rngs=nnx.Rngs(0))
    jump = jnp.array([0.5, 0.05])
    np.testing.assert_array_equal(base(X, T, COND), student(X, T, COND.replace(interval=jump)))
    student.interval_embedder.linear_2.kernel[...] = 0.1 * jax.random.normal(
        jax.random.key(3), student.interval_embedder.linear_2.kernel.shape)
    a, b = student(X, T, COND.replace(interval=jump)), student(X, T, COND.replace(interval=2 * jump))
    assert float(jnp.abs(a - b).max()) > 1e-4  # other jumps, other outputs
    with pytest.raises(ValueError, match=r"Conditions.interval must be \(B,\) = \(2,\)"):
        student(X, T, COND.replace(interval=jump[:1]))
    with pytest.raises(ValueError, match="ConditionSpec has flow_map=False"):
        base(X, T, COND.replace(interval=jump))
