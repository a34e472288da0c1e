"""klingjax: JAX/Flax NNX framework for Kling-style video generation models."""

__version__ = "0.1.0"
