"""Cross-chip traffic of one run of a compiled program, read from its optimized HLO.

XLA's cost analysis counts a loop body once, so the collectives are counted here: every
collective op of the program, times the trip counts of the while loops it runs in, split
into traffic over the slice's own links (ICI) and over the data-centre network between
slices (DCN).

What the TPU compiler emits, and how it is counted:

- An async collective is split over several computations (start, continuations, done)
  that repeat the op with one `channel_id`: each (kind, channel_id) counts once.
- A reduce-scatter is an `all-reduce` inside a computation named `all-reduce-scatter*`
  whose caller gets the scattered shard: it counts as a reduce-scatter.
- Windowed einsums (an FSDP gather or reduce-scatter fused with its matmul) are loops of
  `collective-permute-start` ops; the result of one is (operand, result, u32, u32), and
  the operand is what moves.
- Loops carry no known trip count in TPU HLO, and unrolled loops step their counter by
  more than one: trips = (limit - start) / step, read from the condition's compare, the
  start value handed to the loop and the body's increment.
- Across slices the compiler keeps the ICI part as a collective within each slice and
  sends the rest as host transfers to the "megascale" runtime (`send` ops tagged with a
  `_xla_megascale_transfer_type`): those are DCN traffic. A collective whose device
  groups span slices would be DCN too.

Bytes of an op are the size of the whole array it covers on one chip: what an
all-gather returns, what a reduce-scatter or all-reduce takes in, what an all-to-all or
collective-permute (or a DCN send) moves. Parameters gathered whole for the forward and
again for the backward, and their gradient reduce-scattered once, are three times the
parameter bytes (in their dtypes). `sent_bytes` is what a chip puts on the wire with ring
algorithms, for a time at a link bandwidth: (n-1)/n of the bytes for gathers, scatters
and all-to-alls over n chips, twice that for an all-reduce, all of it for a permute.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODES = {kind: kind for kind in KINDS} | {f"{kind}-start": kind for kind in KINDS}
_MEGASCALE_KINDS = {"ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
                    "ALL_REDUCE": "all-reduce", "ALL_TO_ALL": "all-to-all"}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kind of collective over one network, per chip for one run of the program."""

    count: int = 0
    """Ops executed (each op times its loops' trip counts)."""
    bytes: int = 0
    """Array bytes the ops cover (see the module docstring)."""
    sent_bytes: float = 0.0
    """Bytes a chip sends with ring algorithms."""

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.count + other.count, self.bytes + other.bytes,
                       self.sent_bytes + other.sent_bytes)


@dataclasses.dataclass(frozen=True)
class Communication:
    """Per-chip traffic of one run of a program, by network ("ici", "dcn") and kind."""

    ici: dict[str, Traffic]
    dcn: dict[str, Traffic]

    def total(self, network: str) -> Traffic:
        return sum(getattr(self, network).values(), Traffic())

    def seconds(self, network: str, bytes_per_second: float) -> float:
        """Time to send this network's traffic at a chip's bandwidth on it."""
        return self.total(network).sent_bytes / bytes_per_second


def communication(program: Any, slice_of_device: Sequence[int] = ()) -> Communication:
    """Traffic of `program` (a compiled executable or its optimized HLO text).

    `slice_of_device[i]` is the slice of the program's device i (`d.slice_index` over
    `mesh.devices.flat`, the order of the program's device ids); empty for one slice.
    """
    text = program if isinstance(program, str) else program.as_text()
    module = _Module(text)
    slices = max(len(set(slice_of_device)), 1)
    ici = {kind: Traffic() for kind in KINDS}
    dcn = {kind: Traffic() for kind in KINDS}
    for kind, instruction, trips, network in _collectives(module, slice_of_device):
        size = _bytes(kind, instruction, network)
        ways = slices if network == "dcn" else _group_size(instruction, len(slice_of_device))
        traffic = Traffic(trips, int(size * trips), size * trips * _sent_share(kind, ways))
        table = dcn if network == "dcn" else ici
        table[kind] = table[kind] + traffic
    return Communication(ici, dcn)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    root: bool
    opcode: str
    operands: list[str]
    attributes: str
    computation: str


