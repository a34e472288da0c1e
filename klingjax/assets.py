"""Offline weight assets: the cache directory, sha256 pins and a numpy-only unpickler.

Weights ship inside pip packages (see `../shared/ASSETS.md`); several are pickles. They are sha256-verified,
unpickled once with `NumpyOnlyUnpickler` (no arbitrary globals) and converted to `.npz` under `cache_dir()`.
A leaf module: every layer that loads weights (models, eval) imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import pickle


def cache_dir() -> pathlib.Path:
    """Cache directory: `$KLINGJAX_CACHE` or `~/.cache/klingjax`."""
    return pathlib.Path(os.environ.get("KLINGJAX_CACHE") or pathlib.Path.home() / ".cache" / "klingjax")


def sha256_file(path: pathlib.Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_dir(module: str, install_hint: str, what: str) -> pathlib.Path:
    """Folder of an installed (weights) package; ImportError naming the install command when missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what} needs its weights package; install it with `{install_hint}`")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals an array pickle needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)
