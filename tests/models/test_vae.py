"""Tests for the Wan-style causal video VAE (klingjax/models/vae.py), on the "tiny" variant."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from klingjax.models.vae import VAE_VARIANTS, CausalVAE, VAEConfig, kl_divergence
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import fit_spec_to_shape, get_rules

CFG = VAE_VARIANTS["tiny"]
HW = 8  # smallest size the tiny variant's 4x spatial factor leaves room for 2x2 latents

# Tests compile many small graphs; XLA's backend optimisation level barely changes them but doubles compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def model() -> CausalVAE:
    return CausalVAE(CFG, rngs=nnx.Rngs(0))


def _jit(model: CausalVAE, method: str):
    """A jitted `model.method(x)` over the split state (compiled once per input shape)."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def fn(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return lambda x: fn(state, x)


def _video(t: int, seed: int = 0, hw: int = HW) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (2, t, hw, hw, 3), minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------------------------------------------------
# Config and shapes
# ---------------------------------------------------------------------------------------------------------


def test_config_factors():
    assert (CFG.spatial_factor, CFG.temporal_factor) == (4, 4)
    wan = VAE_VARIANTS["wan2.1"]
    assert (wan.spatial_factor, wan.temporal_factor) == (8, 4)
    assert wan.latent_shape(81, 480, 832) == (21, 60, 104)
    assert VAE_VARIANTS["demo"].latent_shape(17, 32, 32) == (5, 8, 8)
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(dim_mult=(1, 2), temporal_downsample=(True, True))


@pytest.mark.parametrize("t", [1, 5, 9, 17])
def test_shapes(model, t):
    x = jax.ShapeDtypeStruct((2, t, HW, HW, 3), jnp.float32)
    lt, lh, lw = CFG.latent_shape(t, HW, HW)
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), model, x)
    assert mean.shape == logvar.shape == (2, lt, lh, lw, CFG.z_dim)
    recon, _, _ = nnx.eval_shape(lambda m, x: m(x, rngs_or_key=jax.random.key(0)), model, x)
    assert recon.shape == (2, t, HW, HW, 3)
    mean_s, _ = nnx.eval_shape(lambda m, x: m.encode_streaming(x), model, x)
    assert mean_s.shape == mean.shape
    assert nnx.eval_shape(lambda m, z: m.decode_streaming(z), model, mean).shape == (2, t, HW, HW, 3)


@pytest.mark.parametrize("t", [0, 4, 6])
def test_bad_frame_count_raises(model, t):
    with pytest.raises(ValueError, match=f"frame count {t} "):
        model.encode(jnp.zeros((1, t, HW, HW, 3)))
    with pytest.raises(ValueError, match=f"frame count {t} "):
        model.encode_streaming(jnp.zeros((1, t, HW, HW, 3)))


def test_bad_sizes_raise(model):
    with pytest.raises(ValueError, match="height 10"):
        model.encode(jnp.zeros((1, 5, 10, HW, 3)))
    with pytest.raises(ValueError, match="width 6"):
        model.encode(jnp.zeros((1, 5, HW, 6, 3)))
    with pytest.raises(ValueError, match=r"\(1, 5, 8, 8, 4\)"):
        model.encode(jnp.zeros((1, 5, HW, HW, 4)))
    with pytest.raises(ValueError, match="latents"):
        model.decode(jnp.zeros((1, 2, 2, 2, CFG.z_dim + 1)))


# ---------------------------------------------------------------------------------------------------------
# Numerics: causality and streaming == full sequence
# ---------------------------------------------------------------------------------------------------------


def test_causality(model):
    """Through the train path: changing frame 5 leaves latents 0-1 and outputs 0-4 untouched, changes the rest."""

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def forward(state, x):
        recon, mean, _ = nnx.merge(graphdef, state)(x, rngs_or_key=jax.random.key(0))  # same noise both times
        return mean, recon

    graphdef, state = nnx.split(model)
    x = _video(9)
    y = x.at[:, 5].set(-x[:, 5])
    (za, xa), (zb, xb) = forward(state, x), forward(state, y)
    assert xa.shape == x.shape and bool(jnp.all(jnp.isfinite(xa)))
    np.testing.assert_array_equal(za[:, :2], zb[:, :2])
    np.testing.assert_array_equal(xa[:, :5], xb[:, :5])
    assert float(jnp.abs(za[:, 2] - zb[:, 2]).max()) > 1e-5
    assert float(jnp.abs(xa[:, 5:] - xb[:, 5:]).max(axis=(0, 2, 3, 4)).min()) > 1e-5  # every later frame changes


