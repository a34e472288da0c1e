"""`klingjax-train --dry_run`: compile the DiT stage's train step for the configured mesh and print its memory.

    klingjax-train --config experiments/t2v_recipe.py --config.dit.variant=14B --dry_run --workdir /tmp/x
    # Plan a larger mesh from one CPU host (param/optimizer bytes are exact; XLA:CPU's temp bytes are indicative):
    XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu klingjax-train ... --dry_run

Nothing is allocated for the model, and no data, VAE, text encoder or checkpoint is read or written. The trainer
(model + optimiser state + EMA) is built with `nnx.eval_shape` from the DiT stage's own `make_model` and
optimiser, shardings come from the stage's rule preset, and the loop's own train step is lowered with
ShapeDtypeStruct inputs of the configured batch: latents (B, t, h, w, c) from the VAE config's `latent_shape`,
text (B, text_max_len, text_dim) at the DiT config's text_dim (a real run takes it from the text encoder).
Bad config values raise `ConfigError` naming the key before anything is traced.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import ConfigError, ExperimentConfig, TrainableMode
from klingjax.models.conditions import Conditions
from klingjax.models.dit import DiTConfig, dit_config
from klingjax.sharding.mesh import make_mesh, resolve_mesh_shape
from klingjax.sharding.rules import DIT_RULES, MESH_AXES, get_rules
from klingjax.train import stages
from klingjax.train.batch import LatentBatch
from klingjax.train.checkpoint import abstract_with_shardings
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer, param_count, split_frozen, state_shardings
from klingjax.train.step import batch_sharding, compile_train_step, make_train_step
from klingjax.train.trainable import check_patterns, trainable_filter

# Set by the stage from the VAE and the text encoder; the dry run cannot take them as DiT overrides.
_MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")
_PART_ORDER = ("model", "optimizer", "ema", "frozen")


@dataclasses.dataclass(frozen=True)
class DryRunReport:
    """What one dry run measured; `*_per_device` and `memory` are bytes on one device."""

    experiment: str
    variant: str
    model: DiTConfig
    mesh: dict[str, int]
    platform: str
    batch: dict[str, tuple[tuple[int, ...], str]]  # batch leaf ("latent", "cond.text", ...) -> (global shape, dtype)
    tokens_per_clip: int
    param_count: int  # trained params
    frozen_param_count: int  # params a fine-tune keeps frozen (outside the state: "frozen" in state_total)
    trainable: str  # dit.trainable.mode
    state_total: dict[str, int]  # model / optimizer / ema (/ frozen) bytes over the whole mesh
    state_per_device: dict[str, int]  # the same, the shards one device holds
    memory: dict[str, int]  # compiled.memory_analysis(): argument / output / temp / alias / generated_code
    lower_seconds: float
    compile_seconds: float
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)  # for klingjax.plan: HLO and costs


# ---------------------------------------------------------------------------------------------------------
# Validation (before anything is traced)
# ---------------------------------------------------------------------------------------------------------


def check_dit_stage(exp: ExperimentConfig, num_devices: int) -> tuple[DiTConfig, tuple[int, int, int, int]]:
    """The DiT variant + overrides and one clip's latent grid (t, h, w, c); ConfigError names a bad key."""
    cfg = exp.dit
    model = dit_config(cfg.variant, **cfg.model_overrides)  # variant and overrides: validated by to_experiment
    if cfg.sharding not in DIT_RULES:
        raise ConfigError(f"config key 'dit.sharding': unknown preset {cfg.sharding!r}; "
                          f"choose from {sorted(DIT_RULES)}")
    try:
        sizes = dict(zip(MESH_AXES, resolve_mesh_shape(exp.mesh.sizes, num_devices)))
    except ValueError as e:
        raise ConfigError(f"config key 'mesh': {e}") from None
    if cfg.batch_size % (sizes["data"] * sizes["fsdp"]):
        raise ConfigError(f"config key 'dit.batch_size': {cfg.batch_size} is not divisible by the data x fsdp mesh "
                          f"size {sizes['data'] * sizes['fsdp']}")
    if exp.text_max_len < 1:
        raise ConfigError(f"config key 'text_max_len': must be >= 1, got {exp.text_max_len}")
    try:
        grid = layout.latent_grid(exp)  # (t, h, w, c)
    except (TypeError, ValueError) as e:  # vae.variant errors already name their key
        msg = str(e) if str(e).startswith("config key") else f"config key 'vae.model_overrides': {e}"
        raise ConfigError(msg) from None
    for key, size, patch in zip(("data.num_frames", "data.height", "data.width"), grid[:3], model.patch_size):
        if size < patch or size % patch:
            raise ConfigError(f"config key '{key}': the latent grid {grid[:3]} is not divisible by the DiT patch "
                              f"{model.patch_size} (axis {key.split('.')[1]} has {size} latents)")
    return model, grid


