"""Experiment config schema: ml_collections.ConfigDict in, validated frozen dataclasses out.

`experiments/*.py` build a ConfigDict (`get_config(arg)`); `to_experiment(config)` validates it once,
before anything compiles, and returns an `ExperimentConfig`. Modules below this boundary only see the
frozen dataclasses. Every error names the dotted key at fault.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from klingjax.config_stages import (  # noqa: F401 - the stage sections are part of this module's API
    DiscConfig,
    DistillStageConfig,
    DiTStageConfig,
    OptimConfig,
    StageConfig,
    TrainableConfig,
    TrainableMode,
    VAELossConfig,
    VAEStageConfig,
)
from klingjax.data.synthetic.camera import MOVES as CAMERA_MOVES
from klingjax.data.synthetic.spec import MOTIONS
from klingjax.data.tasks import TASKS
from klingjax.diffusion.distill import DistillMethod
from klingjax.diffusion.samplers import Sampler
from klingjax.models.discriminator import DiscriminatorConfig
from klingjax.models.dit import DIT_VARIANTS, dit_config
from klingjax.models.lpips import LPIPS_MIN_SIZE
from klingjax.models.vae import VAE_VARIANTS, vae_config


class ConfigError(ValueError):
    """A config is invalid; the message names the key."""


STAGES = ("data", "vae", "cache", "dit", "distill", "eval")  # every stage, in the order they run
DEFAULT_STAGES = ("data", "vae", "cache", "dit", "eval")  # what an experiment runs unless it lists its stages


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes over ('data', 'fsdp', 'context', 'tensor'); one may be -1 (fill with the rest)."""

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.context, self.tensor)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The built-in synthetic dataset (written to ArrayRecord) and loader settings."""

    num_train: int = 2048
    num_eval: int = 64
    num_frames: int = 17
    height: int = 32
    width: int = 32
    num_shards: int = 4
    heldout_fraction: float = 0.1
    sprite_size: tuple[float, ...] = (6.0, 10.0)  # (min, max) sprite bbox width in px
    speed_range: tuple[float, ...] = (0.6, 1.0)  # (min, max) sprite speed in px / frame (clamped to stay in frame)
    worker_count: int = 0
    path: str = ""  # empty: <workdir>/data
    # Camera moves (klingjax/data/synthetic/camera.py): P(a clip has one), P(a second move of another kind), the moves
    # drawn from (() = all), and whether captions name them ("the camera zooms in": text-only camera control).
    p_camera_move: float = 0.0
    p_two_moves: float = 0.0
    camera_moves: tuple[str, ...] = ()
    camera_words: bool = True
    camera_world_texture: bool = False  # one fixed background texture per background colour (SyntheticSpec)
    motion: str = "straight"  # "straight" | "bounce": sprites reflect off the frame edges (long-video training)
    # Colours added to the synthetic palette, name -> (r, g, b) 0-255: a concept a base model never saw (fine-tuning).
    extra_colours: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling for periodic samples and evaluation."""

    sampler: Sampler = Sampler.EULER
    num_steps: int = 30
    cfg_scale: float = 4.0  # text guidance
    visual_cfg_scale: float = 1.0  # guidance of the visual (masked-video) condition; 1: none
    negative_prompt: str = ""
    shift: float = 0.0  # 0: same shift as training
    use_ema: bool = True
    num_samples: int = 8


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the trained pipeline on held-out captions."""

    num_clips: int = 64
    fvd: bool = True
    batch_size: int = 16
    concept: str = ""  # a colour / shape word: adherence also reported on the clips showing it and on the rest


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: which stages run, and their settings."""

    name: str = "experiment"
    seed: int = 0
    stages: tuple[str, ...] = DEFAULT_STAGES
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    text_max_len: int = 16
    text_encoder: str = "minilm"  # "minilm" (bundled) or a UMT5 folder (transformers layout / diffusers Wan root)
    vae: VAEStageConfig = VAEStageConfig()
    dit: DiTStageConfig = DiTStageConfig()
    distill: DistillStageConfig = DistillStageConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {[m.value for m in tp]}") from None
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a sequence, got {value!r}")
        return tuple(value)
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a section, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {sorted(names)})")
    kwargs = {name: _convert(hints[name], values[name], prefix + name) for name in names if name in values}
    return cls(**kwargs)