def test_streaming_encode_matches_full(model):
    x = _video(9, seed=1)
    mean, logvar = _jit(model, "encode")(x)
    mean_s, logvar_s = _jit(model, "encode_streaming")(x)
    assert float(jnp.abs(mean).max()) > 1e-2  # a non-trivial comparison
    np.testing.assert_allclose(mean_s, mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logvar_s, logvar, atol=1e-5, rtol=1e-5)


def test_streaming_decode_matches_full(model):
    z = jax.random.normal(jax.random.key(2), (2, 3, HW // 4, HW // 4, CFG.z_dim))
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def both(state, z):
        m = nnx.merge(graphdef, state)
        return m.decode(z, clip=False), m.decode_streaming(z, clip=False)

    full, streamed = both(state, z)
    assert full.shape == (2, 9, HW, HW, 3)
    np.testing.assert_allclose(streamed, full, atol=1e-5, rtol=1e-5)


def test_streaming_working_memory_flat_in_length(model):
    """XLA's temp buffers of compiled `decode_streaming` do not grow with clip length (only the output does)."""
    graphdef, state = nnx.split(model)

    def temp_bytes(method, shape):
        fn = jax.jit(lambda st, a: getattr(nnx.merge(graphdef, st), method)(a), compiler_options=_FAST_COMPILE)
        return fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile().memory_analysis().temp_size_in_bytes

    short, long = (temp_bytes("decode_streaming", (1, t, 4, 4, CFG.z_dim)) for t in (3, 24))
    assert long <= 1.02 * short, (short, long)  # benchmarks/vae.py measures encode_streaming and decode_tiled too


# ---------------------------------------------------------------------------------------------------------
# Params, loss helper, learning
# ---------------------------------------------------------------------------------------------------------


def test_params_carry_logical_axes(model):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["encoder"]["conv_in"]["kernel"].get_value() == P("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["encoder"]["conv_in"]["bias"].get_value() == P("conv_out")
    assert specs["encoder"]["norm_out"]["gamma"].get_value() == P("norm")
    assert specs["decoder"]["up_blocks"][0]["upsamplers"][0]["resample"]["kernel"].get_value() == P(
        "conv_h", "conv_w", "conv_in", "conv_out"
    )
    params = nnx.state(model, nnx.Param)
    for spec, p in zip(jax.tree.leaves(specs), jax.tree.leaves(params)):
        assert len(spec) == p.ndim


def test_params_shard_with_vae_rules(model):
    """Under the VAE fsdp rules, conv output channels go to 'fsdp'; indivisible dims (RGB out) replicate."""
    mesh = make_mesh((1, 8, 1, 1))
    params = nnx.state(model, nnx.Param)
    with nnx.logical_axis_rules(get_rules("fsdp", "vae")):
        specs = nnx.get_partition_spec(params)
    at = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)
    placed = {}
    for path in [("encoder", "conv_in", "kernel"), ("decoder", "conv_out", "kernel")]:
        value = at(params, path)[...]
        spec = fit_spec_to_shape(at(specs, path).get_value(), value.shape, mesh)
        placed[path] = jax.device_put(value, NamedSharding(mesh, spec))
    kernel = placed["encoder", "conv_in", "kernel"]  # (3, 3, 3, 3, 8): 8 output channels over 8 devices
    assert kernel.sharding.spec == P(None, None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 3, 1)
    rgb_out = placed["decoder", "conv_out", "kernel"]  # 3 output channels: replicated
    assert rgb_out.sharding.spec == P(None, None, None, None, None)


def test_sharded_forward_matches_single_device(model):
    """Batch over data x fsdp and height over context (VAE fsdp_cp rules) gives single-device numerics."""
    graphdef, state = nnx.split(model)
    x = _video(1, seed=3)[:1].repeat(8, axis=0)  # (8, 1, H, W, 3): an image batch keeps the compile small

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        return m.decode(m.encode(x)[0], clip=False)

    ref = jax.jit(forward, compiler_options=_FAST_COMPILE)(state, x)
    with jax.set_mesh(make_mesh((2, 2, 2, 1))), nnx.logical_axis_rules(get_rules("fsdp_cp", "vae")):
        # A fresh jit: flax's rules context is not part of jax's trace cache key.
        out = jax.jit(lambda s, x: forward(s, x), compiler_options=_FAST_COMPILE)(state, x)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sharded_streaming_decode_matches_single_device(model):
    """Streaming decode (scan carrying the cache and the output video) under the VAE fsdp_cp rules."""
    graphdef, state = nnx.split(model)

    def streamed(state, z):
        return nnx.merge(graphdef, state).decode_streaming(z, clip=False)

    z = jax.random.normal(jax.random.key(4), (8, 2, HW // 4, HW // 4, CFG.z_dim))
    ref = jax.jit(streamed, compiler_options=_FAST_COMPILE)(state, z)
    with jax.set_mesh(make_mesh((2, 2, 2, 1))), nnx.logical_axis_rules(get_rules("fsdp_cp", "vae")):
        out = jax.jit(lambda s, z: streamed(s, z), compiler_options=_FAST_COMPILE)(state, z)
    assert out.shape == (8, 5, HW, HW, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _constraints(jaxpr):
    """Every with_sharding_constraint in a jaxpr, nested scans included: [(spec, shape)]."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            out.append((eqn.params["sharding"].spec, eqn.invars[0].aval.shape))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                out += _constraints(inner)
    return out


def test_streaming_decode_constrains_block_boundaries_under_mesh(model):
    """Under the VAE fsdp_cp rules, streaming decode splits every block-boundary activation's height over
    'context' (first frame and scan body), up to the RGB output; without a mesh it adds no constraint."""
    z = jnp.zeros((8, 2, 4, 4, CFG.z_dim))
    assert _constraints(jax.make_jaxpr(lambda z: model.decode_streaming(z))(z).jaxpr) == []
    with jax.set_mesh(make_mesh((2, 2, 2, 1))), nnx.logical_axis_rules(get_rules("fsdp_cp", "vae")):
        found = _constraints(jax.make_jaxpr(lambda z: model.decode_streaming(z))(z).jaxpr)
    acts = [shape for spec, shape in found if len(shape) == 5]
    assert all(spec == P(("data", "fsdp"), None, "context", None, None) for spec, shape in found if len(shape) == 5)
    resnets = sum(len(b.resnets) for b in model.decoder.up_blocks) + len(model.decoder.mid_block.resnets)
    assert len(acts) >= 2 * resnets  # frame 0 and the scan body, after every resnet at least
    assert (8, 1, 16, 16, 3) in acts and (8, 4, 16, 16, 3) in acts  # the full-resolution output of both


def test_kl_divergence():
    mean = jnp.zeros((3, 2, 2, 2, 4))
    assert jnp.allclose(kl_divergence(mean, jnp.zeros_like(mean)), 0.0)
    kl = kl_divergence(mean.at[1].set(1.0), jnp.zeros_like(mean))
    assert kl.shape == (3,) and np.isclose(kl[1], 0.5 * 32) and kl[0] == 0.0


def test_training_reduces_reconstruction_loss():
    """30 Adam steps on a fixed batch of smooth moving clips cut the reconstruction MSE by more than 2x."""
    model = CausalVAE(CFG, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    tt, yy, xx = jnp.meshgrid(jnp.arange(5.0), jnp.linspace(-1, 1, HW), jnp.linspace(-1, 1, HW), indexing="ij")
    phase = jnp.array([0.0, 2.0])[:, None, None, None, None]
    video = jnp.stack([xx + 0.2 * tt, yy - 0.2 * tt, xx * yy], -1)[None]  # (1, 5, H, W, 3)
    video = 0.9 * jnp.sin(1.5 * video + phase)  # (2, 5, H, W, 3)

    def loss_fn(m):
        mean, logvar = m.encode(video)
        recon = m.decode(mean, clip=False)
        return jnp.mean(jnp.square(recon - video)) + 1e-6 * kl_divergence(mean, logvar).mean()

    graphdef, state = nnx.split((model, opt))

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE, donate_argnums=0)
    def step(state):
        m, o = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return nnx.state((m, o)), loss

    losses = []
    for _ in range(30):
        state, loss = step(state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 0.5 * float(jnp.var(video)), losses  # better than predicting a constant
