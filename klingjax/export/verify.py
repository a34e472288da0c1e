"""Parity of an export: diffusers/transformers (PyTorch, CPU) vs klingjax on the same random inputs.

Needs the torch extra (`pip install -e ".[torch]"`). The klingjax side reads the params from the source
checkpoint named in `klingjax_export.json`, the torch side loads the exported folder with `from_pretrained`,
so the check covers the map, the layouts, the configs and the file format together.

Also here: `use_klingjax_schedule(pipe)`. diffusers' FlowMatchEulerDiscreteScheduler, left to itself, spaces
sigmas as shift(linspace(1, shift(1/1000), N)); klingjax's sampler uses shift(linspace(1, 0, N + 1)). The
scheduler computes exactly klingjax's grid when given `sigmas=linspace(1, 0, N + 1)[:-1]`, which WanPipeline
does not pass; this helper makes it do so.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.export import dit_map, vae_map
from klingjax.export.checkpoint_source import OrbaxLeaves, find_checkpoints, load_model
from klingjax.layout import load_workdir_config
from klingjax.models.conditions import Conditions, MaskedVideo
from klingjax.models.dit import DiTConfig
from klingjax.models.dit_inputs import channel_condition, given_tokens

TORCH_HINT = 'pip install -e ".[torch]"   (torch==2.13.0 CPU build, diffusers, transformers, safetensors)'
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}  # relative to the output's max magnitude


def require_torch():
    """Import torch and diffusers, or raise ImportError with the install command."""
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"verification runs PyTorch/diffusers, which are not installed ({e}). "
                          f"Install the torch extra: {TORCH_HINT}") from None
    return torch


def klingjax_sigmas(num_steps: int) -> np.ndarray:
    """Unshifted sigmas that make FlowMatchEulerDiscreteScheduler(shift=s) reproduce klingjax's Euler grid."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


def use_klingjax_schedule(pipe):
    """Make `pipe.scheduler.set_timesteps(N)` produce klingjax's shifted linspace(1, 0, N + 1) grid; returns pipe."""
    scheduler = pipe.scheduler
    original = type(scheduler).set_timesteps

    @functools.wraps(original)
    def set_timesteps(num_inference_steps=None, device=None, **kwargs):
        if kwargs.get("sigmas") is None and kwargs.get("timesteps") is None and num_inference_steps is not None:
            kwargs["sigmas"] = klingjax_sigmas(num_inference_steps)
            num_inference_steps = None
        return original(scheduler, num_inference_steps, device, **kwargs)

    scheduler.set_timesteps = set_timesteps
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Per-component checks
# ---------------------------------------------------------------------------------------------------------


def _result(got: np.ndarray, want: np.ndarray, dtype: str) -> dict:
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    scale = float(np.max(np.abs(want))) or 1.0
    return {"max_abs_diff": diff, "max_abs_ref": scale, "tolerance": TOLERANCE[dtype] * max(scale, 1.0)}


