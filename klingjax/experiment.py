"""Run an experiment's stages in order: data -> vae -> cache -> dit [-> distill] -> eval (each resumable, skippable).

The orchestration layer: it alone imports train, data_pipelines and eval together; only entry points
(`klingjax.main`, tests) import it. Stage definitions live in `klingjax.train.stages`, file layout in
`klingjax.layout`, generation in `klingjax.eval.generate`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from klingjax import layout, measures
from klingjax.config import ExperimentConfig, config_from_dataclass
from klingjax.data.synthetic import DEFAULT_COLOURS, SyntheticSpec
from klingjax.eval import media
from klingjax.eval.evaluate import evaluate, load_eval_clips
from klingjax.eval.generate import VideoGenerator, load_generator
from klingjax.models.text_encoders import load_text_encoder
from klingjax.sharding.mesh import make_mesh
from klingjax.train import distill, stages
from klingjax.train.loop import train_stage

# ---------------------------------------------------------------------------------------------------------
# Stage runners
# ---------------------------------------------------------------------------------------------------------


def run_data(exp: ExperimentConfig, workdir: str) -> dict:
    """Write the built-in synthetic dataset (host 0) unless the data path already has a manifest."""
    from data_pipelines.make_synthetic import write_synthetic_dataset

    d = exp.data
    out = layout.data_dir(exp, workdir)
    if jax.process_index() == 0:
        colours = DEFAULT_COLOURS + tuple((k, tuple(v)) for k, v in d.extra_colours.items())
        spec = SyntheticSpec(num_frames=d.num_frames, height=d.height, width=d.width,
                             heldout_fraction=d.heldout_fraction, size_range=tuple(d.sprite_size),
                             speed_range=tuple(d.speed_range), colours=colours, p_camera_move=d.p_camera_move,
                             p_two_moves=d.p_two_moves, camera_moves=tuple(d.camera_moves),
                             camera_words=d.camera_words, camera_world_texture=d.camera_world_texture,
                             motion=d.motion)
        write_synthetic_dataset(out, spec, exp.seed, d.num_train, d.num_eval, d.num_shards)
    multihost_utils.sync_global_devices("synthetic_data_written")
    return {"data_dir": out}


def _vae_sampler(exp: ExperimentConfig, workdir: str):
    """Periodic VAE samples: reconstruct held-out clips, log eval PSNR, save originals-vs-recon grids."""
    real, captions, _ = load_eval_clips(exp, layout.data_dir(exp, workdir), exp.sample.num_samples)
    x = jnp.asarray(real.astype(np.float32) / 127.5 - 1.0)

    compiled = {}  # graphdef -> jitted reconstruction: compiled once, params are its argument

    def on_sample(model, step: int, out_dir: str) -> dict:
        graphdef = nnx.graphdef(model)
        if graphdef not in compiled:
            def recon(state, x):
                vae = nnx.merge(graphdef, state)
                return vae.decode(vae.encode(x)[0])

            compiled[graphdef] = jax.jit(recon)
        y = compiled[graphdef](nnx.state(model), x)
        value = float(jnp.mean(measures.psnr(y, x, data_range=2.0, cap=measures.PSNR_CAP)))  # per-frame mean
        # The output may span other hosts' devices: gather it (collective) before host 0 writes it.
        y = multihost_utils.process_allgather(y, tiled=True)
        if jax.process_index() == 0:
            frames = np.round((np.asarray(y) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
            both = np.concatenate([real, frames], axis=0)  # originals first, reconstructions below
            path = os.path.join(out_dir, "samples", f"recon_step{step:06d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            media.write_png_grid(path, both, ncols=1, frames_per_row=min(9, real.shape[1]), scale=3)
        return {"eval_psnr": value}

    return on_sample


def _dit_sampler(exp: ExperimentConfig, workdir: str, mesh, text_encoder, *, student: bool = False):
    """Periodic DiT samples: generate held-out captions with the EMA model (`student`: the distill stage's, sampled
    as a student); save mp4/gif/PNG grid."""
    _, captions, _ = load_eval_clips(exp, layout.data_dir(exp, workdir), exp.sample.num_samples)

    generator: list[VideoGenerator] = []  # built once, on the first call (the VAE is trained by then)

    def on_sample(model, step: int, out_dir: str) -> dict:
        if not generator:
            generator.append(load_generator(exp, workdir, mesh, text_encoder=text_encoder, dit=model, student=student))
        videos = generator[0](captions, jax.random.key(exp.seed + 2), batch_size=len(captions), dit=model)
        if jax.process_index() == 0:
            path = os.path.join(out_dir, "samples", f"step{step:06d}")
            os.makedirs(path, exist_ok=True)
            media.write_png_grid(os.path.join(path, "grid.png"), videos, ncols=1,
                                 frames_per_row=min(9, videos.shape[1]), scale=3, captions=captions)
            media.write_mp4(os.path.join(path, "sample_00.mp4"), videos[0], fps=8, scale=4)
            media.write_gif(os.path.join(path, "sample_00.gif"), videos[0], fps=8, scale=4)
        return {}

    return on_sample


def run_vae(exp: ExperimentConfig, workdir: str, mesh) -> dict:
    spec = stages.vae_stage(exp, workdir, on_sample=_vae_sampler(exp, workdir))
    return train_stage(spec, exp.vae, workdir=workdir, mesh=mesh, seed=exp.seed)


def run_cache(exp: ExperimentConfig, workdir: str, mesh) -> dict:
    from data_pipelines.cache_latents import cache_latents

    return cache_latents(exp, workdir, stages.trained_vae(exp, workdir, mesh), load_text_encoder(exp.text_encoder))


def run_dit(exp: ExperimentConfig, workdir: str, mesh) -> dict:
    text_encoder = load_text_encoder(exp.text_encoder)
    null_ctx, null_mask = text_encoder.encode([""], exp.text_max_len)
    spec = stages.dit_stage(exp, workdir, (np.asarray(null_ctx)[0], np.asarray(null_mask)[0]),
                            on_sample=_dit_sampler(exp, workdir, mesh, text_encoder))
    return train_stage(spec, exp.dit, workdir=workdir, mesh=mesh, seed=exp.seed)


def run_distill(exp: ExperimentConfig, workdir: str, mesh) -> dict:
    text_encoder = load_text_encoder(exp.text_encoder)
    null_ctx, null_mask = text_encoder.encode([""], exp.text_max_len)
    spec = distill.distill_stage(exp, workdir, mesh, (np.asarray(null_ctx)[0], np.asarray(null_mask)[0]),
                                 on_sample=_dit_sampler(exp, workdir, mesh, text_encoder, student=True))
    cfg = dataclasses.replace(exp.distill, init_from=distill.teacher_dir(exp, workdir))  # the student starts as it
    return train_stage(spec, cfg, workdir=workdir, mesh=mesh, seed=exp.seed)


def run_eval(exp: ExperimentConfig, workdir: str, mesh) -> dict:
    gen = load_generator(exp, workdir, mesh)
    return evaluate(exp, gen, data_dir=layout.data_dir(exp, workdir), out_dir=workdir)


_RUNNERS = {"vae": run_vae, "cache": run_cache, "dit": run_dit, "distill": run_distill, "eval": run_eval}


# ---------------------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------------------


def run_experiment(exp: ExperimentConfig, workdir: str) -> dict[str, dict]:
    """Run every stage of `exp` in order under `workdir`; each stage resumes or skips finished work."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(exp.mesh.sizes)
    logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_from_dataclass(exp).to_json(indent=2))
    results: dict[str, dict] = {}
    for stage in exp.stages:
        logging.info("=== stage %s ===", stage)
        if stage == "data":
            results[stage] = run_data(exp, workdir)
        else:
            results[stage] = _RUNNERS[stage](exp, workdir, mesh)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


def with_stages(exp: ExperimentConfig, *names: str) -> ExperimentConfig:
    """A copy of `exp` that runs only `names`."""
    return dataclasses.replace(exp, stages=tuple(names))
