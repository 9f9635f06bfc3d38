"""benchmarks/ct_attention_sass.py: the loops it reads from a SASS listing, and (slow) one kernel
compiled and counted with the cuobjdump in triton's wheel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ct_attention_sass import Loop, count, loops_of  # noqa: E402

from healthfm_core.kernels.ct_attention import aot  # noqa: E402
from healthfm_core.kernels.ct_attention.jit import interpreting  # noqa: E402


def _listing(lines: list[tuple[int, str]]) -> str:
    """SASS as cuobjdump prints it: the address in a comment, an optional predicate, the op."""
    return "\n".join(f"        /*{address:04x}*/                   {op} ;  /* 0x000 */" for address, op in lines)


def test_loops_are_the_two_largest_backward_branches_in_address_order() -> None:
    sass = _listing(
        [
            (0x0000, "MOV R1, c[0x0][0x28]"),
            # a small loop ptxas might make: left out
            (0x0010, "IADD3 R2, R2, 0x1, RZ"),
            (0x0020, "@P0 BRA 0x10"),
            # the first tile loop: 4 instructions, one MUFU, a spill store and load
            (0x0030, "MUFU.EX2 R3, R4"),
            (0x0040, "STL [R1], R3"),
            (0x0050, "LDL R5, [R1]"),
            (0x0060, "@P1 BRA 0x30"),
            # a forward branch is no loop
            (0x0070, "@P2 BRA 0xb0"),
            # the second tile loop: 5 instructions, two MUFU
            (0x0080, "MUFU.EX2 R6, R7"),
            (0x0090, "@!P3 MUFU.EX2 R8, R9"),
            (0x00A0, "FFMA R6, R6, R8, R6"),
            (0x00B0, "FADD R6, R6, R6"),
            (0x00C0, "@P4 BRA 0x80"),
            (0x00D0, "EXIT"),
        ]
    )
    assert loops_of(sass) == [Loop(4, 1, 2), Loop(5, 2, 0)]


@pytest.mark.slow
def test_a_compiled_kernel_is_counted_with_its_bulk_loop_named() -> None:
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: nothing is compiled")
    forward = count(aot.Specialisation("_ct_fwd", 90, "bf16", 4, True, True))
    assert forward.registers > 0 and forward.stack_bytes >= 0
    assert forward.bulk is not None and forward.planned is not None
    # The bulk (one factorised path, no branch) is the smaller body; both run the softmax's exp.
    assert 0 < forward.bulk.instructions < forward.planned.instructions
    assert forward.bulk.mufu > 0