def diffusers_inputs(cfg: DiTConfig, latents: np.ndarray, t: np.ndarray, given: np.ndarray | None = None,
                     given_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `WanTransformer3DModel` inputs equal to klingjax's `dit(latents, t, Conditions(..., given, given_mask))`.

    latents (B, t, h, w, C), t (B,), given (B, t, h, w, C), given_mask (B, t, h, w) -> (hidden states
    (B, t, h, w, C') channels-last, timestep). PER_TOKEN_TIMESTEPS: timestep (B, N) is t at generated tokens and 0 at
    given ones (Wan 2.2 TI2V's mask * t). CHANNEL_CONCAT: C' = C + 4 + C = [latents, mask x 4, given * mask], the
    klingjax condition (zeros where nothing is given), not what WanImageToVideoPipeline builds (see dit_map).
    """
    mode = cfg.conditions.masked_video
    if given_mask is None or mode is MaskedVideo.OFF:
        return latents, t
    if mode is MaskedVideo.PER_TOKEN_TIMESTEPS:
        tokens = np.asarray(given_tokens(jnp.asarray(given_mask), cfg.patch_size))[..., 0]  # (B, N)
        return latents, np.where(tokens, 0.0, t[:, None]).astype(t.dtype)
    cond = np.asarray(channel_condition(jnp.asarray(given), jnp.asarray(given_mask), jnp.asarray(latents)))
    mask = np.repeat(cond[..., -1:], dit_map.MASK_CHANNELS, axis=-1)  # (B, t, h, w, 4): all 4 channels equal
    return np.concatenate([latents, mask, cond[..., :-1]], axis=-1), t  # (B, t, h, w, 2C + 4)


def check_transformer(torch, model, folder: str, dtype: str, seed: int = 0) -> dict:
    """Velocity of WanDiT `model` vs WanTransformer3DModel from `folder` on random latents, t and text (masked-video
    DiTs: and random given latents on the first latent frame, fed to diffusers by `diffusers_inputs`)."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(folder).float().eval()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    pt, ph, pw = cfg.patch_size
    latents = rng.standard_normal((1, 2 * pt, 4 * ph, 4 * pw, cfg.in_channels)).astype(np.float32)
    t = np.array([637.0], np.float32)
    text = rng.standard_normal((1, 7, cfg.text_dim)).astype(np.float32)
    given = mask = None
    if cfg.conditions.masked_video is not MaskedVideo.OFF:
        given = rng.standard_normal(latents.shape).astype(np.float32)
        mask = np.zeros(latents.shape[:4], bool)
        mask[:, :pt] = True  # image-to-video: the first latent frame (a whole patch deep) is given
    x, ts = diffusers_inputs(cfg, latents, t, given, mask)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(ts), torch.from_numpy(text),
                   return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    cond = Conditions(jnp.asarray(text), given=None if given is None else jnp.asarray(given),
                      given_mask=None if mask is None else jnp.asarray(mask))
    with jax.default_matmul_precision("highest"):
        got = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(latents), jnp.asarray(t), cond)
    return _result(np.asarray(got), want, dtype)


def check_vae(torch, model, folder: str, dtype: str, seed: int = 0) -> dict[str, dict]:
    """CausalVAE `model` vs AutoencoderKLWan from `folder`: posterior mean of a random clip, decode of random z."""
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan.from_pretrained(folder).float().eval()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    s = cfg.spatial_factor
    video = rng.uniform(-1, 1, (1, 1 + cfg.temporal_factor, 4 * s, 4 * s, cfg.in_channels)).astype(np.float32)
    z = rng.standard_normal((1, 2, 4, 4, cfg.z_dim)).astype(np.float32)
    to_torch = lambda x: torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        want_mean = ref.encode(to_torch(video)).latent_dist.mean.permute(0, 2, 3, 4, 1).numpy()
        want_video = ref.decode(to_torch(z)).sample.permute(0, 2, 3, 4, 1).numpy()
    with jax.default_matmul_precision("highest"):
        got_mean = nnx.jit(lambda m, x: m.encode(x)[0])(model, jnp.asarray(video))
        got_video = nnx.jit(lambda m, z: m.decode(z))(model, jnp.asarray(z))
    return {"vae.encode": _result(np.asarray(got_mean), want_mean, dtype),
            "vae.decode": _result(np.asarray(got_video), want_video, dtype)}


def check_text_encoder(torch, folder: str, text_max_len: int) -> dict:
    """Hidden states of transformers' BertModel from `folder` vs klingjax's MiniLM on real captions."""
    from transformers import BertModel

    from klingjax.models.text_encoders import load_minilm

    encoder = load_minilm()
    ref = BertModel.from_pretrained(folder).float().eval()
    ids, mask = encoder.tokenize(["a red circle moves left", "a small blue square drifts up slowly"], text_max_len)
    got = np.asarray(encoder.encode_tokens(ids, mask))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))).last_hidden_state
    want = want.numpy() * mask[..., None]  # klingjax zeroes padded positions
    return _result(got, want, "float32")


def verify_export(out: str) -> dict[str, dict]:
    """Max abs diff per component of the export in `out` against its source checkpoint."""
    torch = require_torch()
    torch.manual_seed(0)
    with open(os.path.join(out, "klingjax_export.json")) as f:
        summary = json.load(f)
    workdir = summary["source"]
    exp = load_workdir_config(workdir)
    prefix, dtype = summary["params"], summary["dtype"]
    report: dict[str, dict] = {}
    for stage, step in summary["steps"].items():
        _, (ckpt,) = find_checkpoints(os.path.join(workdir, stage), step)
        leaves = OrbaxLeaves(ckpt.state_dir)
        if stage in ("dit", "distill"):  # a distilled (trajectory) student is a Wan DiT too
            from klingjax.layout import dit_model_config

            cfg = dit_model_config(exp, summary["components"]["transformer"]["text_dim"])
            model = load_model(leaves, prefix, dit_map.abstract_dit(cfg))
            report["transformer"] = check_transformer(torch, model, os.path.join(out, "transformer"), dtype)
        else:
            from klingjax.layout import vae_config

            model = load_model(leaves, prefix, vae_map.abstract_vae(vae_config(exp)))
            report.update(check_vae(torch, model, os.path.join(out, "vae"), dtype))
    if summary["components"].get("text_encoder"):
        report["text_encoder"] = check_text_encoder(torch, os.path.join(out, "text_encoder"), exp.text_max_len)
    return report


def format_report(report: dict[str, dict]) -> str:
    """One line per component: max abs diff, reference magnitude, tolerance, OK/FAIL."""
    lines = []
    for name, r in report.items():
        verdict = "OK" if r["max_abs_diff"] <= r["tolerance"] else "FAIL"
        lines.append(f"  {name:<14} max_abs_diff={r['max_abs_diff']:.3e}  (|ref| max {r['max_abs_ref']:.3g}, "
                     f"tolerance {r['tolerance']:.1e})  {verdict}")
    return "\n".join(lines)
