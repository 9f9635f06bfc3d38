"""Every Triton kernel compiles for sm_80, sm_89 and sm_90 with every triton the project supports, and fits.

No GPU needed: ``healthfm_core.kernels.ct_attention.aot`` runs ``triton.compile`` with a
``GPUTarget`` down to the cubin (triton's wheel ships ptxas). The interpreter tests cannot see
this class of error: triton 3.6 typed a ``1e-38`` literal fp64 and refused the forward kernel on
every GPU while the interpreter ran it.

Two tritons: the project's (the venv's) and the oldest supported, ``OLDEST_TRITON``, the one
torch 2.11's CUDA wheels bring. ``make triton-oldest`` installs it beside the project into
``.cache/triton-<version>`` (ignored by git; CI's slow stage does this first). Each compiles in
its own process, with a fresh triton cache so that nothing is taken from an earlier run.

Every specialisation by default (234 a triton: at the paper's head dim every dtype, architecture,
M, causal or not, with and without the launcher's alignment hints; every other head dim as a
training step launches it); with ``HEALTHFM_AOT_PAIRWISE=1`` (CI's slow stage) the covering
subset in which every pair of factor values appears for each kernel at the paper's head dim, and
every other head dim whole (114 a triton). Each compiled kernel is checked for more: none of its
exponentials may carry tl.exp's subnormal fix-up, and the shared memory it asks for must be within
its card's (sm_89's 99 KiB for the Ada and sm_86 cards, the A100's 163 KiB, the H100's 227 KiB) and
within ``tiling.shared_memory_bound``, by which the host code picks a tiling for the card it runs
on. A tiling the driver refuses is no compile error: only this check sees it without a GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from healthfm_core.kernels.ct_attention.aot import (
    ARCHES,
    HEAD_DIM,
    HEAD_DIMS,
    KERNELS,
    OLDEST_TRITON,
    TRAINING_HEAD_DIMS,
    TRAINING_LAUNCH,
    Specialisation,
    all_specialisations,
    head_dim_specialisations,
    pairwise_specialisations,
    problems,
)

REPO = Path(__file__).resolve().parents[2]
OLDEST_DIR = Path(os.environ.get("HEALTHFM_TRITON_OLDEST_DIR") or REPO / ".cache" / f"triton-{OLDEST_TRITON}")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# The dtypes the trainer hands the kernels on a GPU: bf16 (autocast) and fp32. fp16 compiles too
# (the CLI's default covers it: 144 of 144 with both tritons, docs/performance.md) but costs CI a
# third more; HEALTHFM_AOT_DTYPES="bf16 fp32 fp16" checks it here.
DTYPES = tuple(os.environ.get("HEALTHFM_AOT_DTYPES", "bf16 fp32").split())
PAIRWISE = os.environ.get("HEALTHFM_AOT_PAIRWISE", "").strip() == "1"
# A hang guard, not a speed limit: about 7 min on CI's two idle cores, 55 min measured with the
# machine at a load of 15; pyproject's 30-minute per-test guard would cut a loaded machine short.
HANG_GUARD_S = 3 * 3600


def _start(extra_path: Path | None, cache: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(extra_path)] if extra_path is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO)])
    env["TRITON_CACHE_DIR"] = str(cache)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, stated: silences its warning
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "healthfm_core.kernels.ct_attention.aot",
            "--json",
            "--dtype",
            *DTYPES,
            *(["--pairwise"] if PAIRWISE else []),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(proc: subprocess.Popen[str]) -> list[dict]:
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows, f"the compile run printed no result (exit {proc.returncode}):\n{err[-4000:]}"
    return rows


@pytest.mark.slow
@pytest.mark.timeout(HANG_GUARD_S + 600)
def test_every_kernel_compiles_to_cubin_with_the_project_and_the_oldest_triton(tmp_path: Path) -> None:
    if not (OLDEST_DIR / "triton").is_dir():
        message = (
            f"triton {OLDEST_TRITON} is not installed at {OLDEST_DIR}: run `make triton-oldest` "
            "(the kernels are then NOT checked against the oldest supported triton)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # Both at once: one process each, so two cores halve the wall time.
    runs = {"project": _start(None, tmp_path / "project"), OLDEST_TRITON: _start(OLDEST_DIR, tmp_path / "oldest")}
    chosen = pairwise_specialisations if PAIRWISE else all_specialisations
    expected = [s.label() for s in chosen(dtypes=DTYPES)]
    try:
        failures = _check(runs, expected)
    finally:  # a failed check or a timeout leaves no compiler running
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, f"{len(failures)} of {2 * len(expected)} did not compile:\n" + "\n".join(failures)


def _check(runs: dict[str, subprocess.Popen[str]], expected: list[str]) -> list[str]:
    failures = []
    for name, proc in runs.items():
        rows = _results(proc)
        versions = {r["triton"] for r in rows}
        if name == OLDEST_TRITON:
            assert versions == {OLDEST_TRITON}, f"{OLDEST_DIR} holds triton {versions}, not {OLDEST_TRITON}"
        assert [r["spec"] for r in rows] == expected, f"triton {versions}: not every specialisation was tried"
        failures += [f"triton {r['triton']} {r['spec']}: {problem}" for r in rows for problem in problems(r)]
        # What a site's model launches always has a tiling that fits, on every card.
        for r in rows:
            if not r["launched"] and any(f" D={d} " in r["spec"] for d in TRAINING_HEAD_DIMS):
                failures.append(f"triton {r['triton']} {r['spec']}: {r['reason']}")
    return failures


@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("bf16", "fp32", "fp16")])
def test_the_pairwise_set_holds_every_pair_of_factor_values_for_each_kernel(dtypes: tuple[str, ...]) -> None:
    everything = all_specialisations(dtypes=dtypes)
    chosen = pairwise_specialisations(dtypes=dtypes)
    assert [s for s in everything if s in chosen] == chosen  # a subset, in the full set's order
    at_paper = [s for s in everything if s.head_dim == HEAD_DIM]
    assert len([s for s in chosen if s.head_dim == HEAD_DIM]) < len(at_paper) / 4

    def pairs(specs: list) -> set:
        rows = [(s.dtype, s.arch, s.components, s.causal, s.aligned) for s in specs]
        return {(i, r[i], j, r[j]) for r in rows for i, j in itertools.combinations(range(5), 2)}

    dtype, components, causal, aligned = TRAINING_LAUNCH
    for kernel in KERNELS:
        assert pairs([s for s in chosen if s.kernel == kernel]) == pairs(at_paper), kernel
        for arch in ARCHES:  # what a training step launches is always compiled, at every model's head dim
            for head_dim in TRAINING_HEAD_DIMS:
                assert Specialisation(kernel, arch, dtype, components, causal, aligned, head_dim) in chosen
    # Every head dim on every card in every dtype: the shared memory a tiling needs depends on all three.
    by_head_dim = head_dim_specialisations(dtypes=dtypes)
    assert {(s.kernel, s.arch, s.dtype, s.head_dim) for s in by_head_dim} == set(
        itertools.product(KERNELS, ARCHES, dtypes, [d for d in HEAD_DIMS if d != HEAD_DIM])
    )
    assert set(by_head_dim) <= set(chosen)
