"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU.

    python -m healthfm_core.kernels.ct_attention.aot            # every specialisation, sm_80, sm_89, sm_90
    python -m healthfm_core.kernels.ct_attention.aot --json     # one JSON line per specialisation
    python -m healthfm_core.kernels.ct_attention.aot --pairwise # every pair of factor values (CI's set)

Each kernel is compiled twice over: as triton's launcher specialises it for the model's tensors
(``aligned``: every pointer 16-byte aligned and every stride a multiple of 16, what a training
launch passes: q, k, v are views of one projection, and the configs' widths are multiples of 16),
and with no such hint (any tensor). The two are different programs: with the hints triton vectorises the loads
and pipelines them as asynchronous copies, and register allocation (spills) differs too.

``triton.compile`` with a ``GPUTarget`` runs triton's whole pipeline (Python AST -> TTIR ->
TTGIR -> LLVM IR -> PTX) and then ``ptxas`` (shipped in triton's wheel) to a cubin: every stage a
launch on that architecture would run, except loading the cubin onto a device. Type errors of
the kind the interpreter cannot see (a literal typed fp64, a loop-carried value changing type)
fail here. tests/unit/test_ct_attention_aot.py runs this with the project's triton and with the
oldest supported one, each in its own process.

Each is compiled at the tiling the host code would launch on a card of that architecture with the
least shared memory a block (``SHARED_LIMIT``; ``tiling.fitted_config``), and the compiled
kernel's shared memory is checked against that limit (a launch asking for more is refused by the
driver, with no compile error to warn of it) and against ``tiling.shared_memory_bound``, the
estimate the host code chooses by.

Run with TRITON_INTERPRET unset: the kernels must be jitted in compiled mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from healthfm_core.kernels.ct_attention import kernels, tiling
from healthfm_core.kernels.ct_attention.jit import ensure_built, interpreting
from healthfm_core.kernels.ct_attention.launch import dot_precision
from healthfm_core.kernels.ct_attention.plan import SPAN_LIMIT

# The oldest triton the kernels are compiled with in CI (torch 2.11's CUDA wheels pin it); the
# newest is the project's own. pyproject's triton range is these two.
OLDEST_TRITON = "3.6.0"
ARCHES = (80, 89, 90)  # Ampere (A100), Ada (L4, L40S; sm_86's A10 and RTX 30 alike), Hopper (H100, H200)
# Shared memory a block may use (bytes, the driver's opt-in maximum), the least of any card of each
# architecture (CUDA C programming guide, "Technical specifications per compute capability").
SHARED_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
COMPONENTS = (1, 4)
HEAD_DIM = 64  # the paper model's (1,024 / 16 heads): the one every other factor is varied at
# The others, each compiled at the training launch on every architecture in every dtype (in CI's set
# too): tiny's and small's (16, 32), one masked (48: BLOCK_D 64), the larger tilings' (128, and 256,
# the largest the kernels take).
HEAD_DIMS = (16, 32, 48, 64, 128, 256)
KERNELS = ("_ct_fwd", "_ct_bwd_dkdv", "_ct_bwd_dq")
# (dtype, M, causal, aligned) of the model's training launches: bf16 autocast, the configs' four
# decay components, the time-causal backbone, views of one projection; at the head dims of the
# model configs (tiny, small, paper).
TRAINING_LAUNCH = ("bf16", 4, True, True)
TRAINING_HEAD_DIMS = (16, 32, 64)

# Pointer arguments by name: the tensors of the model's dtype, and the fixed-type ones the host
# code builds (times, mixture parameters, tile plan). Everything else not constexpr is a scalar.
_DATA_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FIXED_POINTERS = {
    "TQ": "*fp32",
    "TK": "*fp32",
    "LW": "*fp32",
    "RATE": "*fp32",
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "GLW": "*fp32",
    "GRATE": "*fp32",
    "QMIN": "*fp32",
    "QMAX": "*fp32",
    "KMIN": "*fp32",
    "KMAX": "*fp32",
    "KV": "*i8",
    "KLO": "*i32",
    "KSEP": "*i32",
    "KHI": "*i32",
    "QLO": "*i32",
    "QSEP": "*i32",
    "QHI": "*i32",
}
_FLOAT_SCALARS = {"sm_scale"}
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Specialisation:
    kernel: str
    arch: int
    dtype: str
    components: int
    causal: bool
    aligned: bool = True  # the launcher's hints for the model's tensors (module docstring)
    head_dim: int = HEAD_DIM

    def label(self) -> str:
        mode = "causal" if self.causal else "full"
        hints = "aligned" if self.aligned else "unaligned"
        return f"{self.kernel} sm_{self.arch} {self.dtype} D={self.head_dim} M={self.components} {mode} {hints}"

    def config(self) -> tiling.KernelConfig | None:
        """The tiling the host code launches on this architecture's smallest card (None: none fits,
        the dispatcher runs the reference there)."""
        return tiling.fitted_config(self.head_dim, DTYPES[self.dtype], SHARED_LIMIT[self.arch])


