"""Tests for the Wan-compatible DiT: shapes, validation, scan/loop and remat equivalence, masking, per-token RoPE
positions, the Conditions pytree, sharding metadata, and a short overfit. A tiny config keeps XLA compile times low
on 2 CPU cores."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_helpers import fast_jit, overfit_losses
from flax import nnx
from jax.sharding import PartitionSpec as P

from klingjax.models.conditions import Conditions, ConditionSpec
from klingjax.models.dit import DIT_VARIANTS, RematPolicy, WanDiT, dit_config
from klingjax.models.layers.rope import grid_positions
from klingjax.sharding.rules import LOGICAL_AXES

# Tests jit whole computations (eager op-by-op dispatch compiles every op) at low XLA opt level: fast compiles.
TINY = dit_config("XS", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=24)


def _inputs(b=2, t=2, h=4, w=4, seq=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    latents = jax.random.normal(k[0], (b, t, h, w, TINY.in_channels))
    timesteps = jnp.linspace(50.0, 900.0, b)
    context = jax.random.normal(k[1], (b, seq, TINY.text_dim))
    lengths = jnp.array([3, seq] * b)[:b]
    mask = jnp.arange(seq)[None, :] < lengths[:, None]  # (B, L)
    return latents, timesteps, Conditions(context, mask)


@functools.cache
def _forward(cfg):
    """Jitted (state, latents, timesteps, cond) -> velocity for `cfg` (one compile per config and cond layout)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    return fast_jit(lambda state, *args: nnx.merge(graphdef, state)(*args))


def _init(cfg, seed=0):
    return fast_jit(lambda: nnx.state(WanDiT(cfg, rngs=nnx.Rngs(seed))))()


@pytest.fixture(scope="module")
def tiny_state():
    return _init(TINY)


def test_output_shape_and_finite(tiny_state):
    latents, t, cond = _inputs()
    out = _forward(TINY)(tiny_state, latents, t, cond)
    assert out.shape == latents.shape[:4] + (TINY.out_channels,)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_patch_size_mismatch_raises_before_compute():
    model = nnx.eval_shape(lambda: WanDiT(TINY, rngs=nnx.Rngs(0)))  # abstract params: any compute would fail
    _, t, cond = _inputs()
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(jnp.zeros((2, 2, 5, 4, TINY.in_channels)), t, cond)


def test_scan_and_loop_give_same_output(tiny_state):
    loop_cfg = dataclasses.replace(TINY, scan_layers=False)
    loop_state = _init(loop_cfg)
    jax.tree.map(np.testing.assert_array_equal, tiny_state, loop_state)  # same param layout either way
    args = _inputs()
    np.testing.assert_allclose(_forward(TINY)(tiny_state, *args), _forward(loop_cfg)(tiny_state, *args), atol=1e-5)


def test_remat_policies_same_output_and_gradient(tiny_state):
    one_layer = dataclasses.replace(TINY, num_layers=1)  # remat wraps each block alike: one is enough
    state = nnx.State({**tiny_state, "blocks": jax.tree.map(lambda a: a[:1], tiny_state["blocks"])})  # layer 0
    latents, t, cond = _inputs()
    results = []
    for policy in RematPolicy:
        cfg = dataclasses.replace(one_layer, remat=policy)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: WanDiT(cfg, rngs=nnx.Rngs(0))))
        loss = lambda s, g=graphdef: jnp.mean(nnx.merge(g, s)(latents, t, cond) ** 2)
        results.append(fast_jit(jax.value_and_grad(loss))(state))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, results[0][1])
    assert float(jnp.abs(results[0][1]["blocks"]["attn1"]["to_q"]["kernel"][...]).max()) > 0


def test_padded_context_tokens_do_not_change_output(tiny_state):
    latents, t, cond = _inputs()
    ctx, mask = cond.text, cond.text_mask
    noise = jax.random.normal(jax.random.key(9), ctx.shape) * 10
    padded_changed = jnp.where(mask[..., None], ctx, noise)
    real_changed = ctx.at[:, 0].add(1.0)
    fwd = lambda c: _forward(TINY)(tiny_state, latents, t, cond.replace(text=c))
    base = fwd(ctx)
    np.testing.assert_allclose(fwd(padded_changed), base, atol=1e-5)
    assert float(jnp.abs(fwd(real_changed) - base).max()) > 1e-4