def to_experiment(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ExperimentConfig:
    """Validate a ConfigDict and freeze it into an ExperimentConfig (raises ConfigError naming the key)."""
    exp = _build(ExperimentConfig, config)
    for stage in exp.stages:
        if stage not in STAGES:
            raise ConfigError(f"config key 'stages': unknown stage {stage!r}; choose from {STAGES}")
    d = exp.data
    if d.num_frames < 1 or (d.num_frames - 1) % 4:
        raise ConfigError(f"config key 'data.num_frames': {d.num_frames} is not 1 + 4k")
    for key in ("p_camera_move", "p_two_moves"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ConfigError(f"config key 'data.{key}': a probability in [0, 1], got {getattr(d, key)}")
    if unknown := sorted(set(d.camera_moves) - set(CAMERA_MOVES)):
        raise ConfigError(f"config key 'data.camera_moves': unknown moves {unknown}; choose from {list(CAMERA_MOVES)}")
    for name, rgb in d.extra_colours.items():
        if not (isinstance(rgb, list | tuple) and len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                        for c in rgb)):
            raise ConfigError(f"config key 'data.extra_colours.{name}': expected (r, g, b) integers in 0-255, got "
                              f"{rgb!r}")
    if d.motion not in MOTIONS:
        raise ConfigError(f"config key 'data.motion': one of {MOTIONS}, got {d.motion!r}")
    for key in ("sprite_size", "speed_range"):
        lo_hi = getattr(d, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"config key 'data.{key}': expected (min, max) with 0 < min <= max, got {lo_hi}")
    for name in ("vae", "dit", "distill"):
        s: StageConfig = getattr(exp, name)
        for key in ("batch_size", "steps", "log_every", "checkpoint_every"):
            if getattr(s, key) <= 0:
                raise ConfigError(f"config key '{name}.{key}': must be positive, got {getattr(s, key)}")
        if s.num_frames and ((s.num_frames - 1) % 4 or s.num_frames > d.num_frames):
            raise ConfigError(f"config key '{name}.num_frames': {s.num_frames} must be 1 + 4k and <= data.num_frames")
        if s.optim.lr <= 0:
            raise ConfigError(f"config key '{name}.optim.lr': must be positive, got {s.optim.lr}")
        _check_guard(name, s)
        if name != "distill":
            _check_trainable(name, s)
    if not 0.0 <= exp.dit.caption_dropout < 1.0:
        raise ConfigError(f"config key 'dit.caption_dropout': must be in [0, 1), got {exp.dit.caption_dropout}")
    _check_vae_losses(exp)
    if exp.vae.from_workdir and "vae" in exp.stages:
        raise ConfigError("config key 'vae.from_workdir': the VAE comes from another work dir, so 'stages' must not "
                          "list 'vae'")
    _check_model_overrides(exp)
    _check_tasks(exp)
    _check_distill(exp)
    if exp.sample.num_steps < 1:
        raise ConfigError(f"config key 'sample.num_steps': must be >= 1, got {exp.sample.num_steps}")
    if exp.eval.fvd and exp.data.num_frames < 9:
        raise ConfigError("config key 'data.num_frames': FVD's I3D needs >= 9 frames (or set eval.fvd=False)")
    return exp


def _check_guard(name: str, s: StageConfig) -> None:
    """The step-guard keys of stage `name`."""
    if s.max_nonfinite_steps < 0:
        raise ConfigError(f"config key '{name}.max_nonfinite_steps': must be >= 0, got {s.max_nonfinite_steps}")
    if s.loss_spike_factor != 0 and not s.loss_spike_factor > 1:
        raise ConfigError(f"config key '{name}.loss_spike_factor': must be 0 (off) or > 1, got {s.loss_spike_factor}")
    if s.loss_spike_window < 1:
        raise ConfigError(f"config key '{name}.loss_spike_window': must be >= 1, got {s.loss_spike_window}")


FROZEN_DTYPES = ("float32", "bfloat16")


def _check_trainable(name: str, s: StageConfig) -> None:
    """The `trainable` keys of stage `name` (patterns matching nothing are caught when the model is built)."""
    t, key = s.trainable, f"{name}.trainable"
    if t.mode is TrainableMode.FULL:
        if t.params:
            raise ConfigError(f"config key '{key}.params': only read with mode subset or lora (mode is full)")
        return
    if not s.init_from:
        raise ConfigError(f"config key '{key}.mode': {t.mode.value} fine-tunes a trained model: set "
                          f"'{name}.init_from' to its stage directory")
    if t.mode is TrainableMode.SUBSET and not t.params:
        raise ConfigError(f"config key '{key}.params': mode subset needs at least one param pattern")
    if t.mode is TrainableMode.LORA:
        if name != "dit":
            raise ConfigError(f"config key '{key}.mode': LoRA is available for the DiT stage only (use subset)")
        if t.lora_rank < 1:
            raise ConfigError(f"config key '{key}.lora_rank': must be >= 1, got {t.lora_rank}")
        if t.lora_alpha < 0:
            raise ConfigError(f"config key '{key}.lora_alpha': must be >= 0, got {t.lora_alpha}")
        if not t.lora_targets:
            raise ConfigError(f"config key '{key}.lora_targets': LoRA needs at least one target pattern")
    for field in ("params", "lora_targets"):
        for pattern in getattr(t, field):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config key '{key}.{field}': {pattern!r} is not a regular expression: {e}") from None
    if t.frozen_dtype not in FROZEN_DTYPES:
        raise ConfigError(f"config key '{key}.frozen_dtype': {t.frozen_dtype!r} is not one of {FROZEN_DTYPES}")


def _check_vae_losses(exp: ExperimentConfig) -> None:
    """The VAE loss and discriminator keys: non-negative, and fitting the stage's clips."""
    v, d = exp.vae, exp.data
    for section, keys in (("loss", ("kl_weight", "mse_weight", "lpips_weight", "lpips_frames")),
                          ("disc", ("weight", "start", "lr"))):
        for key in keys:
            if (value := getattr(getattr(v, section), key)) < 0:
                raise ConfigError(f"config key 'vae.{section}.{key}': must be >= 0, got {value}")
    for key in ("dim", "layers"):
        if getattr(v.disc, key) < 1:
            raise ConfigError(f"config key 'vae.disc.{key}': must be >= 1, got {getattr(v.disc, key)}")
    frames = v.num_frames or d.num_frames
    if v.loss.lpips_frames > frames:
        raise ConfigError(f"config key 'vae.loss.lpips_frames': {v.loss.lpips_frames} is more than the {frames} "
                          "frames per clip")
    net = v.loss.lpips_net
    if v.loss.lpips_weight > 0 and min(d.height, d.width) < LPIPS_MIN_SIZE[net]:
        raise ConfigError(f"config key 'vae.loss.lpips_net': {net.value} LPIPS needs frames of at least "
                          f"{LPIPS_MIN_SIZE[net]}px, data is {d.height}x{d.width}")
    if v.disc.weight > 0:
        grid = DiscriminatorConfig(dim=v.disc.dim, num_layers=v.disc.layers).output_shape(frames, d.height, d.width)
        if min(grid) < 1:
            raise ConfigError(f"config key 'vae.disc.layers': {v.disc.layers} strided layers leave no patch of "
                              f"{d.height}x{d.width} frames; use fewer")


# The model config builders each stage calls later (`klingjax.layout`) and their variant tables, run once here so
# that a bad variant or override fails before any stage runs.
_MODELS = {"vae": (vae_config, VAE_VARIANTS), "dit": (dit_config, DIT_VARIANTS)}
def _check_tasks(exp: ExperimentConfig) -> None:
    """`dit.tasks` names tasks of the table with weights >= 0, and a model that reads given latents when any task
    other than t2v has weight."""
    d = exp.dit
    if unknown := sorted(set(d.tasks) - set(TASKS)):
        raise ConfigError(f"config key 'dit.tasks': unknown task(s) {unknown}; the task table has {sorted(TASKS)}")
    for name, w in d.tasks.items():
        if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"config key 'dit.tasks.{name}': a weight >= 0, got {w!r}")
    if d.tasks and not any(w > 0 for w in d.tasks.values()):
        raise ConfigError("config key 'dit.tasks': every weight is 0 (leave it empty for text-to-video only)")
    if not 0.0 <= d.visual_dropout < 1.0:
        raise ConfigError(f"config key 'dit.visual_dropout': must be in [0, 1), got {d.visual_dropout}")
    visual = [n for n, w in d.tasks.items() if w > 0 and n != "t2v"]
    mode = dict(d.model_overrides.get("conditions", {}) or {}).get("masked_video", "off")
    if not 0.0 <= d.context_noise < 1.0:
        raise ConfigError(f"config key 'dit.context_noise': must be in [0, 1), got {d.context_noise}")
    if d.context_noise > 0 and getattr(mode, "value", mode) != "per_token_timesteps":
        raise ConfigError("config key 'dit.context_noise': noisy given latents need "
                          "'dit.model_overrides.conditions.masked_video' = 'per_token_timesteps' (the given tokens' "
                          f"timestep carries their noise level), got {getattr(mode, 'value', mode)!r}")
    if visual and getattr(mode, "value", mode) == "off":
        raise ConfigError(f"config key 'dit.tasks': {sorted(visual)} give latents to the model, but "
                          "'dit.model_overrides.conditions.masked_video' is off: set it to 'per_token_timesteps' or "
                          "'channel_concat'")


