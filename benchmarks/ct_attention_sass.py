"""What the GPU would execute of the fused kernel, counted without a GPU (issue 41).

    python benchmarks/ct_attention_sass.py                         # sm_90 and sm_80, bf16, causal, M 1 and 4
    python benchmarks/ct_attention_sass.py --baseline HEAD~1       # and another revision's kernels, same run
    python benchmarks/ct_attention_sass.py --arch 90 --m 4 --unaligned

Each kernel is compiled as a training launch compiles it (``aot.compile_spec``: the launcher's
alignment hints, the default tiles) down to the cubin with the ptxas in triton's wheel, and
disassembled with the cuobjdump beside it. Per kernel: registers a thread and bytes spilled to
the stack; per loop over tiles (each backward branch of the SASS), the static instruction count
of its body, of which MUFU (exp2, the special-function unit: 16 a clock per SM on Hopper against 4
warp-instructions issued a clock) and local-memory loads and stores (spills inside the loop).

The loop that matters is the bulk: ~97% of the tile pairs at N = 4,096 with sorted times
(docs/performance.md, "Which path the kernel takes"). It runs once per tile pair with 4 warps,
so its instruction count is, to first order, the clocks of issue a tile pair costs an SM (4
schedulers), against ~256 clocks of tensor-core work for the forward's two 64 x 64 x 64
products. Static counts are not times: branches inside a loop body count whole, and memory
latency is not in them. They compare two versions of the kernels on equal terms; the GPU
decides (benchmarks/ct_attention.py, ct_attention_tune.py on a lent GPU).

The loops are named from the kernels' source order: the forward and dQ walk their bulk first,
dK/dV its planned tiles first; the planned loop (both paths, a branch per tile pair) is the larger
body, which the script checks.

With ``--baseline REV`` the revision's kernels are compiled in a second process, from its own
``healthfm_core`` (``git archive``) with its own ``aot``, and each loop's SASS is compared with this
tree's, instruction by instruction (addresses and encodings aside): "same" is the same SASS; "same
but registers" the same instructions whose register numbers differ (ptxas allocated them
otherwise, as a different order of constants in the IR can make it). A change that only moves
code between files or functions compiles to the same bulk loops.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The tree whose kernels are counted: this one, or (the baseline's process) a revision's, extracted.
TREE_ENV = "CT_ATTENTION_SASS_TREE"
sys.path.insert(0, os.environ.get(TREE_ENV) or str(ROOT))

from healthfm_core.kernels.ct_attention import aot  # noqa: E402

BULK_FIRST = {"_ct_fwd": True, "_ct_bwd_dq": True, "_ct_bwd_dkdv": False}
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)(.*)$")


@dataclass(frozen=True)
class Loop:
    instructions: int
    mufu: int
    local_memory: int  # LDL + STL: spill traffic inside the loop
    # The body's instructions (predicate, op and operands; no address or encoding), to compare
    # two versions' loops with: not part of a count's equality.
    body: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def sameness(self, other: Loop) -> str:
        """How this loop's SASS compares with ``other``'s: "same", "same but registers", "differs"."""
        if self.body == other.body:
            return "same"
        registers = re.compile(r"\bU?R\d+\b")
        if [registers.sub("R", i) for i in self.body] == [registers.sub("R", i) for i in other.body]:
            return "same but registers"
        return "differs"


@dataclass(frozen=True)
class KernelCount:
    registers: int
    stack_bytes: int
    bulk: Loop | None
    planned: Loop | None


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def loops_of(sass: str) -> list[Loop]:
    """The two largest loops of a SASS listing (a backward branch and the body it closes), in
    address order."""
    code = []
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            text = line.split("*/", 1)[1].split(";")[0].strip()
            code.append((int(match.group(1), 16), match.group(2), match.group(3), text))
    found = []
    for address, op, rest, _ in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= address:
            continue
        start = int(target.group(1), 16)
        body = [(o, text) for a, o, _, text in code if start <= a <= address]
        ops = collections.Counter(o.split(".")[0] for o, _ in body)
        # The branch targets inside the loop are addresses: the same loop elsewhere has others.
        texts = tuple(re.sub(r"0x[0-9a-f]+", "ADDR", t) if o.startswith("BRA") else t for o, t in body)
        found.append((address, Loop(len(body), ops["MUFU"], ops["LDL"] + ops["STL"], texts)))
    # The two tile loops are the two largest bodies; any smaller loop ptxas made is left out.
    largest = sorted(found, key=lambda entry: -entry[1].instructions)[:2]
    return [loop for _, loop in sorted(largest, key=lambda entry: entry[0])]


def count(spec: aot.Specialisation) -> KernelCount:
    compiled = aot.compile_spec(spec)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin.name], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name], check=True, capture_output=True, text=True)
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    found = loops_of(sass.stdout)
    bulk = planned = None
    if len(found) == 2:
        first, second = found if BULK_FIRST[spec.kernel] else found[::-1]
        bulk, planned = first, second
        if bulk.instructions > planned.instructions:  # the source order did not hold: say so, do not guess
            bulk = planned = None
    return KernelCount(
        int(registers.group(1)) if registers else -1, int(stack.group(1)) if stack else -1, bulk, planned
    )


def counts(specs: list[aot.Specialisation]) -> list[KernelCount]:
    """Each specialisation compiled and counted in this process (this tree's kernels)."""
    out = []
    for spec in specs:
        out.append(count(spec))
        print(".", end="", flush=True, file=sys.stderr)
    return out


def revision_counts(revision: str, argv: list[str]) -> list[KernelCount]:
    """The counts of a git revision's kernels: its ``healthfm_core`` extracted into a temporary
    folder and this script run there (``--json``) in a process of its own, with the same options."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "healthfm_core"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory() as tree:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        env = {**os.environ, TREE_ENV: tree}
        out = subprocess.run(
            [sys.executable, __file__, "--json", *argv], check=True, capture_output=True, text=True, env=env
        ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [
        KernelCount(
            row["registers"],
            row["stack_bytes"],
            *(Loop(**{**row[k], "body": tuple(row[k]["body"])}) if row[k] else None for k in ("bulk", "planned")),
        )
        for row in rows
    ]


def _cell(loop: Loop | None) -> str:
    if loop is None:
        return "?"
    spill = f", {loop.local_memory} LDL/STL" if loop.local_memory else ""
    return f"{loop.instructions} ({loop.mufu} MUFU{spill})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=int, choices=aot.ARCHES, default=[90, 80])
    parser.add_argument("--m", nargs="+", type=int, choices=aot.COMPONENTS, default=[4, 1])
    parser.add_argument("--dtype", choices=list(aot.DTYPES), default="bf16")
    parser.add_argument("--full", action="store_true", help="not time-causal")
    parser.add_argument("--unaligned", action="store_true", help="without the launcher's alignment hints")
    parser.add_argument("--baseline", help="a git revision whose kernels are counted too, in a process of its own")
    parser.add_argument("--json", action="store_true", help="one JSON line of counts a specialisation (no table)")
    args = parser.parse_args(argv)
    specs = [
        aot.Specialisation(kernel, arch, args.dtype, m, not args.full, not args.unaligned)
        for arch in args.arch
        for m in args.m
        for kernel in aot.KERNELS
    ]
    if args.json:  # the baseline's process (revision_counts), whose aot may be older than this script
        for c in counts(specs):
            print(json.dumps(asdict(c)), flush=True)
        return 0
    if aot.interpreting():
        print("ct_attention_sass: TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}, {args.dtype}, {'full' if args.full else 'causal'}, "
          f"{'no alignment hints' if args.unaligned else 'aligned (a training launch)'}, default tiles")  # fmt: skip
    variants = {"this tree": counts(specs)}
    print(file=sys.stderr)
    if args.baseline:
        options = ["--arch", *map(str, args.arch), "--m", *map(str, args.m), "--dtype", args.dtype]
        options += ["--full"] * args.full + ["--unaligned"] * args.unaligned
        variants = {args.baseline: revision_counts(args.baseline, options), **variants}
    rows = [(spec, {name: found[i] for name, found in variants.items()}) for i, spec in enumerate(specs)]
    names = list(variants)
    header = "| kernel | sm | M | " + " | ".join(
        f"{n}: registers + stack bytes | {n}: bulk loop, instructions | {n}: planned loop" for n in names
    )
    if args.baseline:
        header += " | bulk loop, this tree / baseline | bulk loop's SASS | planned loop's SASS"
    print(header + " |")
    print("|" + "---|" * (3 + 3 * len(names) + (3 if args.baseline else 0)))
    for spec, found in rows:
        cells = [spec.kernel, str(spec.arch), str(spec.components)]
        for n in names:
            c = found[n]
            cells += [f"{c.registers} + {c.stack_bytes}", _cell(c.bulk), _cell(c.planned)]
        if args.baseline:
            before, now = found[args.baseline].bulk, found["this tree"].bulk
            cells.append(f"x{now.instructions / before.instructions:.2f}" if before and now else "?")
            cells.append(now.sameness(before) if before and now else "?")
            planned_before, planned_now = found[args.baseline].planned, found["this tree"].planned
            cells.append(planned_now.sameness(planned_before) if planned_before and planned_now else "?")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
