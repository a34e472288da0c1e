"""Sharding on 8 fake CPU devices: params really split, sharded loss == unsharded loss, clear mesh errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.config import OptimConfig
from klingjax.diffusion import losses
from klingjax.models.conditions import Conditions
from klingjax.models.dit import WanDiT, dit_config
from klingjax.models.vae import VAE_VARIANTS, CausalVAE
from klingjax.sharding.mesh import make_mesh, resolve_mesh_shape
from klingjax.sharding.rules import VAE_RULES, get_rules, logical_to_mesh
from klingjax.train.optim import make_optimizer
from klingjax.train.state import create_trainer, per_device_bytes
from klingjax.train.step import batch_sharding, compile_train_step, make_train_step

CFG = dit_config("XS", dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_channels=4, out_channels=4, text_dim=32)


def _loss_fn(model, batch, key, ctx=None):  # ctx: the train step's LossContext (unused)
    k_t, k_n = jax.random.split(key)
    x0 = batch["latent"]
    t = jax.random.uniform(k_t, (x0.shape[0],))
    noise = jax.random.normal(k_n, x0.shape)
    cond = Conditions(batch["text"], batch["text_mask"])
    velocity = lambda x_t, t: model(x_t, t * 1000.0, cond)
    loss, _ = losses.flow_matching_loss(velocity, x0, noise, t)
    return loss, {}


def _batch():
    rng = np.random.RandomState(0)
    return {
        "latent": rng.randn(8, 3, 4, 4, 4).astype(np.float32),
        "text": rng.randn(8, 6, 32).astype(np.float32),
        "text_mask": np.arange(6)[None, :] < rng.randint(1, 7, size=(8, 1)),
    }


def _run(mesh_shape, preset, steps=2, cfg=CFG, with_hlo=False):
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), 10)
    st = create_trainer(lambda rngs: WanDiT(cfg, rngs=rngs), tx, mesh, get_rules(preset), seed=0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(preset)):
        step = compile_train_step(make_train_step(st.graphdef, _loss_fn, ema_decay=0.9), st.shardings, mesh)
        batch = jax.device_put(_batch(), batch_sharding(mesh))
        state, out = st.state, []
        step = step.lower(state, batch, jax.random.key(0)).compile()
        for _ in range(steps):
            state, m = step(state, batch, jax.random.key(0))
            out.append(float(m["loss"]))
    return (st, state, out, step.as_text()) if with_hlo else (st, state, out)


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_fsdp_shards_params_and_matches_single_device_loss():
    _, _, ref = _run((1, 1, 1, 1), "fsdp")
    st, state, sharded = _run((2, 4, 1, 1), "fsdp")
    np.testing.assert_allclose(sharded, ref, atol=1e-5, rtol=0)
    assert sharded[1] != sharded[0]  # the update really happened
    q = state["model"]["blocks"]["attn1"]["to_q"]["kernel"][...]
    assert "fsdp" in str(q.sharding.spec)
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 4  # embed dim split 4 ways
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    per_device = per_device_bytes(state)
    assert len(per_device) == 8 and max(per_device.values()) < 0.5 * total


def test_fsdp_tp_matches_single_device_loss():
    _, _, ref = _run((1, 1, 1, 1), "fsdp_tp")
    _, state, sharded = _run((2, 2, 1, 2), "fsdp_tp")
    np.testing.assert_allclose(sharded, ref, atol=1e-5, rtol=0)
    ffn = state["model"]["blocks"]["ffn"]["net"][0]["proj"]["kernel"][...]  # (layers, embed, mlp)
    assert ffn.sharding.spec[1:] == ("fsdp", "tensor")


@pytest.mark.slow
def test_fsdp_cp_trains_the_dit_with_context_parallel_attention():
    """fsdp=2 x context=2 x tensor=2: the DiT's self-attention takes the all-to-all CP path inside the scanned,
    differentiated blocks (12 tokens split 2 ways, 4 heads -> 2 per tensor shard -> 1 per context shard)."""
    _, _, ref = _run((1, 1, 1, 1), "fsdp_cp")
    _, _, sharded, hlo = _run((1, 2, 2, 2), "fsdp_cp", with_hlo=True)
    np.testing.assert_allclose(sharded, ref, atol=1e-5, rtol=0)
    assert "all-to-all" in hlo


def test_mesh_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiply to 6, but 8 devices"):
        resolve_mesh_shape((2, 3, 1, 1), 8)
    with pytest.raises(ValueError, match="does not divide"):
        resolve_mesh_shape((3, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        resolve_mesh_shape((-1, -1, 1, 1), 8)
    assert resolve_mesh_shape((2, -1, 1, 1), 8) == (2, 4, 1, 1)


def test_unknown_logical_axis_and_preset_are_errors():
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_mesh(("embed", "embd"), get_rules("fsdp"))
    with pytest.raises(ValueError, match="unknown sharding preset"):
        get_rules("zero3")
    assert tuple(logical_to_mesh(("act_batch", "act_embed"), get_rules("dp"))) == (("data", "fsdp"), None)


def test_shard_is_noop_without_mesh():
    from klingjax.sharding.rules import shard

    x = jnp.ones((4, 3))
    assert shard(x, ("act_batch", "act_embed")) is x


def _random_state(abstract_state, seed=0):
    """Concrete values for an abstract NNX state: N(0, 1/fan_in) kernels, ~1 norm scales, small biases.

    Filled with numpy so the test spends no time compiling the model's random init."""
    rng = np.random.RandomState(seed)

    def fill(x):
        if len(x.shape) > 1:
            return (rng.randn(*x.shape) / math.sqrt(math.prod(x.shape[:-1]))).astype(x.dtype)
        return (1.0 + 0.1 * rng.randn(*x.shape)).astype(x.dtype)

    return jax.tree.map(fill, abstract_state)


def test_vae_fsdp_cp_rules_split_frames_over_height():
    """Under the VAE fsdp_cp rules on data=2 x context=4, encoding a 32-row clip keeps every activation split 4
    ways over height (per-device conv_in output has 8 rows) and equals the single-device result."""
    assert dict(VAE_RULES["fsdp_cp"])["act_height"] == "context"
    cfg = dataclasses.replace(VAE_VARIANTS["demo"], base_dim=8)  # spatial factor 4: latent height 8 = 4 x 2
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0))))
    state = _random_state(abstract)
    x = np.random.RandomState(1).uniform(-1, 1, (2, 5, 32, 16, 3)).astype(np.float32)  # (B, T, H, W, 3)

    def encode(state, x):
        return nnx.merge(graphdef, state).encode(x)[0]  # posterior mean (B, 2, 8, 4, z)

    fast = {"xla_backend_optimization_level": 0}
    ref = jax.jit(encode, compiler_options=fast)(state, x)
    with jax.set_mesh(make_mesh((2, 1, 4, 1))), nnx.logical_axis_rules(get_rules("fsdp_cp", "vae")):
        compiled = jax.jit(lambda s, x: encode(s, x), compiler_options=fast).lower(state, x).compile()
        out = compiled(state, x)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert out.sharding.spec[2] == "context" and out.addressable_shards[0].data.shape == (1, 2, 2, 4, cfg.z_dim)
    hlo = compiled.as_text()
    c0 = cfg.base_dim
    assert f"f32[1,5,8,16,{c0}]" in hlo and f"f32[1,5,32,16,{c0}]" not in hlo  # full-res activation: 32 / 4 rows
    assert "collective-permute" in hlo  # halo rows exchanged between height shards for the 3x3 convs