def _check_distill(exp: ExperimentConfig) -> None:
    """The distill stage's keys (klingjax/train/distill.py), and samplers only a student can use."""
    d, key = exp.distill, "distill"
    if exp.sample.sampler is Sampler.FLOW_MAP:
        raise ConfigError("config key 'sample.sampler': flow_map is the sampler of mean_flow students, which choose "
                          "it themselves (klingjax-generate --student); a teacher samples with euler, heun, dpmpp_2m "
                          "or unipc")
    if d.variant or d.model_overrides:
        raise ConfigError(f"config key '{key}.variant' / '{key}.model_overrides': the student has its teacher's "
                          "architecture; leave them unset")
    if d.trainable.mode is not TrainableMode.FULL:
        raise ConfigError(f"config key '{key}.trainable.mode': the student trains in full, got "
                          f"{d.trainable.mode.value}")
    if not d.student_steps or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in d.student_steps):
        raise ConfigError(f"config key '{key}.student_steps': step counts >= 1, got {list(d.student_steps)}")
    if d.method is DistillMethod.TRAJECTORY:
        if len(d.student_steps) != 1:
            raise ConfigError(f"config key '{key}.student_steps': a trajectory student learns one step count, got "
                              f"{list(d.student_steps)} (mean_flow learns several)")
    if d.method is not DistillMethod.MEAN_FLOW and d.teacher_steps % max(d.student_steps):
        raise ConfigError(f"config key '{key}.teacher_steps': {d.teacher_steps} must be a multiple of the finest "
                          f"student_steps {max(d.student_steps)} (the teacher's grid nests the student's)")
    if d.method is DistillMethod.SHORTCUT:
        counts = sorted(d.student_steps)
        if any(b != 2 * a for a, b in zip(counts, counts[1:])):
            raise ConfigError(f"config key '{key}.student_steps': shortcut levels double (e.g. 1, 2, 4, 8: each "
                              f"learns from two jumps of the next), got {list(d.student_steps)}")
    for k in ("cfg_scale", "visual_cfg_scale", "adaptive_weight"):
        if getattr(d, k) < 0:
            raise ConfigError(f"config key '{key}.{k}': must be >= 0, got {getattr(d, k)}")
    if not 0.0 <= d.instant_fraction <= 1.0:
        raise ConfigError(f"config key '{key}.instant_fraction': a probability in [0, 1], got {d.instant_fraction}")


