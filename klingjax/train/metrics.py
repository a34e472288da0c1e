"""Metric writers: JSONL and TensorBoard event files, written by host 0 only."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to metrics.jsonl and scalars to TensorBoard (host 0)."""

    def __init__(self, workdir: str, name: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, f"{name}_metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", name))

    def write(self, step: int, metrics: Mapping[str, float | int | str]) -> None:
        """Write one record; non-scalar values are skipped for TensorBoard."""
        if not self.active:
            return
        clean = {k: _to_py(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _to_py(v):
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v
