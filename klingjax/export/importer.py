"""`klingjax-import`: a diffusers Wan 2.1 folder -> a klingjax workdir-shaped checkpoint to fine-tune from.

    klingjax-import --diffusers Wan2.1-T2V-1.3B-Diffusers --out workdirs/wan13b_init

The folder's layout picks the DiT's masked-video mode (dit_map.masked_video_from_diffusers): a plain transformer is
text-to-video, or PER_TOKEN_TIMESTEPS when model_index.json has expand_timesteps=true (Wan 2.2 TI2V); a Wan I2V
transformer (in_channels = 2C + 4, no CLIP image_dim) is CHANNEL_CONCAT, its 4 mask rows summed into our one mask
row (exact when the 4 mask channels are equal, as in image-to-video; see dit_map). Other layouts fail naming the key.

Reads `transformer/` (WanTransformer3DModel) and/or `vae/` (AutoencoderKLWan), safetensors only, one tensor at
a time, and writes what the train loop writes: `<out>/config.json` (an ExperimentConfig describing the
imported architectures), `<out>/{dit,vae}/checkpoints/0/{state,data_iter}` holding a Trainer state (params,
a fresh optimiser state, EMA = params) through the train loop's own `Checkpointer`, and
`<out>/latents/latent_stats.json` from the VAE's `latents_mean`/`latents_std` (the DiT's latent
normalisation). The text encoder is not imported (klingjax's is the bundled MiniLM; Wan's umT5 is not
available offline). The params-only restore (`init_from`, sampling) is `klingjax.train.checkpoint.restore_params`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from klingjax.config import ExperimentConfig, StageConfig, config_from_dataclass
from klingjax.export import dit_map, vae_map
from klingjax.export.param_map import Entry, from_torch
from klingjax.export.safetensors_io import SafetensorsFolder
from klingjax.models.conditions import MaskedVideo
from klingjax.models.dit import DiTConfig
from klingjax.models.vae import VAEConfig
from klingjax.train.checkpoint import ArchitectureError

WEIGHTS_PREFIX = "diffusion_pytorch_model"


def load_params(source: str | Mapping[str, np.ndarray], entries: Sequence[Entry], model: nnx.Module,
                what: str) -> nnx.Module:
    """Fill abstract `model` from a diffusers folder's safetensors (or a torch-layout state dict of numpy arrays);
    every tensor must be used exactly once."""
    folder = source if isinstance(source, str) else "the state dict"
    weights = SafetensorsFolder(source, WEIGHTS_PREFIX) if isinstance(source, str) else source
    unused = set(weights.keys())
    by_path: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        group = by_path[tuple(str(p) for p in path)]
        arrays = []
        for e in group:
            if e.name not in unused:
                raise ArchitectureError(f"{folder} lacks tensor {e.name!r} that {what} needs")
            w = np.asarray(weights[e.name] if isinstance(weights, Mapping) else weights.get(e.name))
            if tuple(w.shape) != e.torch_shape:
                raise ArchitectureError(f"{folder}: {e.name} has shape {tuple(w.shape)}, {what} needs {e.torch_shape}")
            arrays.append(from_torch(w, e.layout).astype(var.dtype))
            unused.discard(e.name)
        value = np.stack(arrays) if group[0].layer is not None else arrays[0]  # (layers, ...) for stacked blocks
        var.set_value(jnp.asarray(value))
    if unused:
        raise ArchitectureError(f"{folder} has {len(unused)} tensors {what} does not use, e.g. {sorted(unused)[:3]}")
    return nnx.merge(graphdef, state)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: not a diffusers model folder")
    with open(path) as f:
        return json.load(f)


def _model_index(folder: str) -> dict | None:
    """The folder's model_index.json (which pipeline, expand_timesteps), or None for a bare model folder."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save_trainer(model: nnx.Module, stage_cfg: StageConfig, directory: str) -> None:
    """Save a Trainer (params, fresh optimiser, EMA = params) at step 0, exactly as the train loop would."""
    from klingjax.train.checkpoint import Checkpointer
    from klingjax.train.optim import make_optimizer
    from klingjax.train.state import Trainer

    trainer = Trainer(model, make_optimizer(stage_cfg.optim, stage_cfg.steps))
    ckpt = Checkpointer(directory, keep=stage_cfg.keep_checkpoints, async_save=False)
    ckpt.save(0, nnx.state(trainer), {}, force=True)
    ckpt.close()


