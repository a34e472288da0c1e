"""LoRA on the DiT's linear layers: zero-initialised factors leave a model's output unchanged, merging is exact, the
factors carry the kernels' logical axes (so the sharding rules place them), and bad targets are named."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.conditions import Conditions
from klingjax.models.dit import WanDiT, dit_config
from klingjax.models.layers.lora import LoRAConfig, dense_layers, merge_lora

CFG = dit_config("XS", num_layers=2, dim=32, ffn_dim=64, num_heads=2, in_channels=4, out_channels=4)
LORA = LoRAConfig(rank=4, alpha=8.0)


def _inputs():
    x = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
    cond = Conditions(text=jax.random.normal(jax.random.key(2), (2, 5, 384)), text_mask=jnp.ones((2, 5), bool))
    return x, jnp.array([100.0, 700.0]), cond


def _randomise_b(model: WanDiT) -> None:
    for i, layer in enumerate(dense_layers(model).values()):
        if layer.lora_b is not None:
            layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(10 + i), layer.lora_b.shape)


def test_fresh_factors_leave_the_base_output_unchanged():
    base = WanDiT(CFG, rngs=nnx.Rngs(0))
    lora = WanDiT(dataclasses.replace(CFG, lora=LORA), rngs=nnx.Rngs(0))
    # The base params are drawn first, exactly as without LoRA; the factors come after.
    for a, b in zip(jax.tree.leaves(nnx.state(base, nnx.Param)),
                    jax.tree.leaves(nnx.state(lora, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(base(*_inputs()), lora(*_inputs()))


def test_merge_equals_the_unmerged_forward():
    model = WanDiT(dataclasses.replace(CFG, lora=LORA), rngs=nnx.Rngs(0))
    _randomise_b(model)
    base = WanDiT(CFG, rngs=nnx.Rngs(0))
    y = model(*_inputs())
    assert float(jnp.abs(y - base(*_inputs())).max()) > 1e-2  # the factors matter
    merged = merge_lora(model)
    assert len(merged) == 2 * 4 + 2  # attn1 + attn2 (q, k, v, out) and the MLP's two layers, stacked over blocks
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(model(*_inputs()), y, atol=1e-5, rtol=0)


def test_factors_carry_the_kernels_axes_and_stack_over_blocks():
    model = nnx.eval_shape(lambda: WanDiT(dataclasses.replace(CFG, lora=LORA), rngs=nnx.Rngs(0)))
    q = model.blocks.attn1.to_q
    assert q.lora_a.shape == (2, 32, 4) and q.lora_b.shape == (2, 4, 32)
    assert q.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "heads")
    assert model.condition_embedder.time_proj.lora_a is None  # not a default target


def test_targets_select_layers_and_bad_ones_are_named():
    only_q = LoRAConfig(rank=2, targets=("attn1/to_q$",))
    model = nnx.eval_shape(lambda: WanDiT(dataclasses.replace(CFG, lora=only_q), rngs=nnx.Rngs(0)))
    assert [n for n, m in dense_layers(model).items() if m.lora_a is not None] == ["blocks/attn1/to_q"]
    with pytest.raises(ValueError, match="'blocks/attn9/'.*match no linear layer"):
        WanDiT(dataclasses.replace(CFG, lora=LoRAConfig(rank=2, targets=("blocks/attn9/",))), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="not a regular expression"):
        LoRAConfig(rank=2, targets=("(",))
