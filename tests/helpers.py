"""Helpers shared by every test directory: the repo root, a fast-compiling jit, tiny model configs.

Import as `import helpers` / `from helpers import ...` (tests/conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax

from klingjax.models.dit import DiTConfig, dit_config
from klingjax.models.vae import VAE_VARIANTS, VAEConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

# Backend optimisation level 0: compiles much faster on CPU; numerics are unchanged for these tests.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# The smallest DiT that still has every part (2 heads, 2 scanned layers) and the tiny VAE (4x4x4, 4 channels).
TINY_DIT: DiTConfig = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4,
                                 out_channels=4, text_dim=24)
TINY_VAE: VAEConfig = dataclasses.replace(VAE_VARIANTS["tiny"])
