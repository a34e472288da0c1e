"""Masked video in the DiT (ConditionSpec.masked_video): the default is untouched, per-token timesteps modulate
given tokens at t = 0 and are the plain model when nothing is given, channel concat equals T2V at init."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_DIT, fast_jit

from klingjax.models.conditions import Conditions, ConditionSpec, MaskedVideo
from klingjax.models.dit import AttentionLayout, WanDiT, dit_config
from klingjax.models.dit_inputs import given_tokens

PER_TOKEN = dataclasses.replace(TINY_DIT, conditions=ConditionSpec(MaskedVideo.PER_TOKEN_TIMESTEPS))
CONCAT = dataclasses.replace(TINY_DIT, conditions=ConditionSpec(MaskedVideo.CHANNEL_CONCAT))


def _inputs(b=2, t=3, h=4, w=4, seq=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    latents = jax.random.normal(k[0], (b, t, h, w, TINY_DIT.in_channels))
    given = jax.random.normal(k[1], latents.shape)
    text = jax.random.normal(k[2], (b, seq, TINY_DIT.text_dim))
    return latents, jnp.array([300.0, 800.0])[:b], Conditions(text), given


def _frame0(latents):
    return jnp.zeros(latents.shape[:4], bool).at[:, 0].set(True)  # (B, t, h, w): latent frame 0 given


@functools.cache
def _forward(cfg):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    return fast_jit(lambda state, *args: nnx.merge(graphdef, state)(*args))


@functools.cache
def _init(cfg, seed=0):
    return fast_jit(lambda: nnx.state(WanDiT(cfg, rngs=nnx.Rngs(seed))))()


def _model(cfg, state):
    """An eager model holding copies of `state` (edits leave the cached state alone)."""
    return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))), state, copy=True)


def _flat(state):
    return {path: np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_param_trees_default_and_per_token_identical_concat_adds_one_zero_kernel():
    base, per_token, concat = _flat(_init(TINY_DIT)), _flat(_init(PER_TOKEN)), _flat(_init(CONCAT))
    assert base.keys() == per_token.keys()
    for path, v in base.items():
        np.testing.assert_array_equal(per_token[path], v)
        np.testing.assert_array_equal(concat[path], v)  # the zero kernel draws no random numbers
    extra = set(concat) - set(base)
    assert len(extra) == 1 and "cond_kernel" in jax.tree_util.keystr(next(iter(extra)))
    kernel = concat[next(iter(extra))]
    assert kernel.shape == (*TINY_DIT.patch_size, TINY_DIT.in_channels + 1, TINY_DIT.dim) and not kernel.any()
    assert CONCAT.conditions.patch_channels(4) == 9 and PER_TOKEN.conditions.patch_channels(4) == 4


@pytest.mark.parametrize("layout", [AttentionLayout.JOINT_3D, AttentionLayout.FACTORIZED])
def test_per_token_with_nothing_given_is_the_plain_model_bitwise(layout):
    plain_cfg = dataclasses.replace(TINY_DIT, attention_layout=layout)
    cfg = dataclasses.replace(PER_TOKEN, attention_layout=layout)
    latents, t, cond, _ = _inputs()
    state = _init(plain_cfg)
    want = np.asarray(_forward(plain_cfg)(state, latents, t, cond))
    none_given = cond.replace(given_mask=jnp.zeros(latents.shape[:4], bool))
    np.testing.assert_array_equal(_forward(cfg)(state, latents, t, none_given), want)
    np.testing.assert_array_equal(_forward(cfg)(state, latents, t, cond), want)  # no mask at all
    got = _forward(cfg)(state, latents, t, none_given.replace(given_mask=_frame0(latents)))
    assert np.abs(np.asarray(got) - want).max() > 1e-4  # the mask is read


def test_per_token_everything_given_is_the_plain_model_at_t0():
    latents, t, cond, _ = _inputs()
    state = _init(TINY_DIT)
    want = _forward(TINY_DIT)(state, latents, jnp.zeros_like(t), cond)
    got = _forward(PER_TOKEN)(state, latents, t, cond.replace(given_mask=jnp.ones(latents.shape[:4], bool)))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_given_tokens_get_t0_modulation_and_change_only_through_attention():
    """With every attention output projection zeroed, tokens do not interact: the given frame's output is the plain
    model's at t = 0 and the rest is the plain model's at t. With attention, the given frame depends on t."""
    latents, t, cond, _ = _inputs()
    state = _init(TINY_DIT)
    masked = cond.replace(given_mask=_frame0(latents))
    model = _model(TINY_DIT, state)
    for attn in (model.blocks.attn1, model.blocks.attn2):
        attn.to_out[0].kernel[...] = jnp.zeros_like(attn.to_out[0].kernel[...])
        attn.to_out[0].bias[...] = jnp.zeros_like(attn.to_out[0].bias[...])
    no_attn = nnx.state(model)
    plain = lambda s, ts: np.asarray(_forward(TINY_DIT)(s, latents, ts, cond))  # noqa: E731
    got = np.asarray(_forward(PER_TOKEN)(no_attn, latents, t, masked))
    np.testing.assert_allclose(got[:, 0], plain(no_attn, jnp.zeros_like(t))[:, 0], atol=1e-6)
    np.testing.assert_allclose(got[:, 1:], plain(no_attn, t)[:, 1:], atol=1e-6)
    # With attention on, the given frame's output moves with the other tokens' timestep (only attention links them).
    other_t = np.asarray(_forward(PER_TOKEN)(state, latents, t * 0.5, masked))
    base = np.asarray(_forward(PER_TOKEN)(state, latents, t, masked))
    assert np.abs(other_t[:, 0] - base[:, 0]).max() > 1e-5
    no_attn_other_t = np.asarray(_forward(PER_TOKEN)(no_attn, latents, t * 0.5, masked))
    np.testing.assert_allclose(no_attn_other_t[:, 0], got[:, 0], atol=1e-6)


def test_a_token_is_given_only_if_its_whole_patch_is():
    mask = np.zeros((1, 2, 4, 4), bool)
    mask[0, 0] = True  # frame 0 wholly given
    mask[0, 1, :2, :2] = True  # frame 1: the top-left patch wholly given ...
    mask[0, 1, 2, 2] = True  # ... and one position of the bottom-right patch
    tokens = np.asarray(given_tokens(jnp.asarray(mask), (1, 2, 2)))  # (1, 8, 1)
    np.testing.assert_array_equal(tokens[0, :, 0], [1, 1, 1, 1, 1, 0, 0, 0])
    soft = np.asarray(given_tokens(jnp.asarray(mask * 0.7, jnp.float32), (1, 2, 2)))  # float: >= 0.5 is given
    np.testing.assert_array_equal(soft, tokens)


def test_channel_concat_at_init_is_the_t2v_model_with_the_same_weights():
    latents, t, cond, given = _inputs()
    t2v_state = _init(TINY_DIT)
    state = _init(CONCAT)  # = the T2V params (same seed) + the zero cond_kernel
    want = np.asarray(_forward(TINY_DIT)(t2v_state, latents, t, cond))
    masked = cond.replace(given=given, given_mask=_frame0(latents))
    np.testing.assert_array_equal(_forward(CONCAT)(state, latents, t, masked), want)
    np.testing.assert_array_equal(_forward(CONCAT)(state, latents, t, cond), want)  # nothing given: zeros
    # Copying T2V weights from another seed into the concat model: still the T2V model.
    other = _init(TINY_DIT, seed=3)
    model = _model(CONCAT, state)
    nnx.update(model, other)  # every T2V param; cond_kernel stays zero
    np.testing.assert_array_equal(_forward(CONCAT)(nnx.state(model), latents, t, masked),
                                  _forward(TINY_DIT)(other, latents, t, cond))
    # A trained (non-zero) kernel reads the given latents at given positions only.
    kernel = model.patch_embedding.cond_kernel
    kernel[...] = jax.random.normal(jax.random.key(5), kernel[...].shape)
    copied = nnx.state(model)
    out = np.asarray(_forward(CONCAT)(copied, latents, t, masked))
    assert np.abs(out - want).max() > 1e-3
    elsewhere = masked.replace(given=jnp.where(masked.given_mask[..., None], given, given + 100.0))
    np.testing.assert_array_equal(_forward(CONCAT)(copied, latents, t, elsewhere), out)


def test_masked_video_validation_and_config():
    latents, t, cond, given = _inputs()
    mask = _frame0(latents)
    with pytest.raises(ValueError, match="given_mask but this DiT's ConditionSpec has masked_video=off"):
        ConditionSpec().validate(cond.replace(given_mask=mask))
    with pytest.raises(ValueError, match=r"given_mask must be \(B, t, h, w\) = \(2, 3, 4, 4\)"):
        PER_TOKEN.conditions.validate(cond.replace(given_mask=mask[:, :2]), latent_shape=latents.shape)
    with pytest.raises(ValueError, match=r"given must be \(B, t, h, w, C\)"):
        PER_TOKEN.conditions.validate(cond.replace(given=given[..., :2], given_mask=mask), latent_shape=latents.shape)
    with pytest.raises(ValueError, match="Conditions.given needs Conditions.given_mask"):
        PER_TOKEN.conditions.validate(cond.replace(given=given))
    with pytest.raises(ValueError, match="channel_concat reads Conditions.given"):
        CONCAT.conditions.validate(cond.replace(given_mask=mask))
    PER_TOKEN.conditions.validate(cond.replace(given_mask=mask), latent_shape=latents.shape)  # given optional
    model = nnx.eval_shape(lambda: WanDiT(PER_TOKEN, rngs=nnx.Rngs(0)))  # abstract: the checks run before compute
    with pytest.raises(ValueError, match="given_mask must be"):
        model(latents, t, cond.replace(given_mask=mask[:, :, :2]))
    spec = dit_config("XS", conditions={"masked_video": "channel_concat"}).conditions
    assert spec == ConditionSpec(MaskedVideo.CHANNEL_CONCAT)
    with pytest.raises(ValueError, match="is not one of"):
        dit_config("XS", conditions={"masked_video": "inpaint"})
    with pytest.raises(TypeError, match="must be a MaskedVideo"):
        ConditionSpec("channel_concat")


def test_given_time_modulates_given_tokens_at_their_noise_level():
    """All tokens given at level s: the plain model at timestep s (given_time 0 is the default t = 0); the field is
    checked (shape, per-token timesteps only)."""
    latents, t, cond, given = _inputs()
    state = _init(TINY_DIT)
    level = jnp.array([0.1, 0.3])
    everything = jnp.ones(latents.shape[:4], bool)
    want = _forward(TINY_DIT)(state, latents, level * 1000.0, cond)
    got = _forward(PER_TOKEN)(state, latents, t, cond.replace(given_mask=everything, given_time=level))
    np.testing.assert_allclose(got, want, atol=1e-6)
    zero = _forward(PER_TOKEN)(state, latents, t, cond.replace(given_mask=everything, given_time=jnp.zeros(2)))
    np.testing.assert_allclose(zero, _forward(PER_TOKEN)(state, latents, t, cond.replace(given_mask=everything)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="given_time .* needs masked_video=per_token_timesteps"):
        CONCAT.conditions.validate(cond.replace(given=given, given_mask=everything, given_time=level))
    with pytest.raises(ValueError, match=r"given_time must be \(B,\) = \(2,\)"):
        PER_TOKEN.conditions.validate(cond.replace(given_mask=everything, given_time=level[:1]))
