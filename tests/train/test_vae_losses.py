"""VAE training losses: LPIPS term, hinge GAN with the adaptive weight, discriminator gating, end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from klingjax.config import DiscConfig, VAELossConfig
from klingjax.models.discriminator import DiscriminatorConfig, PatchDiscriminator3D
from klingjax.models.lpips import LPIPSNet, load_lpips
from klingjax.models.vae import CausalVAE, VAEConfig
from klingjax.train import vae_losses as vl
from klingjax.train.batch import VideoBatch
from klingjax.train.state import Trainer
from klingjax.train.step import LossContext, make_train_step

# A real CausalVAE at its smallest: one down/up stage (2x spatial, 2x temporal), 4 base channels.
MICRO_VAE = VAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,))
MICRO_DISC = DiscriminatorConfig(dim=4, num_layers=1, norm_groups=2)
LOSS = VAELossConfig(kl_weight=1e-3, mse_weight=0.5, lpips_weight=0.3, lpips_frames=2)
DISC = DiscConfig(weight=0.7, start=1)


def _init(make):
    """Build a module with one compiled init (eager init compiles every parameter's RNG op separately)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def _video(seed, shape=(2, 3, 32, 32, 3)):
    """Smooth random videos in [-1, 1] (upsampled noise: LPIPS reacts to structure, not just pixels)."""
    coarse = jax.random.uniform(jax.random.key(seed), (shape[0], shape[1], 8, 8, 3), minval=-0.8, maxval=0.8)
    return jax.image.resize(coarse, shape, "linear")


@pytest.fixture(scope="module")
def lpips_params():
    return load_lpips(LPIPSNet.ALEX)


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------


def test_lpips_zero_for_identical_grows_with_noise_and_matches_eval(lpips_params):
    from klingjax.eval.image_metrics import lpips as eval_lpips

    x = _video(0)
    f = jax.jit(jax.value_and_grad(lambda r, t, p: vl.video_lpips(p, r, t, jax.random.key(0), net=LPIPSNet.ALEX)))
    same, grad_same = f(x, x, lpips_params)
    assert abs(float(same)) < 1e-12 and np.isfinite(np.asarray(grad_same)).all()
    values = [float(f(x + s * jax.random.normal(jax.random.key(1), x.shape), x, lpips_params)[0])
              for s in (0.02, 0.1, 0.4)]
    assert 0.0 < values[0] < values[1] < values[2], values
    # The training term is the eval metric (same weights and formula), per frame on [-1, 1] videos.
    y = jnp.clip(x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
    to_uint = lambda v: np.asarray((v + 1.0) * 127.5)
    want = np.mean(eval_lpips(to_uint(y), to_uint(x)))
    np.testing.assert_allclose(float(f(y, x, lpips_params)[0]), want, rtol=1e-4)


def test_lpips_frame_subset_is_distinct_frames_per_clip():
    idx = np.asarray(vl.frame_subset(jax.random.key(3), 64, 9, 4))
    assert idx.shape == (64, 4) and idx.min() >= 0 and idx.max() < 9
    assert all(len(set(row)) == 4 for row in idx)
    assert len({tuple(r) for r in idx}) > 1  # different clips draw different frames


# ---------------------------------------------------------------------------------------------------------
# Adversarial terms
# ---------------------------------------------------------------------------------------------------------


def test_hinge_losses_on_known_logits():
    real, fake = jnp.asarray([2.0, 0.5, -1.0]), jnp.asarray([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2]
    np.testing.assert_allclose(float(vl.hinge_d_loss(real, fake)), 0.5 * (2.5 / 3 + 3.0 / 3), rtol=1e-6)
    np.testing.assert_allclose(float(vl.generator_adv_loss(fake)), 1.0 / 3, rtol=1e-6)
    assert float(vl.hinge_d_loss(jnp.full(4, 5.0), jnp.full(4, -5.0))) == 0.0  # confident and right: no loss
    w = vl.adaptive_weight({"a": jnp.asarray([3.0, 4.0])}, {"a": jnp.asarray([0.0, 1e-9])})
    assert float(w) == vl.MAX_ADAPTIVE_WEIGHT  # 5 / (1e-9 + 1e-4) is clipped


def test_discriminator_shapes_and_errors():
    cfg = DiscriminatorConfig(dim=4, num_layers=2)
    apply = lambda x: PatchDiscriminator3D(cfg, rngs=nnx.Rngs(0))(x)  # shapes only: nothing is computed
    for shape in ((2, 9, 32, 32, 3), (1, 1, 32, 48, 3)):  # videos and single images
        out = jax.eval_shape(apply, jax.ShapeDtypeStruct(shape, jnp.float32))
        assert out.shape == (shape[0], *cfg.output_shape(*shape[1:4]), 1)
    assert cfg.output_shape(9, 32, 32) == (3, 6, 6)  # T: 9 -> 5 -> 3 (causal, stride 2); H: 32 -> 16 -> 8 -> 6
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(apply, jax.ShapeDtypeStruct((1, 5, 8, 8, 3), jnp.float32))


@pytest.fixture(scope="module")
def gan(lpips_params):
    """The VAE loss and the gradients of its parts at optimizer steps 0 (< disc_start) and 1, one compile."""
    vae = _init(lambda: CausalVAE(MICRO_VAE, rngs=nnx.Rngs(0)))
    disc = _init(lambda: PatchDiscriminator3D(MICRO_DISC, rngs=nnx.Rngs(1)))
    x = _video(4)
    (vg, vs), (dg, ds) = nnx.split(vae), nnx.split(disc)
    key = jax.random.key(2)

    @jax.jit
    def parts(vs, ds, frozen, step):
        def f(vs, ds):
            ctx = LossContext(step, frozen, nnx.merge(dg, ds))
            total, m = vl.vae_loss(nnx.merge(vg, vs), VideoBatch(x), key, ctx, cfg=LOSS, disc=DISC)
            return {"total": total, "d_loss": m["d_loss"], "g_adv": m["g_adv"], "lpips": m["lpips"]}, m

        # One forward, one backward per part: {part: (vae grads, disc grads)}. (Not jax.jacrev: under jit on
        # CPU its vmapped backward of this VAE came out wrong, while jit(grad) matches eager autodiff.)
        out, vjp, metrics = jax.vjp(f, vs, ds, has_aux=True)
        one_hot = lambda name: {k: jnp.asarray(k == name, v.dtype) for k, v in out.items()}
        return {**metrics, "total": out["total"]}, {name: vjp(one_hot(name)) for name in out}

    frozen = {"lpips": lpips_params}
    return {s: parts(vs, ds, frozen, jnp.asarray(s, jnp.uint32)) for s in (0, 1)}


def _kernel(grads):
    return grads[0]["decoder"]["conv_out"]["kernel"][...]


def _is_zero(tree) -> bool:
    return all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(tree))


def test_before_disc_start_adversarial_terms_are_exactly_zero(gan):
    out, grads = gan[0]
    for k in ("d_loss", "g_adv", "adaptive_weight", "logits_real", "logits_fake"):
        assert float(out[k]) == 0.0, k
    assert float(out["total"]) == float(out["loss"])  # nothing but the VAE's own objective
    assert _is_zero(grads["total"][1])  # the discriminator gets no gradient at all


def test_adaptive_weight_is_the_last_layer_gradient_ratio(gan):
    out, grads = gan[1]
    # Hand-computed from full-model autodiff, read at the decoder's last kernel: the reconstruction terms' gradient
    # there is the step-0 loss's (L1 + MSE + LPIPS + KL; the KL does not depend on the decoder), same batch.
    rec_grad = _kernel(gan[0][1]["total"])
    ratio = np.linalg.norm(rec_grad) / (np.linalg.norm(_kernel(grads["g_adv"])) + 1e-4)
    assert 0.0 < float(out["adaptive_weight"])
    np.testing.assert_allclose(float(out["adaptive_weight"]), DISC.weight * ratio, rtol=1e-4)


def test_after_disc_start_vae_gradient_includes_the_weighted_adversarial_term(gan):
    (out0, g0), (out1, g1) = gan[0], gan[1]
    g_term = float(out1["adaptive_weight"] * out1["g_adv"])
    np.testing.assert_allclose(float(out1["loss"]), float(out0["loss"]) + g_term, rtol=1e-5)
    w = float(out1["adaptive_weight"])
    for a, b, g in zip(jax.tree.leaves(g1["total"][0]), jax.tree.leaves(g0["total"][0]),
                       jax.tree.leaves(g1["g_adv"][0])):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), w * np.asarray(g), atol=1e-5)
    assert not _is_zero(g1["g_adv"][0])


