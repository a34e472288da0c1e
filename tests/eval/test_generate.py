"""The generator: deterministic for a key, params swapped without recompiling, the negative prompt read only when
CFG is on. A tiny DiT + tiny VAE + a hash text encoder keep it to one small compile."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_DIT, TINY_VAE

from klingjax.config import SampleConfig
from klingjax.diffusion.samplers import Sampler
from klingjax.eval.generate import VideoGenerator
from klingjax.models.dit import WanDiT
from klingjax.models.vae import CausalVAE


class HashTextEncoder:
    """Texts -> fixed pseudo-random hidden states (B, L, D), one token per word: a stand-in for MiniLM."""

    dim = TINY_DIT.text_dim

    def encode(self, texts, max_len):
        hidden = np.zeros((len(texts), max_len, self.dim), np.float32)
        mask = np.zeros((len(texts), max_len), bool)
        for i, text in enumerate(texts):
            for j, word in enumerate(text.split()[:max_len]):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
                hidden[i, j] = np.random.default_rng(seed).standard_normal(self.dim)
                mask[i, j] = True
        return jnp.asarray(hidden), jnp.asarray(mask)


def _generator(cfg_scale: float, seed: int = 0) -> VideoGenerator:
    dit = WanDiT(TINY_DIT, rngs=nnx.Rngs(seed))
    vae = CausalVAE(TINY_VAE, rngs=nnx.Rngs(1))
    latent = (*TINY_VAE.latent_shape(5, 16, 16), TINY_VAE.z_dim)  # (2, 4, 4, 4)
    sample = SampleConfig(sampler=Sampler.EULER, num_steps=2, cfg_scale=cfg_scale, negative_prompt="blurry")
    return VideoGenerator(dit=dit, vae=vae, text_encoder=HashTextEncoder(), latent_shape=latent,
                          latent_mean=np.zeros(TINY_VAE.z_dim, np.float32),
                          latent_std=np.ones(TINY_VAE.z_dim, np.float32), sample=sample, text_max_len=6, shift=3.0)


@pytest.fixture(scope="module")
def gen():
    return _generator(cfg_scale=4.0)


CAPTIONS = ["a red circle moves left", "a blue square moves up", "a green triangle moves right"]


def test_clips_are_uint8_and_deterministic_for_a_key(gen):
    a = gen(CAPTIONS, jax.random.key(0), batch_size=2)
    assert a.shape == (3, 5, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, gen(CAPTIONS, jax.random.key(0), batch_size=2))
    assert (a != gen(CAPTIONS, jax.random.key(1), batch_size=2)).any()


def test_other_params_swap_in_without_recompiling(gen):
    before = gen(CAPTIONS[:2], jax.random.key(0), batch_size=2)
    compiled = gen._fn._cache_size()
    other = WanDiT(TINY_DIT, rngs=nnx.Rngs(5))
    swapped = gen(CAPTIONS[:2], jax.random.key(0), batch_size=2, dit=other)
    assert gen._fn._cache_size() == compiled  # same program, new params
    assert (swapped != before).any()
    np.testing.assert_array_equal(swapped, _generator(4.0, seed=5)(CAPTIONS[:2], jax.random.key(0), batch_size=2))


def test_negative_prompt_matters_only_with_guidance(gen):
    key = jax.random.key(0)
    with_cfg = [gen(CAPTIONS[:2], key, batch_size=2, negative_prompt=n) for n in ("blurry", "static")]
    assert (with_cfg[0] != with_cfg[1]).any()
    no_cfg = _generator(cfg_scale=1.0)
    plain = [no_cfg(CAPTIONS[:2], key, batch_size=2, negative_prompt=n) for n in ("blurry", "static")]
    np.testing.assert_array_equal(plain[0], plain[1])  # scale 1: the negative branch is never evaluated


# ----------------------------------------------------------------------------------------- masked-video conditions


def _masked_generator(mode: str) -> VideoGenerator:
    import dataclasses

    from klingjax.models.conditions import ConditionSpec

    cfg = dataclasses.replace(TINY_DIT, conditions=ConditionSpec.from_config({"masked_video": mode}))
    gen = _generator(cfg_scale=3.0)
    dit = WanDiT(cfg, rngs=nnx.Rngs(0))
    if mode == "channel_concat":  # make the zero-initialised condition kernel matter
        k = dit.patch_embedding.cond_kernel
        k[...] = jax.random.normal(jax.random.key(5), k[...].shape) * 0.1
    return dataclasses.replace(gen, dit=dit)


def test_given_latents_are_exact_in_the_sample_and_guidance_scales_matter():
    # The sampler keeps given positions exact whatever the mode (diffusion/masked.py; both modes' inputs are tested in
    # tests/models/test_dit_masked.py); one mode keeps this to one compile.
    gen = _masked_generator("per_token_timesteps")
    videos = np.random.default_rng(0).integers(0, 256, (3, 5, 16, 16, 3), dtype=np.uint8)
    z = gen.encode(videos, batch_size=2)  # (3, 2, 4, 4, 4)
    zf = gen.encode_frames(videos, batch_size=2)
    np.testing.assert_allclose(zf[:, 0], z[:, 0], atol=1e-5)  # a causal VAE encodes frame 0 alone
    mask = np.zeros(z.shape[:4], bool)
    mask[:, 0] = True  # image-to-video
    key = jax.random.key(0)
    out = gen(CAPTIONS, key, batch_size=2, given=z, given_mask=mask)
    # Latent frame 0 decodes from latent frame 0 alone (causal decoder): the generated first frame is the
    # reconstruction of the given one, bit for bit.
    np.testing.assert_array_equal(out[:, 0], gen.decode(z, batch_size=2)[:, 0])
    assert (out != gen(CAPTIONS, key, batch_size=2, given=z, given_mask=mask, visual_scale=3.0)).any()
    assert (out != gen(CAPTIONS, key, batch_size=2, given=z, given_mask=mask, text_scale=1.0)).any()
    np.testing.assert_array_equal(out, gen(CAPTIONS, key, batch_size=2, given=z, given_mask=mask))


def test_given_latents_are_refused_by_a_text_only_model_and_checked_for_shape(gen):
    z = np.zeros((3, *gen.latent_shape), np.float32)
    with pytest.raises(ValueError, match="no masked-video conditioning"):
        gen(CAPTIONS, jax.random.key(0), given=z, given_mask=np.zeros(z.shape[:4], bool))
    masked = _masked_generator("per_token_timesteps")
    with pytest.raises(ValueError, match="given latents must be"):
        masked(CAPTIONS, jax.random.key(0), given=z[:2], given_mask=np.zeros(z.shape[:4], bool)[:2])
    with pytest.raises(ValueError, match="together"):
        masked(CAPTIONS, jax.random.key(0), given=z)
