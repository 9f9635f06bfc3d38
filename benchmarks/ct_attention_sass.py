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
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from healthfm_core.kernels.ct_attention import aot  # noqa: E402

KERNEL_FILE = "healthfm_core/kernels/ct_attention/triton.py"
BULK_FIRST = {"_ct_fwd": True, "_ct_bwd_dq": True, "_ct_bwd_dkdv": False}
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)(.*)$")


@dataclass(frozen=True)
class Loop:
    instructions: int
    mufu: int
    local_memory: int  # LDL + STL: spill traffic inside the loop


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
            code.append((int(match.group(1), 16), match.group(2), match.group(3)))
    found = []
    for address, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= address:
            continue
        body = [o for a, o, _ in code if int(target.group(1), 16) <= a <= address]
        ops = collections.Counter(o.split(".")[0] for o in body)
        found.append((address, Loop(len(body), ops["MUFU"], ops["LDL"] + ops["STL"])))
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


def load_kernels(revision: str, into: Path) -> ModuleType:
    """The kernel module of a git revision, loaded beside this tree's (same contract and aot)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{KERNEL_FILE}"], check=True, capture_output=True, text=True
    ).stdout
    path = into / f"ct_attention_triton_{re.sub(r'[^A-Za-z0-9]', '_', revision)}.py"
    path.write_text(source)
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return module


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
    parser.add_argument("--baseline", help="a git revision whose kernels are counted too, same run")
    args = parser.parse_args(argv)
    if aot.kernels.interpreting():
        print("ct_attention_sass: TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}, {args.dtype}, {'full' if args.full else 'causal'}, "
          f"{'no alignment hints' if args.unaligned else 'aligned (a training launch)'}, default tiles")  # fmt: skip
    variants = {"this tree": aot.kernels}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            variants = {args.baseline: load_kernels(args.baseline, Path(tmp)), **variants}
        rows = []
        for arch in args.arch:
            for m in args.m:
                for kernel in aot.KERNELS:
                    spec = aot.Specialisation(kernel, arch, args.dtype, m, not args.full, not args.unaligned)
                    counts = {}
                    for name, module in variants.items():
                        aot.kernels = module
                        counts[name] = count(spec)
                    rows.append((spec, counts))
                    print(".", end="", flush=True, file=sys.stderr)
        aot.kernels = variants["this tree"]
    print(file=sys.stderr)
    names = list(variants)
    header = "| kernel | sm | M | " + " | ".join(
        f"{n}: registers + stack bytes | {n}: bulk loop, instructions | {n}: planned loop" for n in names
    )
    if args.baseline:
        header += " | bulk loop, this tree / baseline"
    print(header + " |")
    print("|" + "---|" * (3 + 3 * len(names) + (1 if args.baseline else 0)))
    for spec, counts in rows:
        cells = [spec.kernel, str(spec.arch), str(spec.components)]
        for n in names:
            c = counts[n]
            cells += [f"{c.registers} + {c.stack_bytes}", _cell(c.bulk), _cell(c.planned)]
        if args.baseline:
            before, now = counts[args.baseline].bulk, counts["this tree"].bulk
            cells.append(f"x{now.instructions / before.instructions:.2f}" if before and now else "?")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
