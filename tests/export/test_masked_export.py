"""Export / import of masked-video DiTs: PER_TOKEN_TIMESTEPS <-> WanImageToVideoPipeline(expand_timesteps=True),
CHANNEL_CONCAT <-> a Wan I2V-format transformer (in_channels = C + 4 + C). Fast tests check the patch-kernel
fusion, the maps, configs, folders and bit-exact round trips with numpy; the torch-marked ones check an exported
PER_TOKEN_TIMESTEPS model samples the same image-to-video clip through diffusers' pipeline as through klingjax, and
CHANNEL_CONCAT transformer-level parity (pipeline-level outputs differ by design, see dit_map)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from export_fixtures import TEXT_DIM, make_workdir
from flax import nnx

from klingjax import layout
from klingjax.export import dit_map
from klingjax.export.export import export_checkpoint
from klingjax.export.importer import import_diffusers, load_params
from klingjax.export.param_map import from_torch, param_shapes, to_torch
from klingjax.layout import load_workdir_config
from klingjax.models.conditions import ConditionSpec, MaskedVideo
from klingjax.models.dit import dit_config
from klingjax.train.checkpoint import restore_params

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "diffusers_state_dict_shapes.json")))
C = 4
DIT = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=C, out_channels=C, text_dim=24)
MODES = [MaskedVideo.PER_TOKEN_TIMESTEPS, MaskedVideo.CHANNEL_CONCAT]


def _with(mode: MaskedVideo, cfg=DIT):
    return dataclasses.replace(cfg, conditions=ConditionSpec(masked_video=mode))


def _random_params(cfg, seed=0) -> dict[tuple[str, ...], np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = param_shapes(dit_map.abstract_dit(cfg))
    return {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------------
# Maps and configs (numpy only)
# ---------------------------------------------------------------------------------------------------------


def test_channel_concat_patch_kernel_in_wan_i2v_channel_order():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((1, 2, 2, C, 8)).astype(np.float32)
    cond = rng.standard_normal((1, 2, 2, C + 1, 8)).astype(np.float32)  # [given * mask (C), mask (1)]
    fused = dit_map.fuse_patch_kernel(kernel, cond)
    assert fused.shape == (1, 2, 2, 2 * C + 4, 8)
    np.testing.assert_array_equal(fused[..., :C, :], kernel)  # noisy latents
    np.testing.assert_array_equal(fused[..., C:C + 3, :], 0.0)  # mask rows 0..2
    np.testing.assert_array_equal(fused[..., C + 3, :], cond[..., C, :])  # mask row 3 = ours
    np.testing.assert_array_equal(fused[..., C + 4:, :], cond[..., :C, :])  # condition latents
    back = dit_map.split_patch_kernel(fused)
    np.testing.assert_array_equal(back[0], kernel)
    np.testing.assert_array_equal(back[1], cond)
    # One patch's projection: diffusers' input [x, m, m, m, m, g] equals ours [x] + [g, m] whenever the 4 mask
    # channels are equal, both for our fused kernel and for a Wan kernel (4 different mask rows) split into ours.
    x, g, m = rng.standard_normal((1, 2, 2, C)), rng.standard_normal((1, 2, 2, C)), rng.uniform(size=(1, 2, 2, 1))
    wan_in = np.concatenate([x, np.repeat(m, 4, -1), g], -1)
    wan = rng.standard_normal(fused.shape)
    for w in (fused, wan):
        k, ck = dit_map.split_patch_kernel(w)
        want = np.einsum("xyzc,xyzcd->d", wan_in, w)
        got = np.einsum("xyzc,xyzcd->d", x, k) + np.einsum("xyzc,xyzcd->d", np.concatenate([g, m], -1), ck)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_map_round_trip_is_bit_exact_with_diffusers_names_and_shapes(mode):
    cfg = _with(mode)
    entries = dit_map.dit_entries(cfg)
    golden = dict(GOLDEN["WanTransformer3DModel"])
    if mode is MaskedVideo.CHANNEL_CONCAT:  # Wan I2V: the patch Conv3d reads C + 4 + C channels
        golden["patch_embedding.weight"] = [32, 2 * C + 4, 1, 2, 2]
    assert {e.name: list(e.torch_shape) for e in entries} == golden
    params = _random_params(cfg)
    layout_params = dit_map.to_diffusers_params(cfg, params)
    torch_sd = {e.name: to_torch(layout_params[e.path] if e.layer is None else layout_params[e.path][e.layer],
                                 e.layout) for e in entries}
    back: dict[tuple[str, ...], list] = {}
    for e in entries:
        back.setdefault(e.path, []).append(from_torch(torch_sd[e.name], e.layout))
    back = {p: np.stack(v) if p[0] == "blocks" else v[0] for p, v in back.items()}
    got = dit_map.from_diffusers_params(cfg, back)
    assert got.keys() == params.keys()
    for p in params:
        np.testing.assert_array_equal(got[p], params[p], err_msg=".".join(p))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_configs_translate_both_ways(mode):
    cfg = _with(mode)
    pipeline = dit_map.check_pipeline(cfg)
    index = {"_class_name": pipeline.class_name, "expand_timesteps": pipeline.expand_timesteps}
    config = dit_map.dit_to_diffusers_config(cfg)
    assert config["in_channels"] == (2 * C + 4 if mode is MaskedVideo.CHANNEL_CONCAT else C)
    back = dit_map.dit_from_diffusers_config(config, index)
    assert back == dataclasses.replace(cfg, scan_layers=back.scan_layers)
    assert dit_map.dit_from_diffusers_config(dit_map.dit_to_diffusers_config(DIT), {"_class_name": "WanPipeline"}) \
        .conditions == ConditionSpec()


@pytest.mark.parametrize("config, index, match", [
    ({"in_channels": 9, "out_channels": 4}, None, "'in_channels'=9 with 'out_channels'=4"),
    ({"in_channels": 4, "out_channels": 4}, {"_class_name": "WanVACEPipeline"}, "'_class_name' is 'WanVACEPipeline'"),
    ({"in_channels": 4, "out_channels": 4}, {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9},
     "'boundary_ratio'"),
    ({"in_channels": 12, "out_channels": 4}, {"_class_name": "WanImageToVideoPipeline", "expand_timesteps": True},
     "'in_channels'=12 .* 'expand_timesteps'=true"),
    ({"in_channels": 36, "out_channels": 16, "image_dim": 1280}, None, "image_dim"),  # Wan 2.1 I2V with CLIP
])
def test_unknown_layouts_fail_naming_the_key(config, index, match):
    with pytest.raises(dit_map.UnsupportedConfigError, match=match):
        dit_map.dit_from_diffusers_config(config, index)


def test_per_token_pipeline_needs_wans_patch():
    cfg = _with(MaskedVideo.PER_TOKEN_TIMESTEPS, dataclasses.replace(DIT, patch_size=(1, 1, 1)))
    with pytest.raises(dit_map.UnsupportedConfigError, match=r"one timestep per \(1, 2, 2\) patch"):
        dit_map.check_pipeline(cfg)
    assert dit_map.check_pipeline(_with(MaskedVideo.CHANNEL_CONCAT, cfg)).class_name == "WanImageToVideoPipeline"


# ---------------------------------------------------------------------------------------------------------
# Workdir -> diffusers folder -> workdir
# ---------------------------------------------------------------------------------------------------------


def _leaf(state, *path):
    for p in path:
        state = state[p]
    return np.asarray(state.get_value() if isinstance(state, nnx.Variable) else state)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_export_import_round_trip_of_a_masked_workdir(mode, tmp_path):
    from safetensors.numpy import load_file

    workdir, saved = make_workdir(str(tmp_path / "workdir"), steps=(2,), masked_video=mode.value)
    out = tmp_path / "exported"
    summary = export_checkpoint(workdir, str(out))
    assert summary["components"]["transformer"]["masked_video"] == mode.value
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["expand_timesteps"] is (mode is MaskedVideo.PER_TOKEN_TIMESTEPS)
    assert index["image_encoder"] == index["image_processor"] == [None, None]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] is None
    exp = load_workdir_config(workdir)
    c = layout.vae_config(exp).z_dim
    config = json.load(open(out / "transformer" / "config.json"))
    assert (config["in_channels"], config["out_channels"], config["image_dim"]) == (
        2 * c + 4 if mode is MaskedVideo.CHANNEL_CONCAT else c, c, None)
    weight = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))["patch_embedding.weight"]
    model = saved["dit"][2]["model"]
    kernel = _leaf(model, "patch_embedding", "kernel")
    if mode is MaskedVideo.CHANNEL_CONCAT:
        kernel = dit_map.fuse_patch_kernel(kernel, _leaf(model, "patch_embedding", "cond_kernel"))
    np.testing.assert_array_equal(weight, kernel.transpose(4, 3, 0, 1, 2))

    result = import_diffusers(str(out), str(tmp_path / "imported"))
    assert result["dit"].conditions.masked_video is mode
    imported = load_workdir_config(str(tmp_path / "imported"))
    cfg = layout.dit_model_config(imported, TEXT_DIM)
    assert cfg.conditions.masked_video is mode and cfg == layout.dit_model_config(exp, TEXT_DIM)
    got = restore_params(str(tmp_path / "imported" / "dit"), dit_map.abstract_dit(cfg))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, model)
    again = tmp_path / "again"
    export_checkpoint(str(tmp_path / "imported"), str(again))
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (out / name).read_bytes() == (again / name).read_bytes()
    assert json.load(open(again / "model_index.json")) == index


# ---------------------------------------------------------------------------------------------------------
# Parity with PyTorch
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
def test_channel_concat_transformer_matches_diffusers(torch, tmp_path):
    """A random Wan I2V-format diffusers transformer imported as CHANNEL_CONCAT: same outputs on inputs built the
    klingjax way (`verify.diffusers_inputs`: [latents, mask x 4, given * mask]) for a first-frame mask."""
    diffusers = pytest.importorskip("diffusers")
    from klingjax.export.verify import diffusers_inputs
    from klingjax.models.conditions import Conditions

    cfg = _with(MaskedVideo.CHANNEL_CONCAT)
    kw = {k: v for k, v in dit_map.dit_to_diffusers_config(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**kw)
    with torch.no_grad():
        for p in ref.parameters():  # every parameter matters, the patch kernel's 4 mask rows all differ
            p.add_(torch.randn_like(p) * 0.1)
    ref.eval().save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    layout_model = load_params(str(tmp_path / "transformer"), dit_map.dit_entries(cfg),
                               dit_map.abstract_dit(dit_map.diffusers_layout(cfg)), "the DiT")
    model = dit_map.from_diffusers_layout(layout_model, cfg)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 8, 4, C)).astype(np.float32)
    given = rng.standard_normal(latents.shape).astype(np.float32)
    mask = np.zeros(latents.shape[:4], bool)
    mask[:, 0] = True
    mask[1, 2, :4] = True  # and a box: any mask, as long as the 4 mask channels are equal
    t, text = np.array([50.0, 900.0], np.float32), rng.standard_normal((2, 6, 24)).astype(np.float32)
    x, ts = diffusers_inputs(cfg, latents, t, given, mask)
    assert x.shape == (2, 3, 8, 4, 2 * C + 4)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(ts), torch.from_numpy(text),
                   return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    cond = Conditions(jnp.asarray(text), given=jnp.asarray(given), given_mask=jnp.asarray(mask))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(latents), jnp.asarray(t), cond))
    diff = float(np.abs(got - want).max())
    print(f"channel-concat DiT max abs diff {diff:.2e} (|ref| max {np.abs(want).max():.2f})")
    assert diff <= 1e-4
    # The given latents matter (the check is not blind to the condition channels).
    bare = Conditions(jnp.asarray(text), given=jnp.zeros_like(cond.given), given_mask=cond.given_mask)
    assert float(np.abs(np.asarray(model(jnp.asarray(latents), jnp.asarray(t), bare)) - got).max()) > 1e-2


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_masked_export_verifies_and_runs_in_the_i2v_pipeline(torch, mode, tmp_path):
    """`klingjax-export --verify` on a perturbed masked-video workdir passes (transformer with a given first frame,
    VAE), and the folder loads as a WanImageToVideoPipeline that samples a clip of the right shape."""
    diffusers = pytest.importorskip("diffusers")
    from klingjax.export.verify import format_report, verify_export

    workdir, _ = make_workdir(str(tmp_path / "workdir"), steps=(1,), masked_video=mode.value, perturb=0.1)
    out = str(tmp_path / "out")
    export_checkpoint(workdir, out)
    report = verify_export(out)
    print(format_report(report))
    assert {"transformer", "vae.encode", "vae.decode"} <= set(report)
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in report.values()), report

    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    assert pipe.config.expand_timesteps is (mode is MaskedVideo.PER_TOKEN_TIMESTEPS)
    exp = load_workdir_config(workdir)
    t, h, w, c = layout.latent_grid(exp)
    with torch.no_grad():
        z = pipe(image=torch.rand(1, 3, exp.data.height, exp.data.width), prompt_embeds=torch.randn(1, 5, TEXT_DIM),
                 negative_prompt_embeds=torch.randn(1, 5, TEXT_DIM), num_inference_steps=2,
                 num_frames=exp.data.num_frames, height=exp.data.height, width=exp.data.width,
                 output_type="latent").frames
    assert tuple(z.shape) == (1, c, t, h, w) and bool(torch.isfinite(z).all())


@pytest.mark.torch
def test_per_token_export_samples_the_same_image_to_video_clip(torch, tmp_path):
    """PER_TOKEN_TIMESTEPS: WanImageToVideoPipeline(expand_timesteps=True) on the export vs klingjax's masked sampler
    (given = the VAE encoding of the image alone as latent frame 0, normalised), same noise, sigmas and CFG."""
    diffusers = pytest.importorskip("diffusers")
    from klingjax.diffusion import masked, samplers
    from klingjax.diffusion.guidance import guided_velocity
    from klingjax.export import vae_map
    from klingjax.export.checkpoint_source import OrbaxLeaves, find_checkpoints, load_model
    from klingjax.export.verify import use_klingjax_schedule
    from klingjax.models.conditions import Conditions

    workdir, _ = make_workdir(str(tmp_path / "workdir"), steps=(1,), masked_video="per_token_timesteps", perturb=0.1)
    out = str(tmp_path / "pipeline")
    export_checkpoint(workdir, out, ema=True)
    pipe = use_klingjax_schedule(diffusers.DiffusionPipeline.from_pretrained(out))
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.expand_timesteps
    assert pipe.image_encoder is None and pipe.transformer.config.image_dim is None
    sampling = json.load(open(os.path.join(out, "klingjax_export.json")))["sampling"]

    exp = load_workdir_config(workdir)
    t, h, w, c = layout.latent_grid(exp)
    frames, height, width = exp.data.num_frames, exp.data.height, exp.data.width
    steps, cfg_scale, shift = 3, sampling["guidance_scale"], sampling["shift"]
    assert cfg_scale > 1  # both guidance branches run
    rng = np.random.default_rng(0)
    text = rng.standard_normal((2, 5, TEXT_DIM)).astype(np.float32)  # prompt, negative prompt (all tokens real)
    image = rng.uniform(0, 1, (1, height, width, 3)).astype(np.float32)  # [0, 1], as the pipeline takes it
    noise = np.array(jax.random.normal(jax.random.key(3), (1, t, h, w, c)))  # a writable copy for torch

    _, (dit_ck, vae_ck) = find_checkpoints(workdir)
    dit = load_model(OrbaxLeaves(dit_ck.state_dir), "ema", dit_map.abstract_dit(layout.dit_model_config(exp, TEXT_DIM)))
    vae = load_model(OrbaxLeaves(vae_ck.state_dir), "ema", vae_map.abstract_vae(layout.vae_config(exp)))
    mean, std = layout.load_latent_stats(workdir)
    (dit_def, dit_state), (vae_def, vae_state) = nnx.split(dit), nnx.split(vae)

    @jax.jit
    def klingjax_clip(dit_state, vae_state, noise, image):
        vae = nnx.merge(vae_def, vae_state)
        first = (vae.encode(image[:, None] * 2.0 - 1.0)[0] - mean) / std  # (1, 1, h, w, C): the image alone
        given = jnp.zeros_like(noise).at[:, :1].set(first)
        mask = jnp.zeros(noise.shape[:4], bool).at[:, 0].set(True)  # latent frame 0 given

        def velocity(x, tt, dit_state):
            cond, uncond = (Conditions(jnp.asarray(text[i:i + 1]), given=given, given_mask=mask) for i in (0, 1))
            return guided_velocity(nnx.merge(dit_def, dit_state), x, jnp.full((1,), tt * 1000.0), cond, uncond,
                                   cfg_scale)

        z = masked.sample_masked(velocity, noise, given, mask, num_steps=steps, sampler=samplers.Sampler.EULER,
                                 shift=shift, args=(dit_state,))
        return z, vae.decode_streaming(z * std + mean)

    with jax.default_matmul_precision("highest"):
        want_z, want_video = klingjax_clip(dit_state, vae_state, jnp.asarray(noise), jnp.asarray(image))
    want_z, want_video = np.asarray(want_z), (np.asarray(want_video) + 1.0) / 2.0  # video in [0, 1]

    kw = dict(image=torch.from_numpy(image).permute(0, 3, 1, 2), prompt_embeds=torch.from_numpy(text[:1]),
              negative_prompt_embeds=torch.from_numpy(text[1:]), guidance_scale=cfg_scale,
              num_inference_steps=steps, num_frames=frames, height=height, width=width)
    with torch.no_grad():
        z = pipe(latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3), output_type="latent", **kw).frames
        video = pipe(latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3), output_type="np", **kw).frames
    z, video = z.permute(0, 2, 3, 4, 1).numpy(), np.asarray(video)
    assert z.shape == want_z.shape and video.shape == want_video.shape
    d_first = float(np.abs(z[:, 0] - want_z[:, 0]).max())
    d_z, d_video = float(np.abs(z - want_z).max()), float(np.abs(video - want_video).max())
    print(f"i2v max abs diff: first latent frame {d_first:.2e}, latents {d_z:.2e} (|ref| max "
          f"{np.abs(want_z).max():.2f}), video {d_video:.2e} (pixel range [0, 1]; {steps} Euler steps, "
          f"CFG {cfg_scale})")
    assert d_first <= 1e-4 and d_z <= 1e-4 * max(1.0, float(np.abs(want_z).max())) and d_video <= 1e-4
    # The generated frames depend on the image (the check is not blind to the condition).
    with jax.default_matmul_precision("highest"):
        other_z, _ = klingjax_clip(dit_state, vae_state, jnp.asarray(noise), jnp.asarray(1.0 - image))
    assert float(np.abs(np.asarray(other_z)[:, 1:] - want_z[:, 1:]).max()) > 1e-2