# ---------------------------------------------------------------------------------------------------------
# Abstract state, bytes and compile
# ---------------------------------------------------------------------------------------------------------


def state_bytes(abstract: nnx.State) -> tuple[dict[str, int], dict[str, int]]:
    """(total, per-device) bytes of each top-level part of an abstract state whose leaves carry shardings."""
    total, per_device = {}, {}
    for part in [p for p in _PART_ORDER if p in abstract] + sorted(p for p in abstract if p not in _PART_ORDER):
        leaves = jax.tree.leaves(abstract[part])
        total[part] = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
        per_device[part] = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)
    return total, per_device


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    return {} if stats is None else {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in _MEMORY_FIELDS}


@dataclasses.dataclass(frozen=True)
class AbstractTrainState:
    """The DiT stage's trainer, shape only, on a mesh: what the loop would hold, with shardings on every leaf."""

    spec: stages.StageSpec
    mesh: jax.sharding.Mesh
    rules: Any
    text_dim: int
    graphdef: nnx.GraphDef
    state: nnx.State  # ShapeDtypeStructs with shardings: model / optimizer / ema / guard (trained params only)
    shardings: nnx.State
    frozen: nnx.State | None  # a fine-tune's frozen params (model-relative, one copy) or None
    frozen_shardings: nnx.State | None
    frozen_abstract: nnx.State | None

    def bytes(self) -> tuple[dict[str, int], dict[str, int]]:
        """(total, per-device) bytes per part: model, optimizer, ema (trained params), frozen, guard."""
        return state_bytes(self.state if self.frozen is None else nnx.State({**self.state, "frozen": self.frozen}))


def abstract_train_state(exp: ExperimentConfig, devices: list[jax.Device] | None = None) -> AbstractTrainState:
    """The DiT stage's trainer built with `nnx.eval_shape` on the configured mesh (nothing allocated or compiled).

    A fine-tune (dit.trainable not full) keeps its frozen params out of the state: one copy, in
    `trainable.frozen_dtype`, no optimizer state and no EMA for them (`state.split_frozen`, as the loop does).
    """
    devices = list(devices) if devices is not None else jax.devices()
    text_dim = check_dit_stage(exp, len(devices))[0].text_dim
    mesh = make_mesh(exp.mesh.sizes, devices)
    rules = get_rules(exp.dit.sharding, "dit")
    seq = exp.text_max_len
    # The empty-prompt embedding only feeds caption dropout inside the loss: its values don't matter here.
    null_text = (np.zeros((seq, text_dim), np.float32), np.zeros((seq,), bool))
    spec = stages.dit_stage(exp, workdir="", null_text=null_text)  # make_model, loss_fn; its dataset is never built
    tx = make_optimizer(exp.dit.optim, exp.dit.steps)
    tcfg = exp.dit.trainable
    wrt = nnx.Param if tcfg.mode is TrainableMode.FULL else trainable_filter(tcfg)
    make = lambda: Trainer(spec.make_model(nnx.Rngs(exp.seed)), tx, wrt=wrt)
    if tcfg.mode is not TrainableMode.FULL:
        check_patterns(tcfg, nnx.eval_shape(lambda: spec.make_model(nnx.Rngs(exp.seed))), "dit.trainable")
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    abstract, frozen_abstract = jax.eval_shape(lambda: split_frozen(make(), tcfg))
    shardings = state_shardings(abstract, mesh, rules)
    frozen_shardings = frozen = None
    if frozen_abstract is not None:
        frozen_shardings = state_shardings(frozen_abstract, mesh, rules)
        frozen = abstract_with_shardings(frozen_abstract, frozen_shardings)
    return AbstractTrainState(spec, mesh, rules, text_dim, graphdef, abstract_with_shardings(abstract, shardings),
                              shardings, frozen, frozen_shardings, frozen_abstract)


