"""Stage "distill": a few-step student trained from a frozen teacher DiT, classifier-free guidance folded in.

The teacher is the EMA model of `distill.init_from` (empty: this work dir's "dit" stage), restored params-only and
sharded like the DiT; it reaches the compiled step as a frozen argument (`StageSpec.frozen`, never trained or
saved). The student starts from the same params and trains in the same loop as every stage (Orbax checkpoints,
exact resume, sharding, step guard, EMA). Data: the DiT stage's latent cache and its masked-video task mixture
(`dit.tasks`), so a multi-task teacher gives a multi-task student; given positions stay clean in the teacher's
trajectory, the student's input and its samples, and out of the loss. The methods (`distill.method`) are in
klingjax/diffusion/distill.py:
  * trajectory: a plain DiT for one step count, sampled with Euler (exports to diffusers like its teacher);
  * shortcut, mean_flow: flow-map students (`ConditionSpec.flow_map`) sampled with `Sampler.FLOW_MAP` at any step
    count (trained on the jumps of the `distill.student_steps` grids).
A student samples with guidance 1 (one model evaluation per step): `student_sample_config`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import ExperimentConfig, SampleConfig
from klingjax.diffusion import distill as distill_math
from klingjax.diffusion import masked, schedules
from klingjax.diffusion.distill import DistillMethod
from klingjax.diffusion.samplers import Sampler
from klingjax.models.dit import DiTConfig, WanDiT
from klingjax.sharding.rules import get_rules
from klingjax.train.batch import LatentBatch
from klingjax.train.checkpoint import restore_model
from klingjax.train.loop import StageSpec
from klingjax.train.stages import dit_stage
from klingjax.train.step import LossContext

ADAPTIVE_EPS = 1e-3  # MeanFlow's adaptive weight 1 / (loss + eps)^p


def teacher_dir(exp: ExperimentConfig, workdir: str) -> str:
    """The teacher's stage directory (also the student's initialisation)."""
    return exp.distill.init_from or layout.stage_dir(workdir, "dit")


def student_model_config(exp: ExperimentConfig, text_dim: int) -> DiTConfig:
    """The teacher's DiT config, plus the jump-length embedding for a flow-map (shortcut / mean_flow) student."""
    cfg = layout.dit_model_config(exp, text_dim)
    if exp.distill.method.flow_map:
        cfg = dataclasses.replace(cfg, conditions=dataclasses.replace(cfg.conditions, flow_map=True))
    return cfg


def student_sample_config(exp: ExperimentConfig) -> SampleConfig:
    """How a student samples: guidance 1 (folded in), its first `distill.student_steps` count, Euler (trajectory,
    on the grid it was trained for) or FLOW_MAP (shortcut / mean_flow); the shift is the teacher's sampling shift."""
    d = exp.distill
    sampler = Sampler.FLOW_MAP if d.method.flow_map else Sampler.EULER
    return dataclasses.replace(exp.sample, sampler=sampler, num_steps=d.student_steps[0], cfg_scale=1.0,
                               visual_cfg_scale=1.0, negative_prompt="")


def sampling_shift(exp: ExperimentConfig) -> float:
    """The shift of the teacher's sampling grid (the generator's rule)."""
    return exp.sample.shift if exp.sample.shift > 0 else layout.train_shift(exp)


def trained_teacher(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, text_dim: int) -> WanDiT:
    """The teacher (EMA params of `teacher_dir`), sharded like the DiT stage."""
    cfg = layout.dit_model_config(exp, text_dim)
    return restore_model(lambda rngs: WanDiT(cfg, rngs=rngs), teacher_dir(exp, workdir), mesh=mesh,
                         rules=get_rules(exp.dit.sharding, "dit"), use_ema=True)


def trained_student(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, text_dim: int,
                    use_ema: bool = True) -> WanDiT:
    """The distill stage's student (EMA by default) from `workdir`, params only."""
    cfg = student_model_config(exp, text_dim)
    return restore_model(lambda rngs: WanDiT(cfg, rngs=rngs), layout.checkpoint_dir(workdir, "distill"), mesh=mesh,
                         rules=get_rules(exp.dit.sharding, "dit"), use_ema=use_ema)


