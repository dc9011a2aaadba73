"""Where a compiled XLA CPU program spends its time, per class of operation.

`profile_jitted(fn, *args)` (or `profile(run, hlo_text)` for a program that is driven some other
way, e.g. the run loop's donated step) traces a few calls with `jax.profiler`, reads the trace
back (`jax.profiler.ProfileData`), and attributes the wall time of every traced HLO instruction
(thunk) to a class, read off the optimised HLO: the instruction's opcode or, for a fusion, the
opcodes it fuses:

  convolution   an instruction with a convolution in it
  dot           a matmul (dot, a YNNPACK dot fusion)
  elementwise   other loop fusions and elementwise ops (Adam, activations, scaling, ...)
  reduction     reduce / reduce-window (norms, sums, softmax denominators)
  layout        copies, transposes, pads, concatenations, slices (alone or fused with a
                scale or a conversion, e.g. a transposing uint8->float scale): data moved
  gather/scatter, random bits (threefry), control (while/conditional/call bodies' own time)

When several instructions run at once (XLA's thunk executor runs independent ones concurrently on
the intra-op pool), each instant is shared equally among them, so the classes add up to the time
the pool was busy. What no instruction's event covers is reported as *untraced*: Eigen's
convolutions and some dots finish on the pool after their thunk returns (their compute shows up
here, just before the next instruction that needs their result), and the runtime's dispatch gaps.

For each class it also sums the bytes the instructions read and write (their operand and result
shapes; for gathers and in-place updates not the indexed buffer), so memory-bound classes show an
effective bandwidth. CPU only: the GPU trace has other event names.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from typing import Callable

import jax

CLASSES = ("convolution", "dot", "elementwise", "reduction", "layout", "gather/scatter",
           "random bits", "control", "untraced")

_RUNTIME_EVENTS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "end: ")
_LAYOUT_OPS = {"fusion", "copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad",
               "broadcast", "parameter", "constant", "tuple", "get-tuple-element", "convert",
               "iota", "dynamic-slice"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?) "
                          r"([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass
class Instruction:
    opcode: str
    nbytes: int            # of its result
    operands: list
    calls: list            # computations it calls (fusion bodies, loop bodies)
    source: str            # the jax op_name metadata (empty if none)


def _nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Optimised HLO text -> ({computation: [instruction names]}, {name: Instruction})."""
    computations, instructions, current = {}, {}, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = computations.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            args = rest.split(")", 1)[0]
            calls = re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", rest)
            source = re.search(r'op_name="([^"]*)"', rest)
            instructions[name] = Instruction(opcode, _nbytes(shape), re.findall(r"%([\w.\-]+)", args),
                                             calls, source.group(1) if source else "")
            current.append(name)
    return computations, instructions


def _opcodes(comp: str, computations: dict, instructions: dict, depth: int = 0) -> set:
    out = set()
    for name in computations.get(comp, ()):
        ins = instructions[name]
        out.add(ins.opcode)
        if depth < 4:
            for c in ins.calls:
                out |= _opcodes(c, computations, instructions, depth + 1)
    return out


def op_class(name: str, computations: dict, instructions: dict) -> str:
    """The class (one of CLASSES) of the HLO instruction `name`."""
    ins = instructions.get(name)
    if ins is None:
        return "control"
    if ins.opcode in ("while", "conditional", "call"):
        return "control"
    ops = {ins.opcode}
    if ins.opcode == "fusion":
        for c in ins.calls:
            ops |= _opcodes(c, computations, instructions)
    if "convolution" in ops:
        return "convolution"
    if "dot" in ops:
        return "dot"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    if ops & {"scatter", "gather", "dynamic-update-slice"}:
        return "gather/scatter"
    if ops & {"rng-bit-generator", "xor", "shift-right-logical", "shift-left"}:
        return "random bits"
    if ops <= _LAYOUT_OPS | {"multiply", "convert"}:
        return "layout"
    return "elementwise"


