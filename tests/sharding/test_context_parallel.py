"""Context-parallel attention on 8 fake CPU devices: both strategies equal single-device attention (forward and
gradient), the compiled program really uses all-to-all / collective-permute, and bad sizes fail before compiling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.layers.attention import WanAttention, attention
from klingjax.models.layers.rope import rope_3d
from klingjax.sharding.context_parallel import (
    ContextParallel,
    context_parallel_attention,
    context_parallel_enabled,
    validate_parallelism,
)
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train.state import state_shardings

A2A, RING = ContextParallel.ALL_TO_ALL, ContextParallel.RING
CP_RULES = get_rules("fsdp_cp")  # act_length -> context, act_heads -> tensor, batch -> data x fsdp
COLLECTIVE = {A2A: "all-to-all", RING: "collective-permute"}
FAST = {"xla_backend_optimization_level": 0}


def _qkv_mask(b=2, n=32, h=8, k=8, seed=0):
    rng = np.random.RandomState(seed)
    q, k_, v = (jnp.asarray(rng.randn(b, n, h, k).astype(np.float32)) for _ in range(3))
    mask = jnp.asarray(np.arange(n)[None, :] < rng.randint(n // 4, n, size=(b, 1)))  # padded keys, >= n/4 real
    return q, k_, v, mask


def _value_and_grads(attn):
    """jit-able f(q, k, v) -> ((loss, out), (dq, dk, dv)) for a nonlinear scalar loss of attn's output."""

    def loss(q, k, v):
        out = attn(q, k, v)
        return jnp.sum(out * jnp.sin(out)), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache
def _reference():
    """Single-device ((loss, out), grads) of plain `attention` on `_qkv_mask()`, computed once per session."""
    q, k, v, mask = _qkv_mask()
    return jax.jit(_value_and_grads(lambda q, k, v: attention(q, k, v, mask)))(q, k, v)


@pytest.mark.parametrize(
    "mesh_shape",
    [
        (1, 1, 8, 1),  # context = 8
        pytest.param((2, 1, 4, 1), marks=pytest.mark.slow),  # data = 2 x context = 4
        (1, 2, 2, 2),  # fsdp = 2 x context = 2 x tensor = 2 (heads split over tensor too)
    ],
    ids=["cp8", "dp2xcp4", "fsdp2xcp2xtp2"],
)
@pytest.mark.parametrize("strategy", [A2A, RING], ids=["all_to_all", "ring"])
def test_cp_attention_matches_single_device_forward_and_grad(mesh_shape, strategy):
    q, k, v, mask = _qkv_mask()
    (_, ref), ref_grads = _reference()
    with jax.set_mesh(make_mesh(mesh_shape)), nnx.logical_axis_rules(CP_RULES):
        fn = _value_and_grads(lambda q, k, v: context_parallel_attention(q, k, v, mask, strategy=strategy))
        compiled = jax.jit(fn, compiler_options=FAST).lower(q, k, v).compile()
        (_, out), grads = compiled(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)
    assert "context" in str(out.sharding.spec)  # the output stays split over the sequence
    hlo = compiled.as_text()
    assert COLLECTIVE[strategy] in hlo, f"{strategy} compiled without {COLLECTIVE[strategy]}: silent fallback?"
    other = COLLECTIVE[RING if strategy is A2A else A2A]
    assert other not in hlo  # and not the other strategy's collective


def _wan_attention(strategy):
    """A WanAttention (D=64, 8 heads of 8) with random (non-identity) QK-norm scales."""
    attn = WanAttention(64, 8, context_parallel=strategy, rngs=nnx.Rngs(0))
    for norm in (attn.norm_q, attn.norm_k):
        norm.scale[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), norm.scale.shape)
    return attn


