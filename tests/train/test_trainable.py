"""Fine-tuning a subset of params or LoRA factors through the real train loop: frozen params untouched bitwise, no
optimizer state or EMA for them, checkpoints holding only what was trained, exact resume, the base's fingerprint,
and bad patterns failing before anything compiles."""

from __future__ import annotations

import functools
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.config import ConfigError, OptimConfig, StageConfig, TrainableConfig, TrainableMode
from klingjax.models.layers.attention import dense
from klingjax.models.layers.lora import LoRAConfig, add_lora
from klingjax.train import trainable
from klingjax.train.checkpoint import ArchitectureError, _top_level_keys, list_steps, restore_params
from klingjax.train.loop import StageSpec, train_stage

BATCH = 8
TARGET = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(4, 4)


class TwoDense(nnx.Module):
    """x -> tanh(x @ W1 + b1) @ W2 + b2, scaled: two `dense` layers that can take LoRA factors."""

    def __init__(self, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.inp = dense(4, 8, ("embed", "mlp"), rngs=rngs)
        self.out = dense(8, 4, ("mlp", "embed"), rngs=rngs)
        self.gain = nnx.Param(jnp.ones((4,)))
        if lora is not None:
            add_lora(self, lora, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.inp(x))) * self.gain[...]


def _loss(target, model, batch, key, ctx):
    x = batch["x"]
    return jnp.mean(jnp.square(model(x) - x @ target)), {}


def _spec(lora: LoRAConfig | None, target=TARGET, on_sample=None) -> StageSpec:
    def dataset(per_host, seed, index, count):
        ds = grain.MapDataset.range(1 << 20).map(
            lambda i: {"x": np.random.default_rng(i).standard_normal(4).astype(np.float32)})
        return ds.to_iter_dataset().batch(per_host)

    make = functools.partial(TwoDense, lora=lora)
    return StageSpec("dit", "dit", make, functools.partial(_loss, jnp.asarray(target)), dataset,
                     lambda d: {"x": d["x"]}, on_sample)


def _cfg(**kw) -> StageConfig:
    base = dict(batch_size=BATCH, steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                optim=OptimConfig(lr=0.05, warmup_steps=1, grad_clip=0.0))
    return StageConfig(**{**base, **kw})


def _run(workdir, mesh, cfg: StageConfig, lora: LoRAConfig | None = None, target=TARGET, on_sample=None):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write("{}")  # find_checkpoints needs a work dir's config
    return train_stage(_spec(lora, target, on_sample), cfg, workdir=str(workdir), mesh=mesh, seed=0)


