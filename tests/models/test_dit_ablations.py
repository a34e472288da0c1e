"""DiT ablation switches: factorised spatial/temporal attention and joint (MM-DiT style) text attention.

Default config: output and parameter tree unchanged by the switches' code (golden values recorded from the
code before the switches existed). Each switch: shapes, finiteness, scan == loop, sharding annotations, remat
policies; FACTORIZED: a perturbation test of which tokens each attention connects; JOINT text: padded text is
ignored and the caption matters. Tiny configs and one jit per test keep XLA compiles few on 2 CPU cores.
"""

import base64
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_helpers import fast_jit, overfit_losses
from flax import nnx
from jax.sharding import PartitionSpec as P

from klingjax.models.conditions import Conditions, ConditionSpec
from klingjax.models.dit import AttentionLayout, RematPolicy, TextAttention, WanDiT, dit_config
from klingjax.models.layers.rope import grid_positions
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import LOGICAL_AXES, get_rules
from klingjax.train.state import state_shardings

TINY = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=24)
F, J = AttentionLayout.FACTORIZED, TextAttention.JOINT
SWITCHES = {
    "joint_text": dict(text_attention=J),
    "factorized": dict(attention_layout=F),
    "factorized_joint_text": dict(attention_layout=F, text_attention=J),
}

# Recorded with the DiT before the switches existed: TINY, WanDiT(rngs=nnx.Rngs(3)) initialised inside the jit,
# inputs of `_golden_inputs`, fast_jit, scan_layers=True. float32 little-endian, shape (1, 2, 4, 4, 4).
GOLDEN_OUT = (
    "1joMvynSFT9qcOk+cScVwAO5QT/0pQhAcKJRvsp6i73NE1E+kz3/vjhSF7/wI5I/AA7DvwrrAcAGY6E/TtMFvyFEh7/k8V4+LSm/P1fIpb7U"
    "BQw/BLQOvuazwz+Ljac/9L+xP1fT7r6qdwTAEZwkv3nLXz9XzLI/QGdZPtK50b9jSSvAdzgLQGahfT5w4iDAklm6Pwgd1D8vxvC/Z6r6P2Q9"
    "tT3gimY9qh5SP2zfnb+ClqY/7GiPPu7pT79fuRM/ZNnOvq0sab+V5lk/wJhoPzpsRz6O6Wc+fgspP0h0vz8hPSs+bBMLP2AozD/6bNM/1IEr"
    "PyxFqD3bh6m/eOVHvxf4Rr9Ykv8+fuDhPhDzA8AyadI/VqjhPxAQtr+kErk+atb/PyxBPMC461i/mmzbP9wXP7/9vqm/9/4DQPh5yr84pjY+"
    "4OOUv9bRiT9I+Nm/2F2Dv6YpsT5Iyuw+gDHEP9Csbr1Y/1k/IDOmvOjNBj05LiI/RHy6vggHgb8IExS/2uyov/K1/z98W4a/wt0ovXXZjT9G"
    "cfM/0KcfPtxDVj2/RhE/TnYVvlQdQz8/ea0/6uIZv/hHBT9IaEw/cjqrv+mWvb/2xDk/7oyOvuxNfz/ORra+oHPcvGtNaj+Xw3Y+UDfWPT7m"
    "V7/Lb16+0uRjv1ZwcL8izrS+OOd4vtCW6z4="
)
# The default parameter tree before the switches (the diffusers export map is written against it).
GOLDEN_PARAMS = {
    **{f"blocks.{a}.{p}": s for a in ("attn1", "attn2") for p, s in [
        ("norm_k.scale", (2, 32)), ("norm_q.scale", (2, 32)), ("to_k.bias", (2, 32)), ("to_k.kernel", (2, 32, 32)),
        ("to_out.0.bias", (2, 32)), ("to_out.0.kernel", (2, 32, 32)), ("to_q.bias", (2, 32)),
        ("to_q.kernel", (2, 32, 32)), ("to_v.bias", (2, 32)), ("to_v.kernel", (2, 32, 32))]},
    "blocks.ffn.net.0.proj.bias": (2, 64), "blocks.ffn.net.0.proj.kernel": (2, 32, 64),
    "blocks.ffn.net.2.bias": (2, 32), "blocks.ffn.net.2.kernel": (2, 64, 32),
    "blocks.norm2.bias": (2, 32), "blocks.norm2.scale": (2, 32), "blocks.scale_shift_table": (2, 1, 6, 32),
    "condition_embedder.text_embedder.linear_1.bias": (32,),
    "condition_embedder.text_embedder.linear_1.kernel": (24, 32),
    "condition_embedder.text_embedder.linear_2.bias": (32,),
    "condition_embedder.text_embedder.linear_2.kernel": (32, 32),
    "condition_embedder.time_embedder.linear_1.bias": (32,),
    "condition_embedder.time_embedder.linear_1.kernel": (256, 32),
    "condition_embedder.time_embedder.linear_2.bias": (32,),
    "condition_embedder.time_embedder.linear_2.kernel": (32, 32),
    "condition_embedder.time_proj.bias": (192,), "condition_embedder.time_proj.kernel": (32, 192),
    "patch_embedding.bias": (32,), "patch_embedding.kernel": (1, 2, 2, 4, 32),
    "proj_out.bias": (16,), "proj_out.kernel": (32, 16), "scale_shift_table": (1, 2, 32),
}


