"""The plan of a tiny DiT on 8 fake CPU devices: memory equals `memory_analysis()`, the state part follows the
target mesh, the search returns only candidates that fit a tiny chip."""

import dataclasses

import jax
import pytest

from experiments import t2v_recipe
from klingjax.config import to_experiment
from klingjax.plan import chips, roofline, search

TINY_CHIP = chips.cpu_chip(peak_flops=1e11, mem_bw=1e10, mem_bytes=2**40)
FIELDS = ("argument", "output", "temp", "alias", "generated_code")


@pytest.fixture(scope="module")
def tiny():
    """The tiny t2v stage (1 frame 32x32, 2 layers) at 1 clip per device, and a shared compile cache."""
    c = t2v_recipe.get_config("stage1,runlocal")
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dit.sharding = "fsdp"
    c.dit.batch_size = 4
    return to_experiment(c), {}


def test_memory_equals_memory_analysis(tiny):
    exp, cache = tiny
    sizes = {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert roofline.compile_mesh(sizes) == sizes  # the target compiles as is
    plan = roofline.estimate(exp, TINY_CHIP, 4, sizes, jax.devices(), cache)
    (report, program), = cache.values()
    stats = report.compiled.memory_analysis()
    for field in FIELDS:
        assert plan.memory[field] == getattr(stats, f"{field}_size_in_bytes"), field
    assert plan.memory["peak"] == stats.argument_size_in_bytes + stats.output_size_in_bytes + \
        stats.temp_size_in_bytes - stats.alias_size_in_bytes
    assert plan.state == report.state_per_device
    assert plan.peak_flash == plan.memory["peak"]  # the cpu chip has no flash attention: nothing removed
    assert plan.device_flops == program.dot_flops > program.dot_flops_once  # the layer loop is counted per layer
    assert plan.step_s == max(plan.compute_s, plan.comm_s) > 0 and plan.no_overlap_s >= plan.step_s


def test_larger_target_swaps_only_the_state(tiny):
    exp, cache = tiny
    small = {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    base = roofline.estimate(exp, TINY_CHIP, 4, small, jax.devices(), cache)
    wide = dataclasses.replace(exp, dit=dataclasses.replace(exp.dit, batch_size=16))
    target = {"data": 1, "fsdp": 16, "context": 1, "tensor": 1}
    plan = roofline.estimate(wide, TINY_CHIP, 16, target, jax.devices(), cache)
    assert len(cache) == 1  # same per-device shards: the 4-device compile is reused
    d_state = sum(plan.state.values()) - sum(base.state.values())
    assert d_state < 0  # 16-way FSDP holds less per device
    assert plan.memory["argument"] - base.memory["argument"] == d_state
    assert plan.memory["temp"] - base.memory["temp"] == plan.state["model"] - base.state["model"]
    gathers = [c for c in plan.costs if c[0].startswith("all-gather over fsdp")]
    assert gathers and all("g=16" in c[0] for c in gathers)  # collectives re-costed on the target's groups
    assert plan.model_flops == pytest.approx(4 * base.model_flops)  # 4x the clips


def test_search_returns_only_fitting_plans(tiny):
    exp, cache = tiny
    roomy = dataclasses.replace(TINY_CHIP, hbm_bytes=2**40)
    plans, rejected = search.search(exp, roomy, 4, jax.devices(), presets=("dp", "fsdp"), remats=("none",),
                                    max_compiles=2, cache=cache)
    assert len(plans) == 2 and [p.step_s for p in plans] == sorted(p.step_s for p in plans)
    # A chip between the two candidates' peaks: the larger one must be rejected, naming its peak.
    peaks = sorted(p.peak_flash for p in plans)
    assert peaks[0] < peaks[1]
    tight = dataclasses.replace(TINY_CHIP, hbm_bytes=(peaks[0] + peaks[1]) / 2)
    fits, rejected = search.search(exp, tight, 4, jax.devices(), presets=("dp", "fsdp"), remats=("none",),
                                   max_compiles=2, cache=cache)
    assert fits and all(p.fits and p.peak_flash <= tight.hbm_bytes for p in fits)
    assert any("peak" in why for _, why in rejected)
    assert len(fits) + len(rejected) == len(search.candidates(exp, tight, 4, ("dp", "fsdp"), ("none",)))
    # A chip smaller than any state: nothing is compiled, everything is rejected by its state bytes.
    none, rejected = search.search(exp, dataclasses.replace(TINY_CHIP, hbm_bytes=1024), 4, jax.devices(),
                                   presets=("dp", "fsdp"), remats=("none",), cache=cache)
    assert none == [] and all(why.startswith("state alone") for _, why in rejected)


def test_model_flops_count_each_matmul():
    from klingjax.models.dit import dit_config

    cfg = dit_config("XS", dim=8, ffn_dim=16, num_layers=1, in_channels=4, out_channels=4, text_dim=6, freq_dim=4)
    b, grid, text = 2, (1, 2, 3), 5
    n, d, f = 6, 8, 16
    per_layer = (2 * b * n * d * d * 4  # self-attention q, k, v, out
                 + 2 * b * n * d * d * 2 + 2 * b * text * d * d * 2  # cross-attention q, out; k, v of the text
                 + 2 * b * n * d * f * 2  # MLP in, out
                 + 2 * b * n * n * d * 2 + 2 * b * n * text * d * 2)  # QK^T and AV, self and cross
    embed = 2 * b * n * d * 4 * 8 + 2 * b * text * (6 * d + d * d) + 2 * b * (4 * d + 7 * d * d)
    assert roofline.model_flops(cfg, b, grid, text) == 3 * (per_layer + embed)
    # Wan 1.3B at 480p (32760 tokens): the N^2 attention is most of the work.
    big = dit_config("1.3B")
    share = 3 * big.num_layers * 4 * 32760**2 * big.dim / roofline.model_flops(big, 1, (21, 30, 52), 512)
    assert 0.6 < share < 0.8
