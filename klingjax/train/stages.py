"""Stage definitions for the train loop: the VAE stage (videos) and the DiT stage (cached latents)."""

from __future__ import annotations

import dataclasses
import functools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import ExperimentConfig
from klingjax.data import tasks as data_tasks
from klingjax.data.pipeline import decode_video_record, make_dataset
from klingjax.data.records import list_shards
from klingjax.data.shard_check import ShardCheckIterDataset
from klingjax.data.synthetic.camera import camera_condition, latent_frame_rows
from klingjax.diffusion import masked, schedules
from klingjax.models.conditions import CameraCondition
from klingjax.models.discriminator import DiscriminatorConfig, PatchDiscriminator3D
from klingjax.models.dit import WanDiT
from klingjax.models.lpips import load_lpips
from klingjax.models.vae import CausalVAE
from klingjax.sharding.rules import get_rules
from klingjax.train.batch import LatentBatch, latent_batch, video_batch
from klingjax.train.checkpoint import restore_model
from klingjax.train.loop import Player, StageSpec
from klingjax.train.optim import make_disc_optimizer
from klingjax.train.step import LossContext
from klingjax.train.vae_losses import disc_update, vae_loss

# ---------------------------------------------------------------------------------------------------------
# VAE stage
# ---------------------------------------------------------------------------------------------------------


def _video_only(record: dict, *, num_frames: int, height: int, width: int) -> dict:
    out = decode_video_record(record, num_frames=num_frames, height=height, width=width)
    return {"video": out["video"]}


def vae_stage(exp: ExperimentConfig, workdir: str, on_sample=None) -> StageSpec:
    """Stage "vae": L1 (+ MSE) + LPIPS + KL [+ 3D PatchGAN] training of the causal VAE on raw clips."""
    vcfg = layout.vae_config(exp)
    cfg, d = exp.vae, exp.data

    def make_model(rngs: nnx.Rngs) -> CausalVAE:
        return CausalVAE(vcfg, rngs=rngs)

    player = None
    if cfg.disc.weight > 0:
        dcfg = DiscriminatorConfig(dim=cfg.disc.dim, num_layers=cfg.disc.layers, in_channels=vcfg.out_channels)
        player = Player(make=lambda rngs: PatchDiscriminator3D(dcfg, rngs=rngs), tx=make_disc_optimizer(cfg),
                        update=disc_update(cfg.disc.start), name="discriminator", start=cfg.disc.start)
    frozen = (lambda: {"lpips": load_lpips(cfg.loss.lpips_net)}) if cfg.loss.lpips_weight > 0 else None

    def dataset(per_host: int, seed: int, index: int, count: int):
        # A causal VAE is convolutional in time: short clips train it for any length, at a fraction of the cost.
        frames = cfg.num_frames or d.num_frames
        decode = functools.partial(_video_only, num_frames=frames, height=d.height, width=d.width)
        shards = list_shards(layout.data_dir(exp, workdir), "train")
        ds = make_dataset(shards, decode=decode, batch_size=per_host, seed=seed, shuffle=True, num_epochs=None,
                          process_index=index, process_count=count, worker_count=d.worker_count)
        return ShardCheckIterDataset(ds, shards)  # a changed shard set is reported on resume

    loss_fn = functools.partial(vae_loss, cfg=cfg.loss, disc=cfg.disc)
    return StageSpec("vae", "vae", make_model, loss_fn, dataset, video_batch, on_sample, player=player, frozen=frozen)


# ---------------------------------------------------------------------------------------------------------
# DiT stage
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatentDecoder(grain.transforms.RandomMap):
    """Picklable latent-cache record -> example; with `tasks`, also draws the example's masked-video task.

    The task and its given mask are drawn from the example's own generator (a pure function of the seed, host
    and stream position, so a resumed run draws the same tasks); `given` holds the task's given latents (the
    whole-clip encoding or the key frames' lone encodings: `tasks.given_latents`).
    """

    mean: np.ndarray
    std: np.ndarray
    tasks: tuple[tuple[str, float], ...] = ()  # (name, weight); () = text-to-video only, no given fields
    patch: tuple[int, int, int] = (1, 1, 1)  # the DiT patch: masks are whole tokens
    camera_rows: tuple[int, ...] = ()  # camera condition: the pixel frame each latent frame reads; () = no camera

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        latent = (np.asarray(record["latent"], np.float32) - self.mean) / self.std  # (t, h, w, c), ~unit scale
        out = {"latent": latent,
               "text": np.asarray(record["text"], np.float32),  # (L, text_dim)
               "text_mask": np.asarray(record["text_mask"], bool)}  # (L,)
        if self.camera_rows:
            meta = record["meta_json"]
            out["camera"] = camera_condition(json.loads(meta.decode() if isinstance(meta, bytes) else str(meta)),
                                             self.camera_rows)
        if not self.tasks:
            return out
        name, mask = data_tasks.draw_task(rng, dict(self.tasks), latent.shape[:3], self.patch)
        if data_tasks.TASKS[name].source == data_tasks.SOURCE_FRAMES:
            if "frame_latent" not in record:
                raise KeyError(f"task {name!r} needs the key frames' own latents ('frame_latent'); this latent cache "
                               "predates them: delete the work dir's latents/ folder to re-encode")
            given = (np.asarray(record["frame_latent"], np.float32) - self.mean) / self.std
        else:
            given = latent
        out.update(given=given, given_mask=mask, task=np.int32(TASK_IDS[name]))
        return out


TASK_IDS = {name: i for i, name in enumerate(data_tasks.TASKS)}  # the `task` id of a batch row, for metrics


