"""Parity with PyTorch (torch marker): random tiny diffusers models imported through the maps match their
klingjax forward passes, a klingjax -> diffusers -> klingjax round trip through `from_pretrained` /
`save_pretrained` is bit-exact, and a trained runlocal demo exported as a WanPipeline samples the same video."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.export import dit_map, vae_map
from klingjax.export.importer import load_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch


def _randomised(model, scale=0.1):
    """Perturb every parameter (norm scales and gammas too) so that each one matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_dit_forward_matches_diffusers(tmp_path):
    from klingjax.models.conditions import Conditions
    from klingjax.models.dit import dit_config

    cfg = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=24)
    kw = {k: v for k, v in dit_map.dit_to_diffusers_config(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = _randomised(diffusers.WanTransformer3DModel(**kw))
    folder = _save(ref, str(tmp_path / "transformer"))
    model = load_params(folder, dit_map.dit_entries(cfg), dit_map.abstract_dit(cfg), "the DiT")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 8, 4, 4)).astype(np.float32)
    t, text = np.array([50.0, 900.0], np.float32), rng.standard_normal((2, 6, 24)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(text),
                   return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    with jax.default_matmul_precision("highest"):
        got = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(latents), jnp.asarray(t), Conditions(jnp.asarray(text)))
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"DiT max abs diff {diff:.2e} (|ref| max {np.abs(want).max():.2f})")
    assert diff <= 1e-4


def test_vae_encode_decode_match_diffusers(tmp_path):
    from klingjax.models.vae import VAE_VARIANTS

    cfg = VAE_VARIANTS["tiny"]
    kw = {k: v for k, v in vae_map.vae_to_diffusers_config(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = _randomised(diffusers.AutoencoderKLWan(**{**kw, "attn_scales": []}))
    folder = _save(ref, str(tmp_path / "vae"))
    model = load_params(folder, vae_map.vae_entries(cfg), vae_map.abstract_vae(cfg), "the VAE")
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    z = rng.standard_normal((1, 3, 4, 4, cfg.z_dim)).astype(np.float32)
    to_t = lambda x: torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        want_mean = ref.encode(to_t(video)).latent_dist.mean.permute(0, 2, 3, 4, 1).numpy()
        want_video = ref.decode(to_t(z)).sample.permute(0, 2, 3, 4, 1).numpy()
    with jax.default_matmul_precision("highest"):
        got_mean = nnx.jit(lambda m, x: m.encode(x)[0])(model, jnp.asarray(video))
        got_video = nnx.jit(lambda m, z: m.decode_streaming(z))(model, jnp.asarray(z))
    d_enc = float(np.abs(np.asarray(got_mean) - want_mean).max())
    d_dec = float(np.abs(np.asarray(got_video) - want_video).max())
    print(f"VAE max abs diff: encode {d_enc:.2e}, decode {d_dec:.2e}")
    assert d_enc <= 1e-4 and d_dec <= 1e-4


def test_round_trip_through_diffusers_is_bit_exact(fake_workdir, tmp_path):
    from klingjax import layout
    from klingjax.export.export import export_checkpoint
    from klingjax.export.importer import import_diffusers
    from klingjax.layout import load_workdir_config
    from klingjax.train.checkpoint import restore_params

    workdir, saved = fake_workdir
    export_checkpoint(workdir, str(tmp_path / "exported"), ema=True)
    resaved = tmp_path / "resaved"  # loaded and saved again by diffusers itself
    diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "exported" / "transformer")).save_pretrained(
        str(resaved / "transformer"), safe_serialization=True)
    diffusers.AutoencoderKLWan.from_pretrained(str(tmp_path / "exported" / "vae")).save_pretrained(
        str(resaved / "vae"), safe_serialization=True)
    import_diffusers(str(resaved), str(tmp_path / "imported"))
    exp = load_workdir_config(workdir)
    models = {"dit": dit_map.abstract_dit(layout.dit_model_config(exp, 384)),
              "vae": vae_map.abstract_vae(layout.vae_config(exp))}
    for stage, model in models.items():
        got = restore_params(str(tmp_path / "imported" / stage), model)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got,
                     saved[stage][6]["ema"])