def distill_stage(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh,
                  null_text: tuple[np.ndarray, np.ndarray], on_sample=None) -> StageSpec:
    """The distill stage's StageSpec; `null_text` is the empty prompt's (hidden (L, D), mask (L,)): the negative
    prompt of the folded guidance."""
    d = exp.distill
    null_ctx, null_mask = (jnp.asarray(a) for a in null_text)
    text_dim = null_ctx.shape[-1]
    teacher_cfg, student_cfg = layout.dit_model_config(exp, text_dim), student_model_config(exp, text_dim)
    teacher_def = nnx.graphdef(nnx.eval_shape(lambda: WanDiT(teacher_cfg, rngs=nnx.Rngs(0))))
    text_scale = d.cfg_scale or exp.sample.cfg_scale
    visual_scale = d.visual_cfg_scale or exp.sample.visual_cfg_scale
    shift = sampling_shift(exp)

    @jax.jit  # its own trace: the teacher module is merged at the level it runs in (NNX), not in the student's grad
    def teacher_velocity(x, t, cond, noise, teacher_state):
        """The teacher's guided velocity at x, t (B,) (0 at given positions: they stay clean)."""
        teacher = nnx.merge(teacher_def, teacher_state)
        b = x.shape[0]
        uncond = cond.replace(text=jnp.broadcast_to(null_ctx, (b, *null_ctx.shape)),
                              text_mask=jnp.broadcast_to(null_mask, (b, *null_mask.shape)))
        model = lambda x, t, c: teacher(x, t * 1000.0, c)  # noqa: E731
        v = masked.guided_velocity(model, x, t, cond, uncond, text_scale, visual_scale, noise)
        if cond.given_mask is not None:
            v = masked.apply_given(v, jnp.zeros_like(v), cond.given_mask)
        return jax.lax.stop_gradient(v.astype(jnp.float32))

    def loss_fn(model: WanDiT, batch: LatentBatch, key: jax.Array, ctx: LossContext):
        teacher_state = ctx.frozen["teacher"]
        x0, cond = batch.latent, batch.cond
        mask = cond.given_mask
        k_t, k_n, k_c = jax.random.split(key, 3)
        b = x0.shape[0]
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        keep = (lambda x: x) if mask is None else (lambda x: masked.apply_given(x, x0, mask))
        velocity = lambda x, t, s: teacher_velocity(keep(x), t, cond, noise, s)  # noqa: E731

        def from_teacher(steps):  # a jump of the `steps` grid, to where the teacher's Euler steps land
            _, times = distill_math.trajectory_times(k_t, b, steps, d.teacher_steps, shift)
            x_t = keep(schedules.add_noise(x0, noise, times[:, 0]))
            target = distill_math.trajectory_target(velocity, x_t, times, (teacher_state,))
            return x_t, times[:, 0], times[:, -1], jax.lax.stop_gradient(target)

        if d.method is DistillMethod.TRAJECTORY:
            x_t, t, _, target = from_teacher(d.student_steps[0])
            pred = model(x_t, t * 1000.0, cond).astype(jnp.float32)
        elif d.method is DistillMethod.SHORTCUT:
            counts = tuple(sorted(d.student_steps))
            graphdef, state = nnx.split(model)

            def from_student(_):  # a jump of a coarser grid, to where two of the student's finer jumps land
                frozen = jax.tree.map(jax.lax.stop_gradient, state)  # merged here: NNX modules live at their trace

                def jump(x, t, h):
                    student = nnx.merge(graphdef, jax.tree.map(lambda a: a, frozen))
                    return student(keep(x), t * 1000.0, cond.replace(interval=h)).astype(jnp.float32)

                t, m, r = distill_math.shortcut_times(k_t, b, counts[:-1], shift)
                x_t = keep(schedules.add_noise(x0, noise, t))
                return x_t, t, r, distill_math.shortcut_target(jump, x_t, t, m, r)

            # One level per batch: the finest from the teacher with probability 1 / len(counts), else the student's own.
            teach = jax.random.uniform(k_c) < 1.0 / len(counts)
            x_t, t, r, target = (from_teacher(counts[-1]) if len(counts) == 1 else
                                 jax.lax.cond(teach, lambda _: from_teacher(counts[-1]), from_student, None))
            pred = model(x_t, t * 1000.0, cond.replace(interval=t - r)).astype(jnp.float32)
        else:
            t, r = distill_math.mean_flow_times(k_t, b, d.student_steps, shift, d.instant_fraction)
            x_t = keep(schedules.add_noise(x0, noise, t))
            v = teacher_velocity(x_t, t, cond, noise, teacher_state)
            graphdef, state = nnx.split(model)  # merged inside the jvp: NNX modules live at the trace they run in

            def u_fn(z, t, h):
                student = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # fresh Variables at this trace
                return student(keep(z), t * 1000.0, cond.replace(interval=h)).astype(jnp.float32)

            pred, target = distill_math.mean_flow_target(u_fn, x_t, t, r, v)
        se = jnp.square(pred - target)  # (B, t, h, w, C)
        if mask is None:
            per_sample = jnp.mean(se, axis=tuple(range(1, se.ndim)))
        else:  # the generated positions only; given ones get no gradient
            gen = jnp.broadcast_to(~masked.given_positions(mask)[..., None], se.shape)
            per_sample = (jnp.sum(jnp.where(gen, se, 0.0), axis=tuple(range(1, se.ndim)))
                          / jnp.maximum(jnp.sum(gen, axis=tuple(range(1, se.ndim))), 1))
        weight = 1.0
        if d.adaptive_weight > 0:
            weight = jax.lax.stop_gradient(1.0 / (per_sample + ADAPTIVE_EPS) ** d.adaptive_weight)
        loss = jnp.mean(weight * per_sample)
        return loss, {"mse": jnp.mean(per_sample), "t_mean": jnp.mean(t)}

    def frozen():
        return {"teacher": nnx.state(trained_teacher(exp, workdir, mesh, text_dim=text_dim))}

    base = dit_stage(exp, workdir, null_text)  # the DiT stage's data: latent cache + task mixture
    return StageSpec("distill", "dit", lambda rngs: WanDiT(student_cfg, rngs=rngs), loss_fn, base.make_dataset,
                     base.to_batch, on_sample, frozen=frozen)