def all_specialisations(
    arches: tuple[int, ...] = ARCHES, dtypes: tuple[str, ...] = tuple(DTYPES)
) -> list[Specialisation]:
    """Every kernel x architecture x dtype x M x causal x alignment the launches can produce at the
    paper's head dim, the training dtype (bf16) first: a run cut short has then covered every kernel
    on every architecture. Then ``head_dim_specialisations``."""
    combos = itertools.product(dtypes, arches, KERNELS, COMPONENTS, (True, False), (True, False))
    return [
        Specialisation(kernel, arch, dtype, m, causal, aligned) for dtype, arch, kernel, m, causal, aligned in combos
    ] + head_dim_specialisations(arches, dtypes)


def head_dim_specialisations(
    arches: tuple[int, ...] = ARCHES, dtypes: tuple[str, ...] = tuple(DTYPES)
) -> list[Specialisation]:
    """Every kernel x architecture x dtype at each head dim but the paper's, as a training step
    launches it (M, causal, aligned of ``TRAINING_LAUNCH``): what the tiling and the shared memory
    it needs depend on (the head dim, the dtype's width, the card), every combination."""
    _, components, causal, aligned = TRAINING_LAUNCH
    combos = itertools.product(dtypes, arches, (d for d in HEAD_DIMS if d != HEAD_DIM), KERNELS)
    return [Specialisation(kernel, arch, dtype, components, causal, aligned, d) for dtype, arch, d, kernel in combos]


def pairwise_specialisations(
    arches: tuple[int, ...] = ARCHES, dtypes: tuple[str, ...] = tuple(DTYPES)
) -> list[Specialisation]:
    """Every kernel, on a subset of the other five factors (dtype, architecture, M, causal,
    alignment) at the paper's head dim in which every pair of their values appears at least once
    (8 of 48 per kernel for two dtypes), and ``head_dim_specialisations`` whole.

    A covering array, built greedily (the combination covering most uncovered pairs next, the
    first of equals) from the launches a training step makes (``TRAINING_LAUNCH``: bf16, causal,
    aligned, M = 4, on each architecture), in ``all_specialisations``' order. Each compile error
    seen so far came from one factor (a literal's type on every target) or two (a dtype on an
    architecture); the shared memory a launch needs comes from three (head dim, dtype, card), all
    of whose combinations are compiled. CI compiles this set and ``make test-slow`` every
    specialisation.
    """
    factors: tuple[tuple[Any, ...], ...] = (dtypes, arches, COMPONENTS, (True, False), (True, False))
    combos = list(itertools.product(*factors))

    def pairs(combo: tuple[Any, ...]) -> set[tuple[int, Any, int, Any]]:
        return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(factors)), 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    dtype, components, causal, aligned = TRAINING_LAUNCH
    chosen = {(dtype, arch, components, causal, aligned) for arch in arches} if dtype in dtypes else set()
    for combo in chosen:
        uncovered -= pairs(combo)
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.add(best)
        uncovered -= pairs(best)
    return [
        s
        for s in all_specialisations(arches, dtypes)
        if s.head_dim != HEAD_DIM or (s.dtype, s.arch, s.components, s.causal, s.aligned) in chosen
    ]


class NoTiling(Exception):
    """No tiling of this head dim and dtype fits the architecture's smallest card: the host code
    does not launch the kernel there (the dispatcher runs the reference)."""

    def __init__(self, spec: Specialisation) -> None:
        super().__init__(f"no tiling fits {SHARED_LIMIT[spec.arch]} bytes of shared memory a block")


def _signature(fn: Any, dtype: torch.dtype) -> dict[str, str]:
    """Triton's type string per parameter of ``fn`` (a JITFunction): an unknown name is an error,
    so a parameter added to a kernel must be typed here before the compile check passes."""
    data = "*" + _TRITON_DTYPE[dtype]
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in _DATA_POINTERS:
            sig[name] = data
        elif name in _FIXED_POINTERS:
            sig[name] = _FIXED_POINTERS[name]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name.islower() and name.startswith("s") or name in {"H", "NQ", "NK", "NQT", "NKT"}:
            sig[name] = "i32"  # strides and sizes
        else:
            raise TypeError(f"aot: no type for parameter {name!r} of {fn.__name__}; add it to aot.py")
    return sig