def _golden_inputs():
    k = jax.random.split(jax.random.key(42), 2)
    latents = jax.random.normal(k[0], (1, 2, 4, 4, 4))
    return latents, jnp.array([321.0]), Conditions(jax.random.normal(k[1], (1, 5, 24)), jnp.arange(5)[None] < 3)


def _inputs(b=2, t=3, seq=6):
    """Latents (B, t, 4, 4, C) -> a (t, 2, 2) token grid; text of lengths 3 and `seq`."""
    k = jax.random.split(jax.random.key(0), 2)
    latents = jax.random.normal(k[0], (b, t, 4, 4, TINY.in_channels))
    context = jax.random.normal(k[1], (b, seq, TINY.text_dim))
    mask = jnp.arange(seq)[None, :] < jnp.array([3, seq] * b)[:b, None]  # (B, L)
    return latents, jnp.linspace(50.0, 900.0, b), Conditions(context, mask)


def _cfg(name, **kw):
    return dataclasses.replace(TINY, **SWITCHES.get(name, {}), **kw)


def _graphdef(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))


def _param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    state = nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def test_default_config_unchanged():
    assert TINY.conditions == ConditionSpec()  # Wan T2V: no condition parameters
    assert _param_shapes(TINY) == GOLDEN_PARAMS
    latents, t, cond = _golden_inputs()
    got = fast_jit(lambda *a: WanDiT(TINY, rngs=nnx.Rngs(3))(*a))(latents, t, cond)
    want = np.frombuffer(base64.b64decode(GOLDEN_OUT), "<f4").reshape(1, 2, 4, 4, 4)
    # Bit-identical on the CPU where it was recorded (jax 0.10.2); the tolerance only absorbs ISA-dependent
    # rounding of XLA:CPU kernels on other hosts (a changed default code path moves outputs by >> 1e-3).
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_params_logical_axes_and_fsdp_shardings(name):
    cfg = _cfg(name)
    shapes = _param_shapes(cfg)
    default = set(GOLDEN_PARAMS)
    cross = {p for p in default if p.startswith(("blocks.attn2.", "blocks.norm2."))}
    factorized, joint = cfg.attention_layout is F, cfg.text_attention is J
    new = {p for p in shapes if p not in default}
    assert set(shapes) - new == (default - cross if joint else default)
    expected = ({"attn_t", "scale_shift_table_t"} if factorized else set()) | ({"text_kv"} if joint else set())
    assert {p.split(".")[1] for p in new} == expected
    if factorized:
        assert shapes["blocks.attn_t.to_q.kernel"] == (2, 32, 32)
        assert shapes["blocks.scale_shift_table_t"] == (2, 1, 3, 32)
    if joint:
        assert {p for p in new if "text_kv" in p} == {f"blocks.text_kv.{p}" for p in (
            "to_k.kernel", "to_k.bias", "to_v.kernel", "to_v.bias", "norm_k.scale")}

    abstract = nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    specs = nnx.get_partition_spec(abstract)
    for spec, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(abstract)):
        assert len(spec) == leaf.ndim and set(spec) <= LOGICAL_AXES | {None}, spec
    # Under the fsdp preset on 8 devices every new matrix is split over its embed dim like the default ones.
    shardings = state_shardings(abstract, make_mesh((1, -1, 1, 1)), get_rules("fsdp"))
    flat = {".".join(map(str, k)): v.get_value().spec for k, v in nnx.to_flat_state(shardings)}
    assert flat["blocks.attn1.to_q.kernel"] == P(None, "fsdp", None)
    for path in new:
        if path.endswith(("kernel", "table_t")):
            assert "fsdp" in flat[path], (path, flat[path])


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_forward_scan_equals_loop_and_text_masking(name):
    cfg = _cfg(name)
    loop_graphdef = _graphdef(dataclasses.replace(cfg, scan_layers=False))
    latents, t, cond = _inputs()
    ctx, mask = cond.text, cond.text_mask
    padded_changed = jnp.where(mask[..., None], ctx, 10 * jax.random.normal(jax.random.key(9), ctx.shape))
    caption_changed = ctx.at[:, 1].add(1.0)

    @fast_jit
    def run():
        model = WanDiT(cfg, rngs=nnx.Rngs(1))
        loop = nnx.merge(loop_graphdef, nnx.state(model))
        # One batch of 3 x B: the same clips with the original, padding-changed and caption-changed text.
        three = cond.concat(cond.replace(text=padded_changed)).concat(cond.replace(text=caption_changed))
        stacked = model(*(jnp.concatenate([a] * 3) for a in (latents, t)), three)
        return jnp.split(stacked, 3) + [loop(latents, t, cond)]

    out, out_padded, out_caption, out_loop = run()
    assert out.shape == latents.shape[:4] + (cfg.out_channels,)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-2
    np.testing.assert_allclose(out_loop, out, atol=1e-5)
    np.testing.assert_allclose(out_padded, out, atol=1e-5)  # masked text keys are ignored ...
    assert float(jnp.abs(out_caption - out).max()) > 1e-3  # ... real ones are read