@pytest.mark.parametrize("strategy", [A2A, pytest.param(RING, marks=pytest.mark.slow)], ids=["all_to_all", "ring"])
def test_wan_self_attention_with_rope_under_fsdp_cp_matches_unsharded(strategy):
    """Self-attention (3D RoPE) takes the CP path on fsdp=2 x context=2 x tensor=2 with sharded params; the
    cross-attention next to it (text length 5, not divisible by anything) keeps the plain path, with a key mask
    and with a per-query mask whose query axis is split over "context" like the tokens; all match."""
    grid = (2, 4, 4)  # (t, h, w) -> N = 32 tokens
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 32, 64).astype(np.float32))  # (B, N, D)
    text = jnp.asarray(rng.randn(4, 5, 64).astype(np.float32))  # (B, L, D)
    text_mask = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3], [1], [4]]))
    per_query = jnp.asarray(rng.rand(4, 32, 5) < 0.6).at[..., 0].set(True)  # (B, N, L), every query reads a key
    rope = rope_3d(grid, 8)
    graphdef, state = nnx.split(_wan_attention(strategy))

    def both(state, x, text):
        m = nnx.merge(graphdef, state)
        return m(x, rope=rope), m(x, text, kv_mask=text_mask), m(x, text, kv_mask=per_query)

    ref_self, ref_cross, ref_per_query = jax.jit(both, compiler_options=FAST)(state, x, text)
    mesh = make_mesh((1, 2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(CP_RULES):
        sharded_state = jax.device_put(state, state_shardings(state, mesh, CP_RULES))
        assert "tensor" in str(sharded_state["to_q"]["kernel"][...].sharding.spec)  # heads really split
        compiled = jax.jit(lambda s, x, t: both(s, x, t), compiler_options=FAST).lower(sharded_state, x, text).compile()
        out_self, out_cross, out_per_query = compiled(sharded_state, x, text)
    np.testing.assert_allclose(out_self, ref_self, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_cross, ref_cross, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_per_query, ref_per_query, atol=1e-5, rtol=0)
    assert COLLECTIVE[strategy] in compiled.as_text()


# ---------------------------------------------------------------------------------------------------------
# Errors and gating (trace time only: nothing here compiles)
# ---------------------------------------------------------------------------------------------------------


def _trace_cp(shape, mesh_shape, strategy, rules=CP_RULES):
    q = jax.ShapeDtypeStruct(shape, jnp.float32)
    with jax.set_mesh(make_mesh(mesh_shape)), nnx.logical_axis_rules(rules):
        return jax.eval_shape(lambda q: context_parallel_attention(q, q, q, strategy=strategy), q)


def test_sequence_not_divisible_by_context_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sequence length 12 .* not divisible by the context mesh axis size 8"):
        _trace_cp((2, 12, 8, 8), (1, 1, 8, 1), RING)


def test_heads_not_divisible_by_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_heads=3 is not divisible by the tensor mesh size 2"):
        _trace_cp((2, 16, 3, 8), (1, 2, 2, 2), RING)


def test_all_to_all_needs_heads_per_shard_divisible_by_context_and_suggests_ring():
    with pytest.raises(ValueError, match=r"\(4 heads / 2 = 2\) .* context mesh axis size 4; use ContextParallel.RING"):
        _trace_cp((2, 16, 4, 8), (1, 1, 4, 2), A2A)
    assert _trace_cp((2, 16, 4, 8), (1, 1, 4, 2), RING).shape == (2, 16, 4, 8)  # ring has no such limit


def test_wan_attention_raises_before_compiling():
    """The layer's CP path checks sizes while tracing: 30 tokens on context = 4."""
    attn = _wan_attention(A2A)
    x = jax.ShapeDtypeStruct((2, 30, 64), jnp.float32)
    with jax.set_mesh(make_mesh((2, 1, 4, 1))), nnx.logical_axis_rules(CP_RULES):
        with pytest.raises(ValueError, match="sequence length 30"):
            jax.eval_shape(lambda x: attn(x), x)


def test_validate_parallelism_on_config_and_mesh():
    cp4 = make_mesh((2, 1, 4, 1))
    validate_parallelism(12, 4096, cp4, CP_RULES, RING)
    validate_parallelism(12, 4096, cp4, CP_RULES, A2A)  # 12 heads / tensor 1 = 12, divisible by 4
    with pytest.raises(ValueError, match="use ContextParallel.RING"):
        validate_parallelism(12, 4096, make_mesh((1, 1, 8, 1)), CP_RULES, A2A)
    with pytest.raises(ValueError, match="sequence length 4095"):
        validate_parallelism(12, 4095, cp4, CP_RULES, RING)
    with pytest.raises(ValueError, match="num_heads=5"):
        validate_parallelism(5, 64, make_mesh((1, 2, 2, 2)), CP_RULES, RING)
    # No context split: only the heads rule applies, any sequence length is fine.
    validate_parallelism(12, 4095, make_mesh((2, 4, 1, 1)), get_rules("fsdp"), A2A)


def test_cp_is_enabled_only_with_a_context_axis_and_a_length_rule():
    assert context_parallel_enabled(make_mesh((2, 1, 4, 1)), CP_RULES)
    assert not context_parallel_enabled(make_mesh((2, 4, 1, 1)), CP_RULES)  # context axis of size 1
    no_length = tuple((k, None if k == "act_length" else v) for k, v in CP_RULES)
    assert not context_parallel_enabled(make_mesh((2, 1, 4, 1)), no_length)
    assert not context_parallel_enabled(jax.sharding.get_abstract_mesh(), CP_RULES)  # no mesh at all
    with pytest.raises(ValueError, match="needs an active mesh"):
        context_parallel_attention(*_qkv_mask()[:3])


@pytest.mark.parametrize("switch", [{"attention_layout": "factorized"}, {"text_attention": "joint"}])
def test_dit_ablation_switches_refuse_context_parallelism(switch):
    from klingjax.models.conditions import Conditions
    from klingjax.models.dit import WanDiT, dit_config

    cfg = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_channels=4, out_channels=4,
                     text_dim=8, **switch)
    model = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    lat, t, ctx = jnp.zeros((2, 2, 4, 4, 4)), jnp.zeros((2,)), jnp.zeros((2, 3, 8))
    with jax.set_mesh(make_mesh((2, 1, 4, 1))), nnx.logical_axis_rules(CP_RULES):
        with pytest.raises(ValueError, match="context parallelism .* supports only"):
            jax.eval_shape(lambda: model(lat, t, Conditions(ctx)))
