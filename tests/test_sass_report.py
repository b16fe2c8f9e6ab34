"""benchmarks/sass_report.py: the SASS parsing on a fixed listing, and (where nvcc and nvdisasm are
installed, as in CI) a real compile of a small translation unit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Imported with benchmarks/ on sys.path only for the import: left there, its kernels.py would
# shadow Hugging Face's `kernels` package for the rest of the session (see conftest.py).
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import sass_report  # noqa: E402
finally:
    sys.path.remove(str(REPO / "benchmarks"))

# A made-up nvdisasm -c listing: a loop of 5 instructions (2 FFMA) with a barrier-delimited
# stretch inside, a forward branch, and predicated instructions.
LISTING = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   FFMA R2, R3, R4, R2 ;
        /*0030*/               @P0 FFMA R5, R3, R4, R5 ;
        /*0040*/               @!P1 BRA `(.L_x_1) ;
        /*0050*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
.L_x_1:
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/               @P2 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""


def test_parse_loops_and_segments():
    instructions, labels = sass_report.parse(LISTING.splitlines())
    assert len(instructions) == 9 and labels == {"L_x_0": 0x10, "L_x_1": 0x60}
    assert [sass_report.opcode(t) for _, t in instructions[2:5]] == ["FFMA", "FFMA", "BRA"]
    (loop,) = sass_report.loops(instructions, labels)  # the forward branch is no loop
    assert (loop["start"], loop["end"], loop["instructions"], loop["ffma"]) == ("0x10", "0x70", 7, 2)
    assert loop["per_ffma"] == 3.5 and loop["top"]["BAR"] == 2
    (segment,) = sass_report.segments(instructions)
    assert (segment["start"], segment["instructions"], segment["ffma"]) == ("0x10", 5, 2)


def test_report_of_a_translation_unit(tmp_path):
    if sass_report.find_tool("nvcc") is None or sass_report.find_tool("nvdisasm") is None:
        pytest.skip("needs nvcc and nvdisasm")
    out = tmp_path / "report.json"
    assert sass_report.main(["csrc/cuda/reduce_partials.cu", "--arch", "80", "--kernel", "reduce_partials",
                             "--json", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())["kernels"]
    assert "reduce_partials_kernel" in row["kernel"]  # demangled where c++filt is installed
    assert row["registers"] > 0 and row["spill_store_bytes"] == 0 and row["instructions"] > 100
    assert row["loops"] and all(r["instructions"] > 0 for r in row["loops"])