# DiT fields the stage ties to the VAE (z_dim) and the text encoder (width): not overridable.
TIED_DIT_FIELDS = ("in_channels", "out_channels", "text_dim", "lora")


def _check_model_overrides(exp: ExperimentConfig) -> None:
    """`<stage>.variant` exists and every `<stage>.model_overrides.<field>` is a field of its model config with
    a value of the field's type (plain fields: the variant's value's type; enums and tuples: the builder's check)."""
    for name, (build, variants) in _MODELS.items():
        s: StageConfig = getattr(exp, name)
        if s.variant not in variants:
            raise ConfigError(f"config key '{name}.variant': unknown {s.variant!r}; choose from {sorted(variants)}")
        base = variants[s.variant]
        fields = {f.name for f in dataclasses.fields(base)}
        for key, value in s.model_overrides.items():
            where = f"{name}.model_overrides.{key}"
            if key not in fields:
                raise ConfigError(f"unknown config key '{where}' (valid keys here: {sorted(fields)})")
            if name == "dit" and key in TIED_DIT_FIELDS:
                raise ConfigError(f"config key '{where}': set by the stage (VAE z_dim / text encoder / dit.trainable)")
            kind = type(getattr(base, key))
            if kind in (int, float, bool, str):
                ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
                if not ok:
                    raise ConfigError(f"config key '{where}': expected {kind.__name__}, got {value!r}")
        try:
            build(s.variant, **s.model_overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config key '{name}.model_overrides': {e}") from None


def config_from_dataclass(exp: ExperimentConfig) -> ml_collections.ConfigDict:
    """The ConfigDict form of a dataclass config (enums as their values): the schema for experiments."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, enum.Enum):
            return x.value
        if isinstance(x, Mapping):
            return dict(x)
        return x

    return ml_collections.ConfigDict(plain(exp))
