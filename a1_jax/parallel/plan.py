"""What one jitted step costs each device, read from its compiled program: memory by kind and bytes communicated.

`step_plan(step, *args)` lowers and compiles `step` for `args` given as `jax.ShapeDtypeStruct`s with shardings, so
the plan of the 5B model on a pod needs no memory for its weights, only a compiler for the target devices.

Memory comes from `compiled.memory_analysis()` (per device: the compiled program is the per-device SPMD program).
Communication is estimated from the collectives of `compiled.as_text()`: for each all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute, the bytes of its operands times the times it runs per step. An
instruction inside a `while` body (a scanned layer stack) runs once per trip (XLA's `known_trip_count`, else the
loop condition `counter < N`); a loop whose trip count neither gives is counted once and reported in
`unknown_trip_counts`. Both branches of a conditional are counted. A TPU reduce-scatter (an all-reduce and a slice
fused into an `all-reduce-scatter` computation) counts as a reduce-scatter of the all-reduce's operand.
Operand bytes are what each device puts into the collective; the bytes on the wire depend on the algorithm (a ring
all-reduce moves about twice its operand).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
    count: int  # executions per step
    operand_bytes: int  # per device, summed over the executions


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Per-device bytes of one step: memory by kind (from XLA) and collective traffic (from the HLO)."""

    argument_bytes: int  # inputs: parameters, optimizer state, batch
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (counted once, in the arguments)
    temp_bytes: int  # activations kept for the backward pass, workspace
    generated_code_bytes: int
    collectives: dict[str, CollectiveCost]
    unknown_trip_counts: int  # loops whose collectives were counted once only

    @property
    def peak_bytes(self) -> int:
        """Live at once at the worst point, as XLA plans it: arguments, outputs not aliased, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def communicated_bytes(self) -> int:
        return sum(c.operand_bytes for c in self.collectives.values())

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes,
                "communicated_bytes": self.communicated_bytes}


def _bytes_of(shape_text: str) -> int:
    """Bytes of an HLO shape (`f32[4,64]{1,0}`, `pred[]`, a tuple of them); sub-byte types round up per array."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype == "token":
            continue
        width = re.search(r"\d+", dtype)  # f32, bf16, s4, f8e4m3fn, c64 (both halves); pred is one byte
        bits = int(width.group()) if width and dtype != "pred" else 8
        total += math.ceil(math.prod(int(d) for d in dims.split(",") if d) * bits / 8)
    return total


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text: {text[start:start + 80]}")


class _Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: list[str]  # names of the operand instructions
    arguments: str  # the text between the opcode's parentheses
    attributes: str  # the text after them


def _parse_instruction(line: str) -> _Instruction | None:
    """`%name = shape opcode(operands), attributes`; None for anything else."""
    match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not match:
        return None
    pos = match.end()
    end = _balanced(line, pos) if line[pos] == "(" else line.index(" ", pos)
    opcode = re.match(r"\s*([a-z][\w\-]*)\(", line[end:])
    if not opcode:
        return None
    open_at = end + opcode.end() - 1
    close_at = _balanced(line, open_at)
    arguments = line[open_at + 1:close_at - 1]
    return _Instruction(match.group(1), line[pos:end], opcode.group(1), re.findall(r"%([\w.\-]+)", arguments),
                        arguments, line[close_at:])


def _computations(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """Instructions by computation name, and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None and (instruction := _parse_instruction(line)):
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _trip_count(loop: _Instruction, computations: dict[str, list[_Instruction]]) -> int | None:
    """Trips of a `while`: XLA's `known_trip_count`, else a condition `counter < N` with an integer constant N
    (how jax lowers `scan` and static `fori_loop`: the counter starts at 0 and steps by 1); None if neither."""
    known = _TRIP_COUNT.search(loop.attributes)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", loop.attributes)
    instructions = computations.get(condition.group(1), []) if condition else []
    constants = {i.name: int(i.arguments) for i in instructions
                 if i.opcode == "constant" and re.match(r"[su]\d+\[\]", i.shape) and i.arguments.isdigit()}
    by_name = {i.name: i for i in instructions}
    for i in instructions:
        if i.opcode == "compare" and "direction=LT" in i.attributes and len(i.operands) == 2:
            counter, bound = (by_name.get(i.operands[0]), i.operands[1])
            if bound in constants and counter is not None and counter.opcode == "get-tuple-element":
                return constants[bound]
    return None


def _callees(instruction: _Instruction) -> list[str]:
    called = _CALLED.findall(instruction.attributes)
    for branches in _BRANCHES.findall(instruction.attributes):
        called += re.findall(r"%?([\w.\-]+)", branches)
    return called


def collective_costs(hlo_text: str) -> tuple[dict[str, CollectiveCost], int]:
    """Per-step count and operand bytes of each collective kind in a compiled HLO module's text, and the number of
    loops containing collectives whose trip count is unknown (counted once)."""
    computations, entry = _computations(hlo_text)

    @functools.cache
    def has_collective(name: str) -> bool:
        return any(_kind(name, i.opcode) or any(has_collective(c) for c in _callees(i))
                   for i in computations.get(name, ()))

    # Runs per step of every computation, from the entry down the call graph (HLO has no recursion).
    runs: dict[str, int] = {}
    unknown = 0

    def visit(name: str, times: int) -> None:
        nonlocal unknown
        runs[name] = runs.get(name, 0) + times
        for instruction in computations.get(name, ()):
            trips = 1
            if instruction.opcode == "while":
                trips = _trip_count(instruction, computations)
                unknown += trips is None and any(has_collective(c) for c in _callees(instruction))
                trips = trips or 1
            for callee in _callees(instruction):
                visit(callee, times * trips)

    visit(entry, 1)
    costs = {kind: [0, 0] for kind in COLLECTIVES}
    for name, instructions in computations.items():
        shapes = {i.name: i.shape for i in instructions}
        for instruction in instructions:
            kind = _kind(name, instruction.opcode)
            if kind and runs.get(name):
                costs[kind][0] += runs[name]
                costs[kind][1] += runs[name] * sum(_bytes_of(shapes[o]) for o in instruction.operands if o in shapes)
    return {kind: CollectiveCost(*c) for kind, c in costs.items() if c[0]}, unknown


def _kind(computation: str, opcode: str) -> str | None:
    """The collective an instruction performs, if any. The TPU compiler writes a reduce-scatter as an all-reduce
    plus a slice inside a fusion computation named `all-reduce-scatter...`."""
    kind = opcode.removesuffix("-start")
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
        return "reduce-scatter"
    return kind if kind in COLLECTIVES else None


def plan_of(compiled: Any) -> StepPlan:
    """The plan of an already compiled function (`jax.jit(f).lower(...).compile()`)."""
    memory = compiled.memory_analysis()
    if memory is None:
        raise ValueError("this backend reports no memory analysis for compiled programs")
    costs, unknown = collective_costs(compiled.as_text())
    return StepPlan(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
                    alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                    generated_code_bytes=int(memory.generated_code_size_in_bytes), collectives=costs,
                    unknown_trip_counts=unknown)


def step_plan(step: Any, *args: Any, **kwargs: Any) -> StepPlan:
    """Lowers and compiles the jitted `step` for `args` (ShapeDtypeStructs with shardings, or arrays) and plans it."""
    return plan_of(step.lower(*args, **kwargs).compile())