@pytest.mark.parametrize("name", ["default", "joint_text"])
def test_per_query_text_mask_in_one_block(name):
    """One block, N = L = 8: video tokens 0-3 may read text [0, 3) only and tokens 4-7 text [3, 8) only. Each
    half's output equals a run on that text span alone (self-attention reads no text under CROSS, and under JOINT
    the video keys come from the block input), so an ignored or transposed mask fails."""
    cfg = _cfg(name, num_layers=1)
    latents, t, cond = _inputs(b=2, t=2, seq=8)  # (2, 2, 2) token grid
    ctx, grid, k = cond.text, (2, 2, 2), 3
    per_query = (jnp.arange(8)[:, None] < 4) == (jnp.arange(8)[None, :] < k)  # (N, L)

    @fast_jit
    def run():
        model = WanDiT(cfg, rngs=nnx.Rngs(4))
        graphdef, stacked = nnx.split(model.blocks)
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
        x = model.patch_embedding(latents)  # (B, N, D)
        inputs = model.block_inputs(t, Conditions(ctx), grid)[1]
        masked = block(x, inputs._replace(context_mask=jnp.broadcast_to(per_query, (2, 8, 8))))
        return [masked] + [block(x, model.block_inputs(t, Conditions(c), grid)[1]) for c in (ctx[:, :k], ctx[:, k:])]

    masked, head, tail = run()
    np.testing.assert_allclose(masked[:, :4], head[:, :4], atol=1e-5)
    np.testing.assert_allclose(masked[:, 4:], tail[:, 4:], atol=1e-5)
    assert float(jnp.abs(head - tail).max()) > 1e-3  # the two text spans really differ


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_positions(name):
    """JOINT text takes per-token positions (grid positions: the default output); FACTORIZED refuses them."""
    cfg = _cfg(name, num_layers=1)
    latents, t, cond = _inputs(b=1, t=2)
    with_pos = cond.replace(positions=jnp.asarray(grid_positions((2, 2, 2)))[None])  # (1, N, 3)
    if cfg.attention_layout is F:
        model = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match="positions is not supported with attention_layout=factorized"):
            model(latents, t, with_pos)
        return
    out, out_pos = fast_jit(lambda: [WanDiT(cfg, rngs=nnx.Rngs(5))(latents, t, c) for c in (cond, with_pos)])()
    np.testing.assert_array_equal(out_pos, out)


