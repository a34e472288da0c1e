# ruff: noqa: E501  (HLO text lines are as long as XLA prints them)
"""HLO parsing and collective costing on a hand-built program whose FLOPs, bytes and collectives are known."""

import pytest

from klingjax.plan import chips, hlo, roofline

# A while loop (10 trips) whose body gathers a weight shard over groups of 4, multiplies, and reduce-scatters;
# the entry all-reduces a bf16 gradient tuple across all 8 devices and permutes a buffer around a ring.
HAND_BUILT = """
HloModule hand_built, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[64,128], f32[2,32])) -> (s32[], f32[64,128], f32[2,32]) {
  %p = (s32[], f32[64,128], f32[2,32]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %w = f32[2,32]{1,0} get-tuple-element(%p), index=2
  %ag = f32[128,32]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %y = f32[64,32]{1,0} dot(%x, %ag), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %rs = f32[16,32]{1,0} reduce-scatter(%y), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[64,128], f32[2,32]) tuple(%i, %x, %w)
}

%cond (c: (s32[], f32[64,128], f32[2,32])) -> pred[] {
  %c = (s32[], f32[64,128], f32[2,32]) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %ten = s32[] constant(10)
  ROOT %lt = pred[] compare(%n, %ten), direction=LT
}

ENTRY %main (x0: f32[64,128], w0: f32[2,32], g0: bf16[1024], g1: bf16[512]) -> f32[] {
  %x0 = f32[64,128]{1,0} parameter(0)
  %w0 = f32[2,32]{1,0} parameter(1)
  %g0 = bf16[1024]{0} parameter(2)
  %g1 = bf16[512]{0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,128], f32[2,32]) tuple(%zero, %x0, %w0)
  %loop = (s32[], f32[64,128], f32[2,32]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  %ar = (bf16[1024]{0}, bf16[512]{0}) all-reduce(%g0, %g1), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %cp = f32[2,32]{1,0} collective-permute(%w0), channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %r = f32[] constant(0)
}
"""


def test_hand_built_program_flops_and_collectives():
    program = hlo.parse(HAND_BUILT, 8)
    assert program.trip_counts == (10,)
    assert program.dot_flops == 10 * 2 * 64 * 32 * 128 and program.dot_flops_once == 2 * 64 * 32 * 128
    by_kind = {c.kind: c for c in program.collectives}
    assert set(by_kind) == {"all-gather", "reduce-scatter", "all-reduce", "collective-permute"}
    ag, rs, ar, cp = (by_kind[k] for k in ("all-gather", "reduce-scatter", "all-reduce", "collective-permute"))
    assert (ag.payload, ag.count, ag.groups) == (128 * 32 * 4, 10, ((0, 1, 2, 3), (4, 5, 6, 7)))
    assert (rs.payload, rs.count, rs.group_size) == (64 * 32 * 4, 10, 4)  # the unreduced operand
    assert (ar.payload, ar.count, ar.group_size) == ((1024 + 512) * 2, 1, 8)  # both tuple elements, bf16
    assert (cp.payload, cp.groups[0]) == (2 * 32 * 4, (0, 1))
    dot = next(op for op in program.ops if op.opcode == "dot")
    assert dot.count == 10 and dot.bytes == (64 * 32 + 64 * 128 + 128 * 32) * 4


def test_replica_group_formats_and_mesh_axes():
    assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == ((0, 4), (1, 5), (2, 6), (3, 7))
    mesh_fmt = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}"
    assert hlo.replica_groups(mesh_fmt, 8) == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert hlo.replica_groups("replica_groups={{0,2},{1,3}}", 4) == ((0, 2), (1, 3))
    assert hlo.replica_groups("replica_groups={}", 4) == ((0, 1, 2, 3),)
    shape = {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert roofline.group_axes((0, 1, 2, 3), shape) == ("fsdp",)
    assert roofline.group_axes((0, 4), shape) == ("data",)
    assert roofline.group_axes(tuple(range(8)), shape) == ("data", "fsdp")


def test_collective_costs_use_the_chip_links():
    h100, v5p = chips.CHIPS["h100"], chips.CHIPS["v5p"]
    mib = 2**20
    inside = roofline.collective_seconds("all-gather", 64 * mib, 8, True, h100, 64)
    assert inside == pytest.approx(64 * mib * 7 / 8 / (450e9 * 0.8) + 7 * h100.latency)
    across = roofline.collective_seconds("all-gather", 64 * mib, 64, False, h100, 64)
    assert across == pytest.approx(64 * mib * 63 / 64 / (50e9 * 0.8) + 63 * h100.latency)
    ar = roofline.collective_seconds("all-reduce", 64 * mib, 8, True, h100, 64)
    assert ar == pytest.approx(2 * (inside - 7 * h100.latency) + 7 * h100.latency)
    # v5p-256 = 128 chips, side ~5: a group of 4 uses one torus dimension, of 128 all three.
    assert chips.ici_bandwidth(v5p, 4, 128) == pytest.approx(600e9 / 3)
    assert chips.ici_bandwidth(v5p, 128, 128) == pytest.approx(600e9)
    assert roofline.collective_seconds("all-gather", 1.0, 1, True, v5p, 128) == 0.0


def test_targets():
    assert chips.parse_target("v5p-256") == (chips.CHIPS["v5p"], 128)
    assert chips.parse_target("v6e-64") == (chips.CHIPS["v6e"], 64)
    assert chips.parse_target("h100:64") == (chips.CHIPS["h100"], 64)
    assert chips.parse_target("8xH200") == (chips.CHIPS["h200"], 8)
    with pytest.raises(ValueError, match="unknown target"):
        chips.parse_target("tpu9000")