def _flat(state) -> dict[str, np.ndarray]:
    return {trainable.path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def base(tmp_path_factory, mesh):
    """A fully trained base work dir (6 steps)."""
    workdir = tmp_path_factory.mktemp("base")
    _run(workdir, mesh, _cfg())
    return str(workdir)


def _params(path: str, lora: LoRAConfig | None = None, **kw) -> dict[str, np.ndarray]:
    model = nnx.eval_shape(lambda: TwoDense(nnx.Rngs(0), lora))
    return _flat(restore_params(path, model, **kw))


LORA = LoRAConfig(rank=2, alpha=4.0, targets=("inp", "out"))


def _lora_cfg(base: str, **kw) -> StageConfig:
    t = TrainableConfig(mode=TrainableMode.LORA, lora_rank=2, lora_alpha=4.0, lora_targets=("inp", "out"))
    return _cfg(init_from=os.path.join(base, "dit"), trainable=t, **kw)


def _saved_leaves(workdir: str, step: int) -> dict[str, tuple]:
    with open(os.path.join(workdir, "dit", "checkpoints", str(step), "state", "_METADATA")) as f:
        entries = json.load(f)["tree_metadata"]
    return {k: v for k, v in entries.items()}


def test_lora_trains_only_its_factors_and_keeps_the_base_bitwise(base, tmp_path, mesh):
    ft = str(tmp_path / "lora")
    trained = {}  # the EMA model the loop holds in memory after its last step
    on_sample = lambda model, step, out: trained.update(_flat(nnx.state(model, nnx.Param))) or {}
    _run(ft, mesh, _lora_cfg(base), lora=LORA, target=TARGET[::-1], on_sample=on_sample)
    before = _params(os.path.join(base, "dit"), use_ema=True)
    for name, value in before.items():
        np.testing.assert_array_equal(trained[name], value, err_msg=name)  # frozen: exactly the base's EMA
    assert np.abs(trained["out/lora_b"]).max() > 0  # the factors learned (B starts at zero)
    after = _params(os.path.join(ft, "dit"), LORA, use_ema=True)  # read back: base + this stage's factors
    for name, value in trained.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # The checkpoint holds only the factors: model, EMA and optimizer state have no kernel, bias or gain.
    saved = " ".join(_saved_leaves(ft, 6))
    assert "lora_a" in saved and "lora_b" in saved
    assert not any(w in saved for w in ("kernel", "bias", "gain")), saved
    info = trainable.read_base(os.path.join(ft, "dit"))
    assert info["step"] == 6 and sorted(info["trained"]) == ["inp/lora_a", "inp/lora_b", "out/lora_a", "out/lora_b"]
    assert _top_level_keys(os.path.join(ft, "dit", "checkpoints"), 6) == {"model", "optimizer", "ema", "guard"}
    with pytest.raises(ArchitectureError, match="is a LoRA fine-tune.*klingjax-merge-lora"):
        _params(os.path.join(ft, "dit"))  # into the base architecture: the factors would be dropped silently


def test_lora_resume_is_exact(base, tmp_path, mesh):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    _run(whole, mesh, _lora_cfg(base), lora=LORA)
    _run(parts, mesh, _lora_cfg(base, max_steps_per_run=4), lora=LORA)  # stops (and saves) at step 4
    assert list_steps(os.path.join(parts, "dit", "checkpoints")) == [2, 4]
    _run(parts, mesh, _lora_cfg(base), lora=LORA)  # resumes at 4, frozen params from the base again
    for ema in (False, True):
        a = _params(os.path.join(whole, "dit"), LORA, use_ema=ema)
        b = _params(os.path.join(parts, "dit"), LORA, use_ema=ema)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_subset_in_bfloat16_trains_only_the_matching_params(base, tmp_path, mesh):
    ft = str(tmp_path / "subset")
    t = TrainableConfig(mode=TrainableMode.SUBSET, params=("^out/",), frozen_dtype="bfloat16")
    trained = {}
    on_sample = lambda model, step, out: trained.update(_flat(nnx.state(model, nnx.Param))) or {}
    _run(ft, mesh, _cfg(init_from=os.path.join(base, "dit"), trainable=t), target=TARGET.T, on_sample=on_sample)
    before = _params(os.path.join(base, "dit"), use_ema=True)
    after = _params(os.path.join(ft, "dit"), use_ema=True)
    for name in ("inp/kernel", "inp/bias", "gain"):  # held in bfloat16 while training, read back from the base
        assert trained[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(trained[name], before[name].astype(jnp.bfloat16), err_msg=name)
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert trained["out/kernel"].dtype == np.float32
    np.testing.assert_array_equal(after["out/kernel"], trained["out/kernel"])
    assert not np.array_equal(after["out/kernel"], before["out/kernel"])  # trained, starting from the base
    saved = " ".join(_saved_leaves(ft, 6))
    assert "out" in saved and "inp" not in saved and "gain" not in saved


def test_a_changed_base_is_refused(base, tmp_path, mesh):
    import shutil

    copy = str(tmp_path / "base_copy")
    shutil.copytree(base, copy)
    ft = str(tmp_path / "ft")
    _run(ft, mesh, _lora_cfg(copy, max_steps_per_run=2), lora=LORA)
    meta = os.path.join(copy, "dit", "checkpoints", "6", "state", "_METADATA")
    with open(meta, "a") as f:
        f.write(" ")  # any change to the base's files
    with pytest.raises(trainable.BaseChangedError, match="the base changed"):
        _run(ft, mesh, _lora_cfg(copy), lora=LORA)
    with pytest.raises(trainable.BaseChangedError, match="the base changed"):
        _params(os.path.join(ft, "dit"), LORA)


@pytest.mark.parametrize("params, match", [(("^nothing/",), "'\\^nothing/'"), (("out/", "zz"), "'zz'")])
def test_a_pattern_matching_nothing_fails_before_compiling(base, tmp_path, mesh, params, match):
    t = TrainableConfig(mode=TrainableMode.SUBSET, params=params)
    with pytest.raises(ConfigError, match=f"dit.trainable.params.*{match}.*matches no parameter"):
        _run(str(tmp_path), mesh, _cfg(init_from=os.path.join(base, "dit"), trainable=t))
    assert not os.path.exists(tmp_path / "dit" / "checkpoints")


def test_a_lora_target_matching_no_layer_is_named():
    with pytest.raises(ValueError, match="'attn9'.*match no linear layer"):
        TwoDense(nnx.Rngs(0), LoRAConfig(rank=2, targets=("inp", "attn9")))


class WithAdapter(TwoDense):
    """TwoDense + a zero-initialised condition adapter (named like the DiT's camera embedder) or another new param."""

    def __init__(self, rngs: nnx.Rngs, name: str = "camera_embedder"):
        super().__init__(rngs)
        setattr(self, name, dense(4, 4, ("embed", "mlp"), kernel_init=nnx.initializers.zeros, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) + getattr(self, "camera_embedder", getattr(self, "extra", None))(x)


def test_init_from_keeps_a_new_condition_adapter_at_its_init(base, tmp_path, mesh):
    """A model with a zero-initialised condition adapter starts from a checkpoint without it (the adapter keeps its
    init); any other param the checkpoint lacks is an architecture error."""
    import dataclasses

    spec = _spec(None)
    cfg = _cfg(init_from=os.path.join(base, "dit"), steps=1, checkpoint_every=1)
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{}")
    train_stage(dataclasses.replace(spec, make_model=WithAdapter), cfg, workdir=str(tmp_path / "a"), mesh=mesh,
                seed=0)
    model = nnx.eval_shape(lambda: WithAdapter(nnx.Rngs(0)))
    got = _flat(restore_params(str(tmp_path / "a" / "dit"), model, use_ema=False))
    want = _params(os.path.join(base, "dit"), use_ema=True)
    for name, value in want.items():  # step 1 runs at warmup lr 0: the loaded params are unchanged
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert not got["camera_embedder/kernel"].any()
    with pytest.raises(ArchitectureError):
        train_stage(dataclasses.replace(spec, make_model=functools.partial(WithAdapter, name="extra")), cfg,
                    workdir=str(tmp_path / "b"), mesh=mesh, seed=0)