def dry_run(exp: ExperimentConfig, devices: list[jax.Device] | None = None) -> DryRunReport:
    """Build the DiT stage abstractly on the configured mesh, lower and compile its train step, measure it."""
    ts = abstract_train_state(exp, devices)
    spec, mesh, rules, text_dim, state, shardings, frozen = (ts.spec, ts.mesh, ts.rules, ts.text_dim, ts.state,
                                                               ts.shardings, ts.frozen)
    devices = list(mesh.devices.flat)
    tcfg = exp.dit.trainable
    model_cfg, grid = layout.dit_model_config(exp, text_dim), layout.latent_grid(exp)  # what the stage builds
    seq, b = exp.text_max_len, exp.dit.batch_size
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh))
    cond = Conditions(text=sds((b, seq, text_dim), jnp.float32), text_mask=sds((b, seq), jnp.bool_))
    batch = LatentBatch(latent=sds((b, *grid), jnp.float32), cond=cond)
    key = jax.eval_shape(lambda: jax.random.key(exp.seed))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(ts.graphdef, spec.loss_fn, ema_decay=exp.dit.optim.ema_decay, trainable=tcfg)
        t0 = time.perf_counter()
        lowered = compile_train_step(train_step, shardings, mesh, frozen_param_shardings=ts.frozen_shardings).lower(
            state, batch, key, *([] if frozen is None else [frozen]))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    total, per_device = ts.bytes()
    t, h, w = (s // p for s, p in zip(grid[:3], model_cfg.patch_size))
    return DryRunReport(
        experiment=exp.name, variant=exp.dit.variant, model=model_cfg,
        mesh=dict(mesh.shape), platform=devices[0].platform,
        batch={jax.tree_util.keystr(path, simple=True, separator="."): (v.shape, str(v.dtype))
               for path, v in jax.tree_util.tree_leaves_with_path(batch)}, tokens_per_clip=t * h * w,
        param_count=param_count(state), trainable=tcfg.mode.value,
        frozen_param_count=0 if frozen is None else param_count(nnx.State({"model": ts.frozen_abstract})),
        state_total=total, state_per_device=per_device, memory=_memory(compiled),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1, compiled=compiled,
    )


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, e.g. '26.62 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(r: DryRunReport) -> str:
    """The dry run as printable lines."""
    m: Any = r.model
    parts = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in r.state_per_device.items())
    mem = r.memory
    lines = [
        f"dry run: stage dit of {r.experiment!r}, DiT {r.variant} (dim {m.dim}, {m.num_layers} layers, "
        f"{m.num_heads} heads; {m.attention_layout.value} attention, {m.text_attention.value} text; "
        f"remat {m.remat.value}; {'scan' if m.scan_layers else 'loop'}; compute {jnp.dtype(m.dtype).name})",
        f"mesh: {' '.join(f'{k}={v}' for k, v in r.mesh.items())} ({math.prod(r.mesh.values())} {r.platform} "
        f"devices)",
        "batch: " + ", ".join(f"{k} {tuple(s)} {d}" for k, (s, d) in r.batch.items())
        + f"; {r.tokens_per_clip} tokens per clip",
        f"params: {r.param_count:,} ({fmt_bytes(r.state_total['model'])} in total)" if not r.frozen_param_count else
        f"params ({r.trainable} fine-tune): {r.param_count:,} trained ({fmt_bytes(r.state_total['model'])}), "
        f"{r.frozen_param_count:,} frozen ({fmt_bytes(r.state_total['frozen'])}, no optimizer state or EMA)",
        f"per-device state: {parts} = {fmt_bytes(sum(r.state_per_device.values()))} "
        f"(whole mesh: {fmt_bytes(sum(r.state_total.values()))})",
    ]
    if mem:
        peak = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
        lines.append("compiled per device: " + ", ".join(f"{k} {fmt_bytes(mem[k])}" for k in _MEMORY_FIELDS)
                     + f"; peak ~ argument + output + temp - alias = {fmt_bytes(peak)}")
    else:
        lines.append("compiled per device: memory_analysis() unavailable on this backend")
    lines.append(f"lowered in {r.lower_seconds:.1f} s, compiled in {r.compile_seconds:.1f} s")
    return "\n".join(lines)
