"""The typed batches the train step consumes, and how a host's numpy examples become global arrays.

    VideoBatch(video)          stage "vae": clips (B, T, H, W, 3) in [-1, 1]
    LatentBatch(latent, cond)  stage "dit": normalised latents (B, t, h, w, c) + their `Conditions`

Batches are pytrees: globalising one is a tree map (`global_batch`), and adding a condition adds a field of
`Conditions`, never a new batch key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import struct

from klingjax.models.conditions import Conditions


@struct.dataclass
class VideoBatch:
    """Pixel clips for the VAE stage."""

    video: jax.Array  # (B, T, H, W, 3) in [-1, 1]


@struct.dataclass
class LatentBatch:
    """Cached latents and their conditions for the DiT stage."""

    latent: jax.Array  # (B, t, h, w, c), normalised per channel to ~unit scale
    cond: Conditions
    task: jax.Array | None = None  # (B,) int32 masked-video task id of each row (train.stages.TASK_IDS); metrics only


def video_batch(example: Mapping[str, np.ndarray]) -> VideoBatch:
    """A host's decoded clips (the data pipeline's dict) as a VideoBatch."""
    return VideoBatch(video=np.asarray(example["video"]))


def latent_batch(example: Mapping[str, np.ndarray]) -> LatentBatch:
    """A host's latent-cache examples (the data pipeline's dict) as a LatentBatch (+ the masked-video fields)."""
    given = {k: np.asarray(example[k]) for k in ("given", "given_mask", "camera") if k in example}
    cond = Conditions(text=np.asarray(example["text"]), text_mask=np.asarray(example["text_mask"]), **given)
    task = np.asarray(example["task"]) if "task" in example else None
    return LatentBatch(latent=np.asarray(example["latent"]), cond=cond, task=task)


def global_batch(local: Any, sharding: jax.sharding.Sharding) -> Any:
    """A host-local numpy batch pytree -> global arrays split over the batch axes of the mesh."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local)
