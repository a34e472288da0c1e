"""Read a compiled program's post-optimisation HLO text: matmul FLOPs, memory traffic and every collective.

    program = parse(compiled.as_text())
    program.collectives      # [Collective(kind, payload bytes, groups, count, ...)], loop trip counts applied
    program.dot_flops        # 2 * multiply-adds of every dot / convolution, loop trip counts applied

XLA's `cost_analysis()` counts a while loop's body once (a scanned 40-layer DiT counts one layer), so this module
walks the call graph itself: a computation's multiplicity is the sum over its callers of the caller's multiplicity
times the while loop's `known_trip_count` (1 for fusions, calls and conditionals). Traffic is counted per
instruction of a non-fused computation (operand bytes read + result bytes written), which is how XLA's own
cost model sees HBM: a fusion's internals stay on chip. Collective payloads are the bytes that cross links:

    all-gather: result (the gathered array)     reduce-scatter: operand (the unreduced array)
    all-reduce: operand = result                all-to-all, collective-permute: result
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (their bodies, if any, are walked separately).
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier"}

_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its result shapes [(dtype, dims)], opcode, operand names and attribute text."""

    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    opcode: str
    operands: tuple[str, ...]
    attrs: str

    @property
    def bytes(self) -> float:
        return sum(array_bytes(d, s) for d, s in self.shapes)


@dataclasses.dataclass(frozen=True)
class Collective:
    """A collective: `payload` bytes per execution, device-id `groups`, executions per step (`count`)."""

    kind: str
    name: str
    payload: float
    groups: tuple[tuple[int, ...], ...]
    count: int
    op_name: str = ""

    @property
    def group_size(self) -> int:
        return len(self.groups[0]) if self.groups else 1


@dataclasses.dataclass(frozen=True)
class Op:
    """One costed (non-collective, non-fused) instruction: FLOPs and bytes per execution, executions per step."""

    name: str
    opcode: str
    flops: float
    bytes: float
    count: int
    op_name: str
    dims: tuple[tuple[int, ...], ...]  # result and operand shapes (to recognise attention scores)
    out_bytes: float = 0.0  # the result alone


@dataclasses.dataclass(frozen=True)
class Program:
    """What `parse` found: per-step (loop-corrected) dot FLOPs and traffic, collectives, the biggest arrays."""

    dot_flops: float
    dot_flops_once: float  # the same with every loop body counted once, like cost_analysis()
    traffic: float  # bytes read + written by non-fused instructions, per step
    ops: tuple[Op, ...]
    collectives: tuple[Collective, ...]
    trip_counts: tuple[int, ...]


def array_bytes(dtype: str, dims: tuple[int, ...]) -> float:
    """Bytes of one dense array."""
    return DTYPE_BYTES.get(dtype, 4) * math.prod(dims)


def _shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((d, tuple(int(x) for x in s.split(",") if x)) for d, s in _SHAPE.findall(text) if d in DTYPE_BYTES)


def _split_operands(rest: str) -> tuple[str, str]:
    """('operand text', 'attribute text') of the part after `opcode(`, matching parentheses."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """{computation name: instructions} and the entry computation's name."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None or line.startswith(("ENTRY", "%")) and line.rstrip().endswith("{"):
            m = _COMP.match(line.strip())
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
                continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape_text, opcode, rest = m.groups()
            ops_text, attrs = _split_operands(rest)
            operands = tuple(re.findall(r"%([\w.\-]+)", ops_text))
            comps[current].append(Instruction(name, _shapes(shape_text), opcode, operands, attrs))
    return comps, entry


def multiplicities(comps: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, int], list[int]]:
    """How many times each computation runs per call of `entry` (while bodies x known trip count)."""
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    trips = []
    for comp, instrs in comps.items():
        for ins in instrs:
            trip = 1
            if ins.opcode == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
                trip = int(m.group(1)) if m else 1
                trips.append(trip)
            for key, names in _CALLS.findall(ins.attrs):
                for callee in re.findall(r"[\w.\-]+", names.replace("%", "")):
                    if key in ("body", "condition"):
                        callers[callee].append((comp, trip + (key == "condition")))
                    elif key != "to_apply":  # reducers' scalar bodies are not program work
                        callers[callee].append((comp, 1))
    memo: dict[str, int] = {entry: 1}

    def mult(c: str, seen: frozenset = frozenset()) -> int:
        if c not in memo:
            memo[c] = 0 if c in seen else sum(mult(p, seen | {c}) * k for p, k in callers.get(c, ()))
        return memo[c]

    return {c: mult(c) for c in comps}, trips


def dot_flops(ins: Instruction, symbols: dict[str, Instruction]) -> float:
    """2 x multiply-adds of a dot (result size x contracted size) or a convolution (result x window x C_in)."""
    out = math.prod(ins.shapes[0][1]) if ins.shapes else 0
    lhs = symbols.get(ins.operands[0]) if ins.operands else None
    if lhs is None or not lhs.shapes:
        return 0.0
    dims = lhs.shapes[0][1]
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        contracted = math.prod(dims[int(i)] for i in m.group(1).split(",") if i) if m else 1
        return 2.0 * out * contracted
    rhs = symbols.get(ins.operands[1]) if len(ins.operands) > 1 else None
    if rhs is None or not rhs.shapes:
        return 0.0
    kernel = math.prod(rhs.shapes[0][1])  # window x C_in x C_out
    c_out = ins.shapes[0][1][-1] if ins.shapes[0][1] else 1
    return 2.0 * out * kernel / max(c_out, 1)