def test_each_player_gets_gradients_only_from_its_own_loss(gan):
    out, grads = gan[1]
    assert float(out["d_loss"]) > 0.0
    vae_from_d, disc_from_d = grads["d_loss"]
    vae_from_g, disc_from_g = grads["g_adv"]
    assert _is_zero(vae_from_d) and not _is_zero(disc_from_d)  # D's loss sees a stop-gradient reconstruction
    assert _is_zero(disc_from_g) and not _is_zero(vae_from_g)  # the generator term sees frozen D params
    for a, b in zip(jax.tree.leaves(grads["total"][1]), jax.tree.leaves(disc_from_d)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_lpips_gradient_reaches_the_vae(gan):
    out, grads = gan[0]
    assert float(out["lpips"]) > 0.0
    assert not _is_zero(_kernel(grads["lpips"])) and not _is_zero(grads["lpips"][0]["encoder"])


# ---------------------------------------------------------------------------------------------------------
# The train step: frozen LPIPS params as arguments, discriminator gated by disc_start
# ---------------------------------------------------------------------------------------------------------


def test_lpips_params_reach_the_step_as_arguments_not_state(lpips_params):
    import functools

    trainer = nnx.eval_shape(lambda: Trainer(CausalVAE(MICRO_VAE, rngs=nnx.Rngs(0)), optax.adam(1e-2),
                                             PatchDiscriminator3D(MICRO_DISC, rngs=nnx.Rngs(1)), optax.adam(1e-2)))
    graphdef, state = nnx.split(trainer)
    assert set(state.keys()) == {"model", "optimizer", "ema", "disc", "disc_optimizer", "guard"}
    kernels = {tuple(v.shape) for v in jax.tree.leaves(lpips_params) if v.ndim > 1}
    assert not kernels & {tuple(v.shape) for v in jax.tree.leaves(state)}  # no LPIPS weight is trained or saved
    step = make_train_step(graphdef, functools.partial(vl.vae_loss, cfg=LOSS, disc=DISC), ema_decay=0.9,
                           player_update=vl.disc_update(DISC.start), frozen=True)
    video = jax.ShapeDtypeStruct((2, 3, 32, 32, 3), jnp.float32)
    hlo = jax.jit(step).lower(state, VideoBatch(video), jax.random.key(0), {"lpips": lpips_params}).as_text()
    assert "tensor<11x11x3x64xf32>" in hlo  # AlexNet's first kernel: an argument, never a folded constant
    assert not any("constant" in line and "11x11x3x64" in line for line in hlo.splitlines())


class _Generator(nnx.Module):
    """A one-layer "autoencoder" for the step's generic two-player mechanics."""

    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def _two_player_loss(model, batch, key, ctx: LossContext, *, start: int):
    x = batch["x"]
    recon = model(x)
    active = ctx.step >= start
    g = jnp.where(active, vl.generator_adv_loss(vl.frozen_module(ctx.disc)(recon)), 0.0)
    logits = ctx.disc(jnp.concatenate([x, jax.lax.stop_gradient(recon)]))
    d = jnp.where(active, vl.hinge_d_loss(*jnp.split(logits, 2)), 0.0)
    rec = jnp.mean(jnp.abs(recon - x))
    return rec + g + d, {"loss": rec + g, "d_loss": d}


def test_train_step_trains_the_discriminator_only_from_disc_start():
    import functools

    tx = optax.adamw(1e-2, weight_decay=0.1)  # weight decay would move untouched params: they must not move
    trainer = Trainer(_Generator(nnx.Rngs(0)), tx, nnx.Linear(4, 1, rngs=nnx.Rngs(1)), tx)
    graphdef, state = nnx.split(trainer)
    step_fn = jax.jit(make_train_step(graphdef, functools.partial(_two_player_loss, start=2), ema_decay=0.9,
                                      player_update=vl.disc_update(2)))
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 4))}
    leaves = lambda s, part: [np.asarray(v) for v in jax.tree.leaves(s[part])]
    states = [state]
    for _ in range(3):
        state, metrics = step_fn(state, batch, jax.random.key(0))
        states.append(state)
        assert (float(metrics["d_loss"]) > 0) == (len(states) > 3), metrics
    for part in ("disc", "disc_optimizer"):  # optimizer steps 0 and 1: untouched, update count included
        for a, b in zip(leaves(states[0], part), leaves(states[2], part)):
            np.testing.assert_array_equal(a, b)
    assert all((a != b).any() for a, b in zip(leaves(states[2], "disc"), leaves(states[3], "disc")))
    assert all((a != b).any() for a, b in zip(leaves(states[0], "model"), leaves(states[1], "model")))
    assert int(states[3]["disc_optimizer"]["step"][...]) == 1 and int(states[3]["optimizer"]["step"][...]) == 3
    assert float(metrics["disc_grad_norm"]) > 0


