"""`klingjax-train --dry_run`: the DiT train step compiled abstractly on an 8-device fsdp mesh, memory printed,
nothing written; bad config values fail before anything is built, naming the key; the 14B variant (slow)."""

import os
import re
import subprocess
import sys
import time

import helpers
import ml_collections
import pytest

from experiments import t2v_recipe
from klingjax.config import ConfigError, to_experiment
from klingjax.train import dry_run

REPO = str(helpers.REPO)

# A config file as a user would write one: the tiny t2v stage on an fsdp mesh, with both DiT ablation switches.
ABLATION_CONFIG = """
from experiments import t2v_recipe


def get_config(arg=None):
    c = t2v_recipe.get_config("stage2,runlocal")
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dit.model_overrides = {**c.dit.model_overrides, "attention_layout": "factorized", "text_attention": "joint",
                             "remat": "full"}
    return c
"""
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * _UNITS[unit]


def test_cli_dry_run_prints_memory_and_writes_nothing(tmp_path):
    config = tmp_path / "ablation_dry_run.py"
    config.write_text(ABLATION_CONFIG)
    workdir = tmp_path / "workdir"
    proc = subprocess.run(
        [sys.executable, "-m", "klingjax.main", "--config", str(config), "--dry_run", "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ),  # conftest: 8 CPU devices
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "factorized attention, joint text; remat full; scan" in out, out
    assert "mesh: data=1 fsdp=8 context=1 tensor=1 (8 cpu devices)" in out
    assert "batch: latent (8, 3, 8, 8, 8) float32, cond.text (8, 16, 384) float32, cond.text_mask (8, 16) bool" in out
    size = r"([\d.]+ (?:B|KiB|MiB|GiB))"
    # The step guard's counters (klingjax/train/guard.py) are a few bytes beside model/optimizer/EMA.
    guard = r"(?: \+ guard [\d.]+ (?:B|KiB))?"
    state = re.search(rf"per-device state: model {size} \+ optimizer {size} \+ ema {size}{guard} = {size} "
                      rf"\(whole mesh: {size}\)", out)
    memory = re.search(rf"compiled per device: argument {size}, output {size}, temp {size}, alias {size}", out)
    assert state and memory, out
    model, opt, ema, per_device, whole = (_bytes(s) for s in state.groups())
    assert opt == pytest.approx(2 * model, rel=0.01) and ema == model  # AdamW mu + nu; EMA is a param copy
    assert per_device < whole / 4  # fsdp splits the state (norm scales and some biases stay replicated)
    argument, output, _, alias = (_bytes(s) for s in memory.groups())
    assert argument >= per_device * 0.99 and alias == pytest.approx(per_device, rel=0.01)  # the state is donated
    assert not workdir.exists()  # no data, no checkpoint, no config.json


def _bad(**changes) -> ml_collections.ConfigDict:
    c = t2v_recipe.get_config("stage2,runlocal")
    c.mesh.data, c.mesh.fsdp = 1, -1
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[name] = value
    return c


@pytest.mark.parametrize("changes, message", [
    (dict(dit__variant="15B"), r"'dit.variant': unknown '15B'"),
    (dict(dit__model_overrides={"attention_layout": "diagonal"}), r"'dit.model_overrides'.*'attention_layout'"),
    (dict(dit__model_overrides={"dim": 32, "num_heads": 3}), r"'dit.model_overrides'.*divisible by num_heads"),
    (dict(dit__model_overrides={"text_dim": 64}), r"'dit.model_overrides.text_dim'"),
    (dict(dit__sharding="zz"), r"'dit.sharding': unknown preset 'zz'"),
    (dict(mesh__fsdp=3), r"'mesh'"),
    (dict(dit__batch_size=4), r"'dit.batch_size': 4 is not divisible by the data x fsdp mesh size 8"),
    (dict(data__height=36), r"'data.height'"),
    (dict(vae__variant="huge"), r"'vae.variant'"),
])
def test_bad_values_fail_before_anything_is_built(monkeypatch, changes, message):
    def built(*args, **kwargs):
        raise AssertionError("the dry run built the trainer before validating the config")

    monkeypatch.setattr(dry_run, "Trainer", built)
    monkeypatch.setattr(dry_run, "make_mesh", built)
    t0 = time.time()
    with pytest.raises(ConfigError, match=message):
        dry_run.dry_run(to_experiment(_bad(**changes)))
    assert time.time() - t0 < 5


@pytest.mark.slow
def test_dry_run_14b_480p_clip_on_8_devices():
    """Wan 14B, one 81-frame 480p clip per device (21x60x104 latents, 32760 tokens), full remat, fsdp over 8."""
    c = t2v_recipe.get_config("stage3")
    c.dit.variant = "14B"
    c.dit.model_overrides = {"remat": "full"}
    c.data.num_frames, c.data.height, c.data.width = 81, 480, 832
    c.dit.batch_size = 8
    c.mesh.data, c.mesh.fsdp = 1, -1
    report = dry_run.dry_run(to_experiment(c))
    print(dry_run.format_report(report))  # pytest -s shows the numbers
    assert report.param_count == 14_288_491_584  # the same formula test_dit checks against diffusers for 1.3B
    assert report.batch["latent"][0] == (8, 21, 60, 104, 16) and report.tokens_per_clip == 21 * 30 * 52
    total, per_device = sum(report.state_total.values()), sum(report.state_per_device.values())
    assert total == pytest.approx(4 * 4 * report.param_count, rel=1e-3)  # f32 params + AdamW mu, nu + EMA
    assert per_device == pytest.approx(total / 8, rel=0.01)
    assert report.memory["argument"] >= per_device and report.memory["temp"] > 0


def test_lora_dry_run_keeps_frozen_params_out_of_optimizer_and_ema():
    """A LoRA fine-tune: the trained state is the factors (model, optimizer, EMA), the frozen params one bf16 copy,
    sharded on the fsdp mesh; the step compiles with them as a separate argument."""
    c = t2v_recipe.get_config("stage2,runlocal")
    c.mesh.data, c.mesh.fsdp = 1, -1
    full = dry_run.dry_run(to_experiment(c))
    c.dit.init_from = "/never/read/dit"
    c.dit.trainable.mode, c.dit.trainable.lora_rank, c.dit.trainable.frozen_dtype = "lora", 4, "bfloat16"
    lora = dry_run.dry_run(to_experiment(c))
    assert lora.trainable == "lora" and lora.frozen_param_count == full.param_count
    dim, layers = full.model.dim, full.model.num_layers
    # rank 4 on attn1/attn2 (4 dim x dim layers each) and the MLP (dim x ffn, ffn x dim), stacked over the blocks
    assert lora.param_count == layers * 4 * (8 * (dim + dim) + 2 * (dim + full.model.ffn_dim))
    assert lora.state_total["frozen"] == 2 * full.param_count  # bfloat16
    assert lora.state_total["optimizer"] < full.state_total["optimizer"] / 5
    assert "frozen" in dry_run.format_report(lora) and lora.memory
    with pytest.raises(ConfigError, match=r"'dit\.trainable\.params': pattern 'nothing/'"):
        c.dit.trainable.params = ("nothing/",)
        dry_run.dry_run(to_experiment(c))