def test_factorized_attention_locality():
    """1 block: spatial attention connects tokens of one frame only, temporal attention one (h, w) location only.

    Each attention is isolated by zeroing the other's output projection (its residual branch is then exactly 0);
    every other part of the model is per token, so the model output shows what the attention connects.
    """
    cfg = _cfg("factorized", num_layers=1)
    latents, t, cond = _inputs(b=1, t=3)
    # Perturb the (frame 2, row 0, col 0) token: latent pixels (2, 0:2, 0:2) with patch (1, 2, 2).
    both = jnp.concatenate([latents, latents.at[:, 2, 0:2, 0:2].add(1.0)])  # (2, t, 4, 4, C): original, perturbed
    t2, cond2 = jnp.concatenate([t, t]), cond.concat(cond)

    @fast_jit
    def run():
        outs = []
        for silenced in ("attn_t", "attn1"):
            model = WanDiT(cfg, rngs=nnx.Rngs(2))
            out_proj = getattr(model.blocks, silenced).to_out[0]
            out_proj.kernel.set_value(jnp.zeros_like(out_proj.kernel.get_value()))
            out_proj.bias.set_value(jnp.zeros_like(out_proj.bias.get_value()))
            y = model(both, t2, cond2)  # (2, t, 4, 4, C)
            outs.append(jnp.abs(y[1] - y[0]).reshape(3, 2, 2, 2, 2, -1).max(axis=(2, 4, 5)))  # (t, 2, 2) per token
        return outs

    spatial_only, temporal_only = (np.asarray(x) for x in run())
    assert spatial_only[2].min() > 1e-5 and spatial_only[:2].max() == 0.0  # only frame 2, all of it
    assert temporal_only[:, 0, 0].min() > 1e-5  # location (0, 0) of every frame ...
    changed = temporal_only.copy()
    changed[:, 0, 0] = 0
    assert changed.max() == 0.0  # ... and nothing else


def _loss_and_grads(cfg, policies, latents, t, cond):
    """value_and_grad of a squared-output loss for each remat policy of `cfg`, in one jit."""
    graphdefs = [_graphdef(dataclasses.replace(cfg, remat=policy, scan_layers=scan)) for policy, scan in policies]

    @fast_jit
    def run():
        params = nnx.state(WanDiT(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p, g: jnp.mean(nnx.merge(g, p)(latents, t, cond) ** 2)
        return [jax.value_and_grad(loss)(params, g) for g in graphdefs]

    return run()


@pytest.mark.slow  # ~13 s of CPU per switch (three gradient graphs); test_dit.py covers remat of the default
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_remat_policies_same_loss_and_gradients(name):
    cfg = _cfg(name, num_layers=1)  # remat wraps each block alike: one is enough
    policies = [(RematPolicy.NONE, True), (RematPolicy.FULL, True), (RematPolicy.DOTS_SAVEABLE, False)]
    results = _loss_and_grads(cfg, policies, *_inputs(b=1, t=2))
    (value0, grads0), rest = results[0], results[1:]
    for value, grads in rest:
        np.testing.assert_allclose(value, value0, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads0)
    blocks = grads0["blocks"]
    new_branch = blocks["attn_t"] if "attn_t" in blocks else blocks["text_kv"]
    assert float(jnp.abs(new_branch["to_v"]["kernel"][...]).max()) > 0  # the new params get gradients


@pytest.mark.slow
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_short_overfit_reduces_loss(name):
    cfg = _cfg(name, num_layers=1)
    latents, t, cond = _inputs(b=2, t=2)
    target = jax.random.normal(jax.random.key(7), latents.shape)
    params = fast_jit(lambda: nnx.state(WanDiT(cfg, rngs=nnx.Rngs(1))))()
    losses = overfit_losses(_graphdef(cfg), params, (latents, t, cond), target)
    assert losses[-1] < losses[0] / 2, losses


def test_config_values_coerce_and_bad_ones_name_the_field():
    cfg = dit_config("XS", attention_layout="factorized", text_attention="joint", remat="full", patch_size=[1, 2, 2])
    assert (cfg.attention_layout, cfg.text_attention, cfg.remat, cfg.patch_size) == (F, J, RematPolicy.FULL, (1, 2, 2))
    with pytest.raises(ValueError, match="'attention_layout': 'diagonal' is not one of"):
        dit_config("XS", attention_layout="diagonal")
    with pytest.raises(ValueError, match=r"unknown DiT field\(s\) \['atention_layout'\]"):
        dit_config("XS", atention_layout="factorized")
    with pytest.raises(TypeError, match="text_attention must be a TextAttention"):
        dataclasses.replace(TINY, text_attention="joint")