# ---------------------------------------------------------------------------------------------------------
# Whole pipeline from a trained runlocal demo
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    from experiments import demo
    from klingjax.config import to_experiment
    from klingjax.experiment import run_experiment

    c = demo.get_config("runlocal")
    c.vae.steps = c.dit.steps = 2
    c.vae.checkpoint_every = c.dit.checkpoint_every = 2
    c.data.num_train, c.data.num_eval = 16, 4
    c.stages = ("data", "vae", "cache", "dit")
    workdir = str(tmp_path_factory.mktemp("demo"))
    run_experiment(to_experiment(c), workdir)
    return workdir


def test_exported_pipeline_samples_the_same_video(trained_demo, tmp_path):
    from klingjax import layout
    from klingjax.diffusion import samplers
    from klingjax.diffusion.guidance import guided_velocity
    from klingjax.export.checkpoint_source import OrbaxLeaves, find_checkpoints, load_model
    from klingjax.export.export import export_checkpoint
    from klingjax.export.verify import use_klingjax_schedule
    from klingjax.layout import load_workdir_config
    from klingjax.models.conditions import Conditions
    from klingjax.models.text_encoders import load_minilm

    out = str(tmp_path / "pipeline")
    export_checkpoint(trained_demo, out, ema=True)
    pipe = use_klingjax_schedule(diffusers.DiffusionPipeline.from_pretrained(out))
    assert type(pipe).__name__ == "WanPipeline"
    sampling = json.load(open(os.path.join(out, "klingjax_export.json")))["sampling"]

    exp = load_workdir_config(trained_demo)
    t, h, w, c = layout.latent_grid(exp)
    steps, cfg_scale, shift = 4, sampling["guidance_scale"], sampling["shift"]
    encoder = load_minilm()
    ctx, mask = encoder.encode(["a red circle moves left", ""], exp.text_max_len)  # prompt, negative prompt
    ctx, mask = np.asarray(ctx), np.asarray(mask)
    noise = np.asarray(jax.random.normal(jax.random.key(3), (1, t, h, w, c)))

    # klingjax: the EMA DiT with masked cross-attention, its Euler sampler, then the streaming VAE decode.
    _, (dit_ck, vae_ck) = find_checkpoints(trained_demo)
    dit = load_model(OrbaxLeaves(dit_ck.state_dir), "ema",
                     dit_map.abstract_dit(layout.dit_model_config(exp, ctx.shape[-1])))
    vae = load_model(OrbaxLeaves(vae_ck.state_dir), "ema", vae_map.abstract_vae(layout.vae_config(exp)))
    mean, std = layout.load_latent_stats(trained_demo)

    (dit_def, dit_state), (vae_def, vae_state) = nnx.split(dit), nnx.split(vae)

    @jax.jit
    def klingjax_video(dit_state, vae_state, noise):
        def velocity(x, tt, dit_state):  # params ride in the sampler's carry, as in eval/generate.py
            cond, uncond = (Conditions(jnp.asarray(ctx[i:i + 1]), jnp.asarray(mask[i:i + 1])) for i in (0, 1))
            return guided_velocity(nnx.merge(dit_def, dit_state), x, jnp.full((1,), tt * 1000.0), cond, uncond,
                                   cfg_scale)

        z = samplers.sample(velocity, noise, num_steps=steps, sampler=samplers.Sampler.EULER, shift=shift,
                            args=(dit_state,))
        return nnx.merge(vae_def, vae_state).decode_streaming(z * std + mean)

    with jax.default_matmul_precision("highest"):
        want = (np.asarray(klingjax_video(dit_state, vae_state, jnp.asarray(noise))) + 1.0) / 2.0  # [0, 1]

    # diffusers: the same noise and text embeddings (each trimmed to its real tokens: Wan attends to all given).
    embeds = [torch.from_numpy(ctx[i : i + 1, : int(mask[i].sum())]) for i in range(2)]
    with torch.no_grad():
        video = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=cfg_scale,
                     latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3), num_inference_steps=steps,
                     num_frames=want.shape[1], height=want.shape[2], width=want.shape[3], output_type="np").frames
    video = np.asarray(video)
    assert video.shape == want.shape
    diff = float(np.abs(video - want).max())
    print(f"pipeline video max abs diff {diff:.2e} (pixel range [0, 1], {steps} Euler steps, CFG {cfg_scale})")
    assert diff <= 1e-4