def replica_groups(attrs: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """Device-id groups of a collective: explicit `{{0,1},..}`, iota `[G,S]<=[dims]T(perm)` or `mesh[...] {axes}`."""
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs):
        return tuple(tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        axes = re.findall(r"'?(\w+)'?=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = [names.index(a) for a in re.findall(r"'?(\w+)'?", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in chosen]
        ids = ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen))
        return tuple(tuple(int(x) for x in g) for g in ids)
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs):
        g, s = int(m.group(1)), int(m.group(2))
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return tuple(tuple(int(x) for x in row) for row in ids.reshape(g, s))
    if m := re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs):
        groups = tuple(tuple(int(x) for x in grp.split(",") if x) for grp in re.findall(r"\{([0-9,]*)\}", m.group(1)))
        if groups and groups[0]:
            return groups
    return (tuple(range(num_devices)),)  # empty groups: every device


def _payload(ins: Instruction, kind: str, symbols: dict[str, Instruction]) -> float:
    arrays = [array_bytes(d, s) for d, s in ins.shapes]
    if ins.opcode.endswith("-start") and len(arrays) > 1:
        if kind in ("all-gather", "collective-permute"):
            return max(arrays)  # (operand, result[, contexts]) tuples: the largest is the result
        arrays = arrays[: len(arrays) // 2]
    if kind == "reduce-scatter":
        return sum(symbols[o].bytes for o in ins.operands if o in symbols) or sum(arrays)
    return sum(arrays)


def _traffic(ins: Instruction, symbols: dict[str, Instruction], inner: set[str]) -> float:
    """Bytes an instruction reads and writes; slicing a stacked (L, ...) array reads one slice, not L."""
    operands = [symbols[o].bytes for o in ins.operands if o in symbols]
    out = ins.bytes
    if ins.opcode == "dynamic-update-slice" or "dynamic-update-slice" in inner:
        return 2.0 * sum(b for b in operands if b < out)  # in place: read + write the update only
    if ins.opcode == "dynamic-slice" or "dynamic-slice" in inner:
        return out + sum(min(b, out) for b in operands)
    return out + sum(operands)


def parse(text: str, num_devices: int) -> Program:
    """Loop-corrected FLOPs, traffic and collectives of a compiled program's `as_text()`."""
    comps, entry = parse_computations(text)
    mult, trips = multiplicities(comps, entry)
    fused = {c for c, ins in comps.items() for i in ins if i.opcode == "fusion"
             for c in re.findall(r"calls=%?([\w.\-]+)", i.attrs)}
    total_flops = once_flops = traffic = 0.0
    ops, colls = [], []
    fusion_flops: dict[str, float] = {}
    fusion_ops: dict[str, set[str]] = {}
    for comp, instrs in comps.items():  # FLOPs of dots inside each fused computation, and its opcodes
        symbols = {i.name: i for i in instrs}
        fusion_flops[comp] = sum(dot_flops(i, symbols) for i in instrs if i.opcode in ("dot", "convolution"))
        fusion_ops[comp] = {i.opcode for i in instrs}
    for comp, instrs in comps.items():
        n = mult.get(comp, 0)
        if comp in fused or n == 0:
            continue
        symbols = {i.name: i for i in instrs}
        for ins in instrs:
            meta = re.search(r'op_name="([^"]*)"', ins.attrs)
            op_name = meta.group(1) if meta else ""
            flops = 0.0
            if ins.opcode in ("dot", "convolution"):
                flops = dot_flops(ins, symbols)
            elif ins.opcode == "fusion" or ins.opcode == "custom-call":
                flops = sum(fusion_flops.get(c, 0.0) for c in re.findall(r"calls=%?([\w.\-]+)", ins.attrs))
            base = ins.opcode.removesuffix("-start")
            if base in COLLECTIVES:
                colls.append(Collective(base, ins.name, _payload(ins, base, symbols),
                                        replica_groups(ins.attrs, num_devices), n, op_name))
                continue
            if ins.opcode in _FREE or ins.opcode.endswith("-done"):
                continue
            nbytes = _traffic(ins, symbols, set().union(*(fusion_ops.get(c, set()) for c in
                                                         re.findall(r"calls=%?([\w.\-]+)", ins.attrs))))
            total_flops += n * flops
            once_flops += flops
            traffic += n * nbytes
            dims = tuple(s for _, s in ins.shapes) + tuple(s for o in ins.operands if o in symbols
                                                           for _, s in symbols[o].shapes)
            ops.append(Op(ins.name, ins.opcode, flops, nbytes, n, op_name, dims, ins.bytes))
    return Program(total_flops, once_flops, traffic, tuple(ops), tuple(colls), tuple(trips))