def _experiment(dit: DiTConfig | None, vae: VAEConfig | None) -> ExperimentConfig:
    """An ExperimentConfig whose `vae_config` / `dit_model_config` rebuild the imported architectures."""
    exp = ExperimentConfig(name="imported")
    if vae is not None:
        fields = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temporal_downsample",
                  "dropout", "in_channels", "out_channels")
        overrides = {k: list(v) if isinstance(v, tuple) else v for k in fields for v in [getattr(vae, k)]}
        exp = dataclasses.replace(exp, vae=dataclasses.replace(exp.vae, variant="wan2.1", model_overrides=overrides))
    elif dit is not None:  # no VAE imported: still tie the DiT's channels to the config's VAE
        exp = dataclasses.replace(exp, vae=dataclasses.replace(exp.vae, model_overrides={"z_dim": dit.in_channels}))
    if dit is not None:
        # in/out channels and text_dim are tied to the VAE and the text encoder by `dit_model_config`.
        fields = ("dim", "ffn_dim", "num_heads", "num_layers", "patch_size", "freq_dim", "eps", "cross_attn_norm")
        overrides = {k: list(v) if isinstance(v, tuple) else v for k in fields for v in [getattr(dit, k)]}
        if dit.conditions.masked_video is not MaskedVideo.OFF:
            overrides["conditions"] = {"masked_video": dit.conditions.masked_video.value}
        exp = dataclasses.replace(exp, dit=dataclasses.replace(exp.dit, variant="1.3B", model_overrides=overrides))
    return exp


def import_diffusers(diffusers_dir: str, out: str) -> dict:
    """Convert `transformer/` and/or `vae/` of a diffusers folder into a klingjax workdir at `out`."""
    diffusers_dir, out = os.path.abspath(diffusers_dir), os.path.abspath(out)
    if os.path.lexists(out):
        raise FileExistsError(f"--out {out} already exists; choose a new folder (an import never overwrites)")
    parts = {p: os.path.join(diffusers_dir, p) for p in ("transformer", "vae")
             if os.path.isdir(os.path.join(diffusers_dir, p))}
    if not parts:
        raise FileNotFoundError(f"{diffusers_dir} has neither transformer/ nor vae/ (expected a diffusers Wan folder)")
    t0 = time.time()
    dit_cfg = vae_cfg = None
    if "vae" in parts:
        vae_cfg, mean, std = vae_map.vae_from_diffusers_config(_read_config(parts["vae"]))
    if "transformer" in parts:
        dit_cfg = dit_map.dit_from_diffusers_config(_read_config(parts["transformer"]), _model_index(diffusers_dir))
        if vae_cfg is not None and dit_cfg.in_channels != vae_cfg.z_dim:
            raise ArchitectureError(f"transformer in_channels {dit_cfg.in_channels} != vae z_dim {vae_cfg.z_dim}")
    exp = _experiment(dit_cfg, vae_cfg)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}-{int(time.time())}"
    os.makedirs(tmp)
    try:
        if vae_cfg is not None:
            model = load_params(parts["vae"], vae_map.vae_entries(vae_cfg), vae_map.abstract_vae(vae_cfg), "the VAE")
            _save_trainer(model, exp.vae, os.path.join(tmp, "vae", "checkpoints"))
            os.makedirs(os.path.join(tmp, "latents"))
            with open(os.path.join(tmp, "latents", "latent_stats.json"), "w") as f:
                json.dump({"mean": mean.tolist(), "std": std.tolist(), "source": diffusers_dir}, f)
            del model
        if dit_cfg is not None:
            layout = dit_map.abstract_dit(dit_map.diffusers_layout(dit_cfg))  # diffusers' shapes
            model = load_params(parts["transformer"], dit_map.dit_entries(dit_cfg), layout, "the DiT")
            model = dit_map.from_diffusers_layout(model, dit_cfg)
            _save_trainer(model, exp.dit, os.path.join(tmp, "dit", "checkpoints"))
            del model
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_from_dataclass(exp).to_json(indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("imported %s -> %s in %.1fs", diffusers_dir, out, time.time() - t0)
    return {"stages": sorted(s for s, c in (("dit", dit_cfg), ("vae", vae_cfg)) if c is not None),
            "dit": dit_cfg, "vae": vae_cfg}


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="klingjax-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", required=True, help="diffusers folder with transformer/ and/or vae/")
    parser.add_argument("--out", required=True, help="new folder to write (must not exist)")
    args = parser.parse_args(argv)
    from klingjax.export.export import setup_cli_logging

    setup_cli_logging()
    try:
        result = import_diffusers(args.diffusers, args.out)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"klingjax-import: error: {e}\n")
    logging.info("wrote stages %s to %s", result["stages"], args.out)


if __name__ == "__main__":
    main()