@dataclasses.dataclass
class Profile:
    """Per call of the profiled program: `wall_ms` (from the first traced instruction's start to
    the last one's end, / calls), `classes` {class: ms} (adding up to wall_ms, `untraced`
    included), `moved_mb` {class: MB read + written by its instructions}, `top` [(ms,
    instruction, class, source)] (the costliest instructions)."""
    wall_ms: float
    classes: dict
    moved_mb: dict
    top: list

    def table(self, top: int = 8) -> str:
        lines = [f"{'class':14s} {'ms/call':>8s} {'share':>6s} {'MB moved':>9s} {'GB/s':>6s}"]
        for k in sorted(self.classes, key=lambda k: -self.classes[k]):
            ms, mb = self.classes[k], self.moved_mb.get(k, 0.0)
            rate = f"{mb / ms:6.1f}" if mb and ms > 0 else "     -"
            lines.append(f"{k:14s} {ms:8.2f} {100 * ms / self.wall_ms:5.0f}% "
                         f"{mb:9.1f} {rate}")
        lines.append("costliest instructions (ms/call, class, jax source):")
        for ms, name, klass, source in self.top[:top]:
            lines.append(f"  {ms:6.2f}  {name:28s} {klass:12s} {source[-70:]}")
        return "\n".join(lines)


def _moved_bytes(ins: Instruction, klass: str, instructions: dict) -> int:
    """Bytes an instruction reads and writes: its operands and result, except that a gather or
    an in-place update (scatter, dynamic-update-slice) touches only part of the buffer it
    indexes, so the buffer-sized operands and result are left out."""
    sizes = [ins.nbytes] + [instructions[o].nbytes for o in ins.operands if o in instructions]
    if klass == "gather/scatter":
        sizes = [b for b in sizes if b < max(sizes)] or sizes[:1]
    return sum(sizes)


def profile(run: Callable[[int], None], hlo_text: str, calls: int = 10) -> Profile:
    """Profiles `run(calls)` (which must make `calls` calls of the program whose optimised HLO
    is `hlo_text` and block on the last): see the module docstring."""
    from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
    computations, instructions = parse_hlo(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            run(calls)
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(files[-1])
        events = []
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for e in line.events:
                    if not e.name.startswith(_RUNTIME_EVENTS) and e.name in instructions:
                        events.append((e.start_ns, e.start_ns + e.duration_ns, e.name))
    if not events:
        raise RuntimeError("the trace holds no instruction of the program (not an XLA CPU run?)")
    # share each instant among the instructions running then
    share = collections.defaultdict(float)
    bounds = sorted({t for s, e, _ in events for t in (s, e)})
    events.sort()
    active, i = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        while i < len(events) and events[i][0] <= a:
            active.append(events[i])
            i += 1
        active = [ev for ev in active if ev[1] > a]
        for ev in active:
            share[ev[2]] += (b - a) / len(active)
    counts = collections.Counter(n for _, _, n in events)
    # from the first instruction's start to the last one's end: the calls back to back
    wall_ms = (max(e for _, e, _ in events) - events[0][0]) / 1e6 / calls
    classes = dict.fromkeys(CLASSES, 0.0)
    moved = dict.fromkeys(CLASSES, 0.0)
    top = []
    for name, ns in share.items():
        klass = op_class(name, computations, instructions)
        ms = ns / 1e6 / calls
        classes[klass] += ms
        ins = instructions[name]
        if ins.opcode not in ("while", "conditional", "call"):
            moved[klass] += _moved_bytes(ins, klass, instructions) * counts[name] / calls / 1e6
        top.append((ms, name, klass, ins.source))
    classes["untraced"] = max(0.0, wall_ms - sum(classes.values()))
    classes = {k: v for k, v in classes.items() if v > 0.005}
    top.sort(reverse=True)
    return Profile(wall_ms=wall_ms, classes=classes, moved_mb=moved, top=top)


def profile_jitted(fn, *args, calls: int = 10) -> Profile:
    """Profiles `calls` calls of the jitted `fn(*args)` (not donating: the same args each call)
    after one warm-up call."""
    hlo = fn.lower(*args).compile().as_text()
    jax.block_until_ready(fn(*args))

    def run(k):
        out = None
        for _ in range(k):
            out = fn(*args)
        jax.block_until_ready(out)
    return profile(run, hlo, calls)