def _constexprs(fn: Any, spec: Specialisation, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, int]]:
    """The constexpr values and launch options the host code (``_CTAttention``) would use."""
    config = spec.config()
    if config is None:
        raise NoTiling(spec)
    forward = spec.kernel == "_ct_fwd"
    values: dict[str, Any] = {
        "D": spec.head_dim,
        "BLOCK_D": tiling.block_d(spec.head_dim),
        "BLOCK_M": config.block_m if forward else config.bwd_block_m,
        "BLOCK_N": config.block_n if forward else config.bwd_block_n,
        "M": spec.components,
        "M_POW2": tiling.next_power_of_2(spec.components),
        "CAUSAL": spec.causal,
        "SPAN": SPAN_LIMIT,
        "DOT_PREC": dot_precision(dtype),
        "PARAM_GRAD": True,
    }
    names = [p.name for p in fn.params if p.is_constexpr]
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"aot: no value for constexpr {missing} of {fn.__name__}; add it to aot.py")
    options = (
        {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if forward
        else {"num_warps": config.bwd_num_warps, "num_stages": config.bwd_num_stages}
    )
    return {n: values[n] for n in names}, options


def _launch_hints(signature: dict[str, str], spec: Specialisation) -> dict[tuple[int, ...], list[list[Any]]]:
    """The divisibility hints triton's launcher gives an aligned launch (``Specialisation.aligned``):
    16 for every pointer and stride. The sizes (H, NQ, NK, tile counts) get none: they are the
    batch's, often not multiples of 16."""
    if not spec.aligned:
        return {}
    names = list(signature)
    hinted = [n for n, kind in signature.items() if kind.startswith("*") or (kind == "i32" and n.startswith("s"))]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def compile_spec(spec: Specialisation) -> Any:
    """``triton.compile`` of one specialisation for its architecture, down to the cubin (raises
    what triton raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ensure_built()
    fn = getattr(kernels, spec.kernel)
    dtype = DTYPES[spec.dtype]
    constexprs, options = _constexprs(fn, spec, dtype)
    signature = _signature(fn, dtype)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_launch_hints(signature, spec))
    return triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=options)


def compile_one(spec: Specialisation) -> dict[str, Any]:
    """Compile one specialisation to a cubin; returns what ran (stages, sizes) or the error."""
    import triton

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result: dict[str, Any] = {
        "spec": spec.label(),
        "triton": triton.__version__,
        "shared_limit": SHARED_LIMIT[spec.arch],
    }
    try:
        compiled = compile_spec(spec)
    except NoTiling as exc:  # not a failure: nothing is launched there
        result.update(ok=True, launched=False, reason=str(exc))
    except Exception as exc:  # every failure is reported, the sweep goes on
        # triton's CompilationError puts the source excerpt first and the cause last.
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-1500:]}")
    else:
        ptx = compiled.asm.get("ptx", "")
        config = spec.config()
        assert config is not None  # compile_spec compiled it
        launch = config.forward if spec.kernel == "_ct_fwd" else config.backward
        result.update(
            ok=True,
            launched=True,
            tiling=list(launch),
            stages=[s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if s in compiled.asm],
            cubin_bytes=len(compiled.asm.get("cubin", b"")),
            shared_bytes=compiled.metadata.shared,
            shared_bound=tiling.shared_memory_bound(spec.kernel, launch, spec.head_dim, DTYPES[spec.dtype].itemsize),
            # Exponentials with the subnormal fix-up (tl.exp's lowering); the kernels use exp2, so 0.
            ex2_with_fixup=len(re.findall(r"\bex2\.approx\.f32\b", ptx)),
        )
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)  # with ptxas: steadier than wall on a loaded machine
    result["ptxas"] = _ptxas(spec.arch)
    return result


def problems(result: dict[str, Any]) -> list[str]:
    """What is wrong with one compile result (empty: nothing): a compile error, a pipeline cut
    short, an exponential with tl.exp's fix-up, more shared memory than the card has or than the
    bound the host code chose the tiling by."""
    if not result["ok"]:
        return [result["error"][-600:]]
    if not result["launched"]:
        return []
    found = []
    if result["stages"][-1] != "cubin" or result["cubin_bytes"] <= 0:
        found.append(f"stopped after {result['stages']}")
    if result["ex2_with_fixup"]:
        found.append(
            f"{result['ex2_with_fixup']} exponentials with the subnormal fix-up (tl.exp); the kernels' _exp uses "
            "exp2 (one MUFU op)"
        )
    if result["shared_bytes"] > min(result["shared_limit"], result["shared_bound"]):
        found.append(
            f"tiling {result['tiling']} takes {result['shared_bytes']} bytes of shared memory a block: the card "
            f"has {result['shared_limit']}, tiling.shared_memory_bound said {result['shared_bound']}"
        )
    return found


def _status(result: dict[str, Any]) -> str:
    found = problems(result)
    if found:
        return "FAILED " + "; ".join(found)[-300:]
    if not result["launched"]:
        return f"not launched: {result['reason']}"
    return f"ok {'/'.join(result['stages'])}, tiling {result['tiling']}, {result['shared_bytes']} B shared"


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ptxas(arch: int) -> str:
    """The ptxas triton used for the cubin stage: its own, shipped in the wheel, unless
    TRITON_PTXAS_PATH names another."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(arch).path)
    except (ImportError, RuntimeError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=int, choices=ARCHES, default=list(ARCHES))
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--json", action="store_true", help="one JSON object per specialisation")
    parser.add_argument(
        "--pairwise", action="store_true", help="a covering subset: every pair of factor values, each kernel"
    )
    args = parser.parse_args(argv)
    if interpreting():
        print("aot: TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    failed = 0
    chosen = pairwise_specialisations if args.pairwise else all_specialisations
    for spec in chosen(tuple(args.arch), tuple(args.dtype)):
        result = compile_one(spec)
        failed += bool(problems(result))
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            status = _status(result)
            print(
                f"{result['triton']} {result['spec']}: {status} ({result['seconds']} s, {result['cpu_seconds']} s CPU)",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