# ---------------------------------------------------------------------------------------------------------
# End to end: the vae stage with LPIPS and the GAN runs, checkpoints, resumes, and its VAE loads everywhere
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vae_stage_with_lpips_and_gan_resumes_and_its_vae_loads(tmp_path):
    from experiments import vae_recipe
    from klingjax import layout
    from klingjax.config import to_experiment
    from klingjax.experiment import run_experiment
    from klingjax.export.checkpoint_source import OrbaxLeaves, check_architecture, find_checkpoints
    from klingjax.export.export import export_checkpoint
    from klingjax.export.vae_map import abstract_vae
    from klingjax.sharding.mesh import make_mesh
    from klingjax.train import stages
    from klingjax.train.checkpoint import restore_params

    c = vae_recipe.get_config("runlocal")
    c.data.num_train, c.data.num_eval = 16, 8
    c.vae.steps, c.vae.checkpoint_every, c.vae.max_steps_per_run = 4, 2, 3
    c.vae.loss.lpips_weight, c.vae.loss.lpips_frames = 0.1, 3
    c.vae.disc.weight, c.vae.disc.start, c.vae.disc.dim, c.vae.disc.layers = 0.5, 2, 8, 2
    exp = to_experiment(c)
    workdir = str(tmp_path)
    first = run_experiment(exp, workdir)["vae"]
    assert first["step"] == 3 and not first["finished"]
    second = run_experiment(exp, workdir)["vae"]
    assert second["start_step"] == 3 and second["step"] == 4 and second["finished"]

    with open(os.path.join(workdir, "vae_metrics.jsonl")) as f:
        logged = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4]
    assert all(logged[s]["d_loss"] == 0.0 and logged[s]["lpips"] > 0 for s in (1, 2))
    assert all(logged[s]["d_loss"] > 0.0 and logged[s]["adaptive_weight"] > 0 for s in (3, 4))

    # The checkpoint adds `disc`/`disc_optimizer` beside unchanged model/optimizer/ema (and the step guard's
    # counters); no LPIPS weights.
    _, (ckpt,) = find_checkpoints(os.path.join(workdir, "vae"))
    leaves = OrbaxLeaves(ckpt.state_dir)
    assert {p[0] for p in leaves.paths} == {"model", "optimizer", "ema", "disc", "disc_optimizer", "guard"}
    vcfg = layout.vae_config(exp)
    for prefix in ("model", "ema"):
        check_architecture(leaves, prefix, abstract_vae(vcfg), "CausalVAE")  # what export reads

    # The loader of cache_latents / load_workdir_generator, init_from's reader, and export all find the VAE.
    vae = stages.trained_vae(exp, workdir, make_mesh(exp.mesh.sizes))
    assert isinstance(vae, CausalVAE)
    ema = restore_params(os.path.join(workdir, "vae"), nnx.eval_shape(lambda: CausalVAE(vcfg, rngs=nnx.Rngs(0))),
                         use_ema=True)
    for a, b in zip(jax.tree.leaves(nnx.state(vae)), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mean, _ = jax.jit(lambda v: nnx.merge(nnx.graphdef(vae), v).encode_streaming(_video(6, (2, 9, 32, 32, 3))))(
        nnx.state(vae))
    assert mean.shape == (2, *vcfg.latent_shape(9, 32, 32), vcfg.z_dim) and np.isfinite(np.asarray(mean)).all()
    summary = export_checkpoint(os.path.join(workdir, "vae"), str(tmp_path / "export"), ema=True)
    assert summary["components"]["vae"]["bytes"] > 0