def dit_stage(exp: ExperimentConfig, workdir: str, null_text: tuple[np.ndarray, np.ndarray],
              on_sample=None) -> StageSpec:
    """Stage "dit": rectified-flow training on cached latents, caption dropout to the empty prompt and, with
    `dit.tasks`, the masked-video task mixture (given positions kept clean and out of the loss, the visual
    condition dropped with probability `dit.visual_dropout` for guidance).

    `null_text` is the text encoder's (hidden (L, D), mask (L,)) of the empty prompt.
    """
    cfg = exp.dit
    null_ctx, null_mask = (jnp.asarray(a) for a in null_text)
    mcfg = layout.dit_model_config(exp, null_ctx.shape[-1])
    shift = layout.train_shift(exp)
    tasks = tuple((k, float(w)) for k, w in sorted(cfg.tasks.items()) if w > 0)

    def make_model(rngs: nnx.Rngs) -> WanDiT:
        return WanDiT(mcfg, rngs=rngs)

    def loss_fn(model: WanDiT, batch: LatentBatch, key: jax.Array, ctx: LossContext):
        del ctx  # the DiT loss reads neither the step nor frozen arrays
        x0, text, mask = batch.latent, batch.cond.text, batch.cond.text_mask
        k_t, k_n, k_d, k_v, k_c = jax.random.split(key, 5)
        b = x0.shape[0]
        drop = jax.random.uniform(k_d, (b,)) < cfg.caption_dropout  # (B,)
        text = jnp.where(drop[:, None, None], null_ctx[None], text)
        mask = jnp.where(drop[:, None], null_mask[None], mask)
        cond = batch.cond.replace(text=text, text_mask=mask)
        given_mask = cond.given_mask
        if given_mask is not None:  # the visual condition dropped on its own draw: that example is text-to-video
            keep = jax.random.uniform(k_v, (b,)) >= cfg.visual_dropout  # (B,)
            given_mask = given_mask & keep[:, None, None, None]
            cond = cond.replace(given_mask=given_mask)
        t = schedules.sample_timesteps(k_t, b, method=cfg.timestep_sampling, shift=shift)
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        velocity = lambda x_t, t: model(x_t, t * 1000.0, cond)
        clean_inputs = True
        if given_mask is not None and cfg.context_noise > 0:  # noise augmentation of the given latents
            k_s, k_e = jax.random.split(k_c)
            level = jax.random.uniform(k_s, (b,), maxval=cfg.context_noise)  # (B,)
            lv = level[:, None, None, None, None]
            noisy = (1.0 - lv) * x0 + lv * jax.random.normal(k_e, x0.shape, x0.dtype)
            cond = cond.replace(given_time=level)
            velocity = lambda x_t, t: model(masked.apply_given(x_t, noisy, given_mask), t * 1000.0, cond)
            clean_inputs = False  # the model input at given positions is `noisy`, set above
        loss, per_sample = masked.masked_flow_loss(velocity, x0, noise, t, given_mask, weighting=cfg.loss_weighting,
                                                   clean_inputs=clean_inputs)
        metrics = {"t_mean": jnp.mean(t)}
        if batch.task is not None:  # per-task loss means (NaN-free: 0 when a task is absent from the batch)
            for name, _ in tasks:
                rows = batch.task == TASK_IDS[name]
                metrics[f"loss_{name}"] = jnp.sum(jnp.where(rows, per_sample, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
        return loss, metrics

    def dataset(per_host: int, seed: int, index: int, count: int):
        mean, std = layout.load_latent_stats(workdir)
        rows = ()
        if mcfg.conditions.camera is not CameraCondition.OFF:
            rows = tuple(int(r) for r in latent_frame_rows(exp.data.num_frames, layout.vae_config(exp).temporal_factor))
        decode = LatentDecoder(mean=mean, std=std, tasks=tasks, patch=tuple(mcfg.patch_size), camera_rows=rows)
        shards = list_shards(layout.latent_dir(workdir), "train")
        ds = make_dataset(shards, decode=decode, batch_size=per_host, seed=seed, shuffle=True, num_epochs=None,
                          process_index=index, process_count=count, worker_count=exp.data.worker_count)
        return ShardCheckIterDataset(ds, shards)

    return StageSpec("dit", "dit", make_model, loss_fn, dataset, latent_batch, on_sample)


# ---------------------------------------------------------------------------------------------------------
# Trained models (params only)
# ---------------------------------------------------------------------------------------------------------


def trained_vae(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, use_ema: bool = True) -> CausalVAE:
    """The VAE stage's model (EMA by default) from `workdir` (or `vae.from_workdir`), params only (no optimizer
    state), sharded on `mesh`."""
    cfg = layout.vae_config(exp)
    ckpt = layout.checkpoint_dir(layout.vae_workdir(exp, workdir), "vae")
    return restore_model(lambda rngs: CausalVAE(cfg, rngs=rngs), ckpt, mesh=mesh,
                         rules=get_rules(exp.vae.sharding, "vae"), use_ema=use_ema)


def trained_dit(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, text_dim: int,
                use_ema: bool = True) -> WanDiT:
    """The DiT stage's model (EMA by default) from `workdir`, params only, sharded on `mesh`."""
    cfg = layout.dit_model_config(exp, text_dim)
    return restore_model(lambda rngs: WanDiT(cfg, rngs=rngs), layout.checkpoint_dir(workdir, "dit"), mesh=mesh,
                         rules=get_rules(exp.dit.sharding, "dit"), use_ema=use_ema)
