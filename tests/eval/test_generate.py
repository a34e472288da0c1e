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