def test_params_carry_logical_axis_names(tiny_state):
    params = nnx.state(nnx.eval_shape(lambda: WanDiT(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    specs = nnx.get_partition_spec(params)
    block = specs["blocks"]
    assert block["attn1"]["to_q"]["kernel"].get_value() == P("layers", "embed", "heads")
    assert block["attn2"]["to_out"][0]["kernel"].get_value() == P("layers", "heads", "embed")
    assert block["ffn"]["net"][0]["proj"]["kernel"].get_value() == P("layers", "embed", "mlp")
    assert block["ffn"]["net"][2]["kernel"].get_value() == P("layers", "mlp", "embed")
    assert block["attn1"]["norm_q"]["scale"].get_value() == P("layers", "norm")
    assert specs["condition_embedder"]["text_embedder"]["linear_1"]["kernel"].get_value() == P("text_embed", "embed")
    for spec, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(params)):
        assert len(spec) == leaf.ndim and set(spec) <= LOGICAL_AXES | {None}, spec


def test_variant_table_sizes():
    assert DIT_VARIANTS["1.3B"].head_dim == 128 and DIT_VARIANTS["14B"].head_dim == 128
    model = nnx.eval_shape(lambda: WanDiT(DIT_VARIANTS["1.3B"], rngs=nnx.Rngs(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 1_418_996_800  # diffusers WanTransformer3DModel, Wan2.1-T2V-1.3B
    with pytest.raises(ValueError, match="unknown DiT variant"):
        dit_config("XXL")


def test_short_overfit_reduces_mse():
    cfg = dataclasses.replace(TINY, num_layers=1)
    latents, t, cond = _inputs(b=2, t=1, h=4, w=4)
    target = jax.random.normal(jax.random.key(7), latents.shape)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    losses = overfit_losses(graphdef, _init(cfg, seed=1), (latents, t, cond), target)
    assert losses[-1] < losses[0] / 2, losses


def test_default_positions_equal_explicit_grid_positions(tiny_state):
    """Conditions.positions = the latent grid gives bit-identical velocity; RoPE is relative (a shift of every
    position changes nothing) and the positions are really read (stretching one axis changes the output)."""
    latents, t, cond = _inputs()
    grid = (2, 2, 2)  # (2, 4, 4) latents, patch (1, 2, 2)
    pos = jnp.broadcast_to(grid_positions(grid), (2, 8, 3))  # (B, N, 3)
    fwd = lambda c: np.asarray(_forward(TINY)(tiny_state, latents, t, c))
    base = fwd(cond)
    np.testing.assert_array_equal(fwd(cond.replace(positions=pos)), base)
    np.testing.assert_allclose(fwd(cond.replace(positions=pos + jnp.array([3, -1, 5]))), base, atol=1e-5)
    assert np.abs(fwd(cond.replace(positions=pos * jnp.array([1, 1, 3]))) - base).max() > 1e-4


def test_conditions_concat_and_spec_validation():
    a = Conditions(jnp.zeros((2, 5, 3)), jnp.ones((2, 5), bool))
    both = a.concat(Conditions(jnp.ones((1, 5, 3)), jnp.zeros((1, 5), bool)))
    assert both.text.shape == (3, 5, 3) and both.positions is None
    np.testing.assert_array_equal(both.text_mask[:, 0], [True, True, False])
    with pytest.raises(ValueError, match="text_mask is present in one and None in the other"):
        a.concat(Conditions(jnp.zeros((1, 5, 3))))
    spec = ConditionSpec()
    assert TINY.conditions == spec and dit_config("XS", conditions={}).conditions == spec
    spec.validate(a.replace(positions=jnp.zeros((2, 8, 3))), num_tokens=8)
    with pytest.raises(ValueError, match=r"text_mask must be \(B, L\) = \(2, 5\)"):
        spec.validate(a.replace(text_mask=jnp.ones((2, 4), bool)))
    with pytest.raises(ValueError, match=r"positions must be \(B, N, 3\) = \(2, 8, 3\)"):
        spec.validate(a.replace(positions=jnp.zeros((2, 6, 3))), num_tokens=8)
    with pytest.raises(ValueError, match=r"Conditions.text must be \(B, L, text_dim\)"):
        spec.validate(Conditions(None))
    model = nnx.eval_shape(lambda: WanDiT(TINY, rngs=nnx.Rngs(0)))  # abstract: the checks run before compute
    latents, t, cond = _inputs()
    with pytest.raises(ValueError, match=r"positions must be \(B, N, 3\) = \(2, 8, 3\)"):
        model(latents, t, cond.replace(positions=jnp.zeros((2, 4, 3))))


@pytest.mark.torch
def test_matches_diffusers_wan_transformer():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TINY.num_heads,
        attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_channels,
        out_channels=TINY.out_channels,
        text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim,
        num_layers=TINY.num_layers,
    ).eval()
    with torch.no_grad():  # random everything, norms included, so every parameter matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    latents, t, cond = _inputs(t=3, h=8, w=4)
    ctx = cond.text
    with torch.no_grad():
        want = ref(torch.tensor(np.asarray(latents)).permute(0, 4, 1, 2, 3), torch.tensor(np.asarray(t)),
                   torch.tensor(np.asarray(ctx)), return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()  # fmt: skip
    from klingjax.export import dit_map
    from klingjax.export.importer import load_params

    model = load_params({k: v.numpy() for k, v in ref.state_dict().items()}, dit_map.dit_entries(TINY),
                        dit_map.abstract_dit(TINY), "the DiT")  # the declarative export map, read backwards
    state = nnx.state(model)
    with jax.default_matmul_precision("highest"):
        got = _forward(TINY)(state, latents, t, Conditions(ctx))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