class _Module:
    """The computations of an HLO module, and how many times each runs per run."""

    def __init__(self, text: str):
        self.computations: dict[str, list[_Instruction]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():  # a kernel's metadata may span lines
            header = re.match(r"^(ENTRY )?%([\w.\-]+) \(.*\{$", line)
            if header:
                current = header.group(2)
                self.computations[current] = []
                self.entry = current if header.group(1) else self.entry
            elif line.rstrip() == "}":
                current = None
            elif current is not None:
                instruction = _parse_instruction(line, current)
                if instruction is not None:
                    self.computations[current].append(instruction)
        self.by_name = {(i.computation, i.name): i
                        for body in self.computations.values() for i in body}
        self.runs = self._runs()

    def _runs(self) -> dict[str, dict[str, int]]:
        """Times each computation runs (callers' runs times loop trip counts, summed), by
        the loop body (or entry) it runs in: the pieces of one async collective are fused
        computations of one loop body, while a loop peeled by the compiler repeats the
        body's collectives, channel ids and all, outside the loop."""
        runs: dict[str, dict[str, int]] = {}

        def visit(name: str, times: int, host: str, path: tuple[str, ...]) -> None:
            if name not in self.computations or name in path:
                return
            by_host = runs.setdefault(name, {})
            by_host[host] = by_host.get(host, 0) + times
            for instruction in self.computations[name]:
                for callee, factor, loop in self._callees(instruction):
                    visit(callee, times * factor, callee if loop else host, (*path, name))

        visit(self.entry, 1, self.entry, ())
        return runs

    def _callees(self, instruction: _Instruction) -> Iterator[tuple[str, int, bool]]:
        """(computation, times it runs a run of the instruction, whether it is a loop's)."""
        attributes = instruction.attributes
        if instruction.opcode == "while":
            trips = self.trip_count(instruction)
            for role in ("condition", "body"):
                match = re.search(rf"\b{role}=%?([\w.\-]+)", attributes)
                if match:
                    yield match.group(1), trips, True
            return
        for match in re.finditer(r"\b(?:calls|to_apply|true_computation|false_computation)="
                                 r"%?([\w.\-]+)", attributes):
            yield match.group(1), 1, False
        branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
        for name in branches.group(1).split(",") if branches else ():
            yield name.strip().lstrip("%"), 1, False

    def trip_count(self, loop: _Instruction) -> int:
        """The loop's trip count: XLA's own annotation, else read off its counter."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
        if known:
            return int(known.group(1))
        condition = re.search(r"\bcondition=%?([\w.\-]+)", loop.attributes)
        body = re.search(r"\bbody=%?([\w.\-]+)", loop.attributes)
        if not condition or not body:
            return 1
        bound = self._bound(condition.group(1))
        if bound is None:
            return 1
        index, limit, direction = bound
        start = self._tuple_element_constant(loop.computation, loop.operands[0], index)
        step = self._increment(body.group(1), index)
        span = limit - (start or 0) + (1 if direction == "LE" else 0)
        return max(math.ceil(span / (step or 1)), 0)

    def _bound(self, condition: str) -> tuple[int, int, str] | None:
        """(counter's tuple index, limit, LT/LE) of a condition `counter < constant`."""
        for instruction in self.computations.get(condition, ()):
            direction = re.search(r"direction=(LT|LE)", instruction.attributes)
            if instruction.opcode != "compare" or not direction:
                continue
            counter = self._tuple_index(condition, instruction.operands[0])
            limit = self._constant(condition, instruction.operands[1])
            if counter is not None and limit is not None:
                return counter, limit, direction.group(1)
        return None

    def _increment(self, body: str, index: int) -> int | None:
        """The constant the body adds to tuple element `index` of its parameter."""
        root = next((i for i in self.computations.get(body, ()) if i.root), None)
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return None
        update = self._follow(body, root.operands[index])
        if update is None or update.opcode != "add":
            return None
        for counter, other in (update.operands, update.operands[::-1]):
            if self._tuple_index(body, counter) == index:
                return self._constant(body, other)
        return None

    def _follow(self, computation: str, name: str) -> _Instruction | None:
        """The instruction behind `name`, through copies, bitcasts and converts."""
        instruction = self.by_name.get((computation, name))
        while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert"):
            instruction = self.by_name.get((computation, instruction.operands[0]))
        return instruction

    def _constant(self, computation: str, name: str) -> int | None:
        instruction = self._follow(computation, name)
        if instruction is None or instruction.opcode != "constant":
            return None
        try:
            return int(instruction.operands[0])
        except (ValueError, IndexError):
            return None

    def _tuple_index(self, computation: str, name: str) -> int | None:
        instruction = self._follow(computation, name)
        if instruction is None or instruction.opcode != "get-tuple-element":
            return None
        return int(re.search(r"index=(\d+)", instruction.attributes).group(1))

    def _tuple_element_constant(self, computation: str, name: str, index: int) -> int | None:
        instruction = self._follow(computation, name)
        if instruction is None or instruction.opcode != "tuple" or index >= len(
                instruction.operands):
            return None
        return self._constant(computation, instruction.operands[index])


def _parse_instruction(line: str, computation: str) -> _Instruction | None:
    match = re.match(r"^\s*(ROOT )?%?([\w.\-]+) = ", line)
    if not match:
        return None
    rest = line[match.end():]
    shape, rest = _split_balanced(rest) if rest.startswith("(") else rest.split(" ", 1)
    opcode_match = re.match(r"\s*([\w\-]+)\(", rest)
    if not opcode_match:
        return None
    operands, attributes = _split_balanced(rest[opcode_match.end() - 1:])
    names = [o.strip().split(" ")[-1].lstrip("%") for o in _top_level_split(operands[1:-1])]
    return _Instruction(match.group(2), shape, bool(match.group(1)), opcode_match.group(1), names,
                        attributes, computation)


def _split_balanced(text: str) -> tuple[str, str]:
    """`text` starting with "(": the balanced parenthesised prefix and what follows."""
    depth = 0
    for position, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[:position + 1], text[position + 1:]
    return text, ""


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    tail = text[start:]
    return [*parts, tail] if tail.strip() else parts


def _collectives(module: _Module, slice_of_device: Sequence[int],
                 ) -> Iterator[tuple[str, _Instruction, int, str]]:
    """(kind, op, times it runs, network) of each logical collective of the program."""
    found: dict[tuple[str, str, str], tuple[str, _Instruction, int, str]] = {}
    for computation, body in module.computations.items():
        for instruction in body:
            kind, network, identity = _classify(instruction, slice_of_device)
            if kind is None:
                continue
            for host, runs in module.runs.get(computation, {}).items():
                key = (kind, identity or f"{computation}/{instruction.name}", host)
                if key in found:  # one async op spread over several computations
                    runs = max(runs, found[key][2])
                found[key] = (kind, instruction, runs, network)
    yield from found.values()


def _classify(instruction: _Instruction, slice_of_device: Sequence[int],
              ) -> tuple[str | None, str, str]:
    """(kind or None, network, identity shared by the pieces of one async op)."""
    attributes = instruction.attributes
    if instruction.opcode == "send" and "_xla_megascale_transfer_type" in attributes:
        transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', attributes).group(1)
        rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', attributes)
        identity = rendezvous.group(1) if rendezvous else instruction.name
        return _MEGASCALE_KINDS.get(transfer, "collective-permute"), "dcn", identity
    kind = _OPCODES.get(instruction.opcode)
    if kind is None:
        return None, "", ""
    if kind == "all-reduce" and instruction.computation.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
    # The compiler may give a combined reduce-scatter the channel of a plain one beside it.
    channel = re.search(r"channel_id=(\d+)", attributes)
    identity = f"{channel.group(1)}/{instruction.opcode}" if channel else ""
    network = "dcn" if _spans_slices(instruction, slice_of_device) else "ici"
    return kind, network, identity


def _spans_slices(instruction: _Instruction, slice_of_device: Sequence[int]) -> bool:
    if len(set(slice_of_device)) < 2:
        return False
    return any(len({slice_of_device[d] for d in group}) > 1
               for group in _device_groups(instruction.attributes, len(slice_of_device)))


def _device_groups(attributes: str, devices: int) -> list[list[int]]:
    """The device groups of a collective: replica groups, or a permute's pairs."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    if pairs:
        return [[int(d) for d in pair.split(",")]
                for pair in re.findall(r"\{(\d+,\d+)", pairs.group(1) + "}")]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        return _mesh_groups(mesh.group(1), mesh.group(2))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
    if iota:
        return _iota_groups(*(tuple(int(d) for d in g.split(",")) if g else None
                              for g in iota.groups()))
    listed = re.search(r"replica_groups=\{(.*?)\}(?:,|$)", attributes + ",")
    groups = [[int(d) for d in g.split(",") if d] for g in
              re.findall(r"\{([\d,]*)\}", listed.group(1) + "}")] if listed else []
    return [g for g in groups if g] or [list(range(devices))]


def _mesh_groups(axes: str, selected: str) -> list[list[int]]:
    """Groups of XLA's mesh form `mesh['a'=2,'b'=4] {'b'}`: devices numbered row-major over
    the axes; a group is the devices that differ only along the selected axes."""
    sizes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", axes)]
    chosen = set(re.findall(r"'([^']+)'", selected))
    dims = [size for _, size in sizes]
    groups: dict[tuple[int, ...], list[int]] = {}
    for device in range(math.prod(dims)):
        index = _unravel(device, dims)
        fixed = tuple(i for i, (name, _) in zip(index, sizes, strict=True) if name not in chosen)
        groups.setdefault(fixed, []).append(device)
    return list(groups.values())


def _iota_groups(shape: tuple[int, ...], reshape: tuple[int, ...],
                 transpose: tuple[int, ...] | None) -> list[list[int]]:
    """XLA's compact replica groups `[G,S]<=[dims]T(perm)`: iota(dims), transposed,
    reshaped into G groups of S."""
    ids = list(range(math.prod(reshape)))
    if transpose:
        strides = [math.prod(reshape[k + 1:]) for k in range(len(reshape))]
        dims = [reshape[p] for p in transpose]
        ids = [sum(index * strides[p] for index, p in zip(_unravel(i, dims), transpose,
                                                             strict=True))
               for i in range(len(ids))]
    size = shape[-1]
    return [ids[k:k + size] for k in range(0, len(ids), size)]


def _unravel(flat: int, dims: Sequence[int]) -> list[int]:
    index = []
    for dim in reversed(dims):
        index.append(flat % dim)
        flat //= dim
    return index[::-1]


def _group_size(instruction: _Instruction, devices: int) -> int:
    if instruction.opcode.startswith("collective-permute"):
        return 2
    groups = _device_groups(instruction.attributes, devices)
    return max((len(g) for g in groups), default=1) if groups != [[]] else 1


def _bytes(kind: str, instruction: _Instruction, network: str) -> float:
    arrays = _array_bytes(instruction.shape)
    if network == "dcn" and instruction.opcode == "send":
        return arrays[0]  # (data, context, token)
    if instruction.opcode == "collective-permute-start":
        return arrays[0]  # (operand, result, u32, u32)
    if instruction.opcode.endswith("-start") and len(arrays) % 2 == 0 and len(arrays) > 1:
        half = len(arrays) // 2  # (operands..., results...)
        arrays = arrays[half:] if kind == "all-gather" else arrays[:half]
    total = sum(arrays)
    if kind == "reduce-scatter" and instruction.opcode.startswith("reduce-scatter"):
        total *= _group_size(instruction, 0)  # the op returns the shard; it takes it all in
    return total


def _array_bytes(shape: str) -> list[float]:
    """Bytes of each array in a result shape, e.g. "(bf16[8,128]{1,0}, u32[])"."""
    sizes = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape):
        count = math.prod(int(d) for d in dims.split(",") if d)
        sizes.append(count * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))
    return sizes


def _sent_share(kind: str, ways: int) -> float:
    """Share of an op's bytes a chip sends with a ring over `ways` chips."""
    if kind == "collective-permute":
        return 1.0
    share = (ways - 1) / ways if ways > 1 else 0.0
    return 2 * share if kind == "all-reduce" else share
