"""The Triton kernels still compile for an H100 (sm_90), an A100 (sm_80) and a B200 (sm_100),
checked without a GPU.

tests/triton_aot.py records the launches the four Triton launchers make (meta tensors) and
compiles each kernel x GPU autotune config ahead of time for the given arch. It runs in a child
process without TRITON_INTERPRET: conftest sets that on CPU-only machines, and under the
interpreter there is nothing to compile (and the launchers switch to their interpreter config
lists).

Cases (one per autotune list): bf16 C=96 (N=2, 56x56), bf16 C=192 (28x28), bf16 C=256 and 384
(14x14), fp16 C=768 (7x7), fp32 "ieee" C=40 (13x17) and 192 (28x28), fp32 with TF32 C=96 and 192
(28x28); and
bf16 C=96 at batch 128 and fp16 C=768 at batch 87, where the backward conv kernel's programs take
half an image and 2 images.

sm_90, the target: every config within its spill bound. sm_80 and sm_100: every config compiles
and fits the GPU's shared memory, and every launch has at least one config within the bound (on
sm_80 mma.sync holds both operands in registers, and some configs tuned for sm_90's wgmma spill;
sm_100 is Triton's Blackwell lowering, tcgen05 MMAs into tensor memory, where a few configs spill
too; the autotuner times them all and keeps the fastest).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import package_subprocess_env

# Bytes of shared memory per block (cudaFuncAttributeMaxDynamicSharedMemorySize): H100, A100, B200.
SMEM_OPTIN = {90: 232448, 80: 166912, 100: 232448}
# The GPUs of compute capability 8.6, 8.9 and 12.0 (RTX 3090, A10, RTX 4090, L4, L40S, RTX 5090)
# allow 101376 bytes. Triton generates the same code for them as for sm_80 (mma.sync, cp.async):
# compiled for sm_89 and sm_120, all 170 of this test's compiles gave sm_80's shared memory,
# registers and spills (triton 3.9, 2026-12-07). So the sm_80 compile stands for them.
SMEM_OPTIN_99KB = 101376

KERNELS = {
    "_dwconv_layernorm_fwd_kernel", "_dwconv_layernorm_bwd_norm_kernel",
    "_dwconv_layernorm_bwd_conv_kernel", "_mlp_layerscale_fwd_kernel", "_matmul_kernel",
    "_mlp_layerscale_bwd_hidden_kernel",
}

# Spill bytes (max of ptxas's spill stores / loads) allowed per compile (sm_90) or for the best
# config of each launch (sm_80). 16-bit and TF32 at ConvNeXt widths: 0, the tuned state.
# Measured with triton 3.9 and 3.6 (the GPU machine's; their ptxas), 2026-11-24.
SPILL_BOUND = {"bf16:96": 0, "bf16:96:b128": 0, "bf16:192": 0, "bf16:256": 0, "bf16:384": 0, "fp16:768": 0,
               "fp16:768:b87": 0,
               "tf32:96": 0, "tf32:192": 0,
               # fp32 "ieee" runs on CUDA-core FMAs; today's worst on sm_90 is 76 bytes (on
               # sm_80 one 64x64 matmul config spills ~500 B: its launches have clean ones).
               # The bound catches the tens-of-KB spills of a too-large fma tile.
               "fp32:40": 128, "fp32:192": 128}
# The stored pre-activation variant is timed against recompute (benchmarks/kernels.py), not used
# by the ops: it must compile, and a few hundred bytes of spills in some of its autotune configs
# only cost it in that comparison (for sm_90: 0 at this test's shapes and at batch 128, C = 384,
# under triton 3.6 and 3.9, 344-368 B there before the fused forward split its accumulator; for
# sm_80 up to ~600 B in the BLOCK_M = 64 configs).
STORED_VARIANT_SPILL_BOUND = 1024
STORED_VARIANT_FLAGS = ("STORE_PREACT", "PREACT_STORED")
SPILL_EXCEPTIONS = {
    # dwconv forward / backward-norm (seven row accumulators of 8 pixels x C up to C = 384, in
    # up to three channel tiles of one layout): 80-255 registers and no spills for sm_90 and
    # sm_80 under triton 3.6, 3.8 and 3.9 at the ConvNeXt-T widths, except 16 B in the
    # backward-norm at fp16 C = 768 under 3.6 (127 registers, outside the loops) and 4 B in
    # the forward at C = 256 (one 256-wide tile) under 3.9 (2026-12-06).
    **{("_dwconv_layernorm_bwd_norm_kernel", case): 16 for case in ("fp16:768", "fp16:768:b87")},
    ("_dwconv_layernorm_fwd_kernel", "bf16:256"): 16,
    # The backward conv with several samples a program (168 registers): 1 (triton 3.9) or 3
    # (3.6) 4-byte values kept across all its loops, stored once before them and reloaded once
    # after (SASS, 2026-12-05).
    ("_dwconv_layernorm_bwd_conv_kernel", "fp16:768:b87"): 16,
    # The fused forward's 384-wide accumulator keeps it at 255 registers, where ptxas spills
    # 0-16 B by shape and triton version (0 at batch 128; one 512-wide tile spilled ~550 B
    # under triton 3.6).
    ("_mlp_layerscale_fwd_kernel", "bf16:384"): 32,
}


def _compile_all(tmp_path_factory, arch):
    tmp = tmp_path_factory.mktemp(f"triton_aot_sm{arch}")
    env = package_subprocess_env(drop=("TRITON_INTERPRET",))
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # fresh: every kernel really goes through ptxas
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v log: registers and spills
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences triton 3.9
    out = tmp / "aot.json"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")
    proc = subprocess.run([sys.executable, script, str(out), "--arch", str(arch),
                           "--jobs", str(min(4, os.cpu_count() or 1)), "--cubin-dir", str(tmp / "cubins")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), (
        f"triton_aot.py failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    if "error" in data:
        pytest.skip(data["error"])
    return data["results"]


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    return _compile_all(tmp_path_factory, 90)


@pytest.fixture(scope="module")
def aot_sm80(tmp_path_factory):
    return _compile_all(tmp_path_factory, 80)


@pytest.fixture(scope="module")
def aot_sm100(tmp_path_factory):
    return _compile_all(tmp_path_factory, 100)


ARCHS = (90, 80, 100)


def _compiled(arch, request):
    return request.getfixturevalue("aot" if arch == 90 else f"aot_sm{arch}")


def _where(r):
    return f"{r['kernel']} [{r['config']}] for {','.join(r['cases'])}"


def _spill_bound(r, cases=None):
    """Spill bytes allowed for compile row r: the strictest bound among cases (default: all the
    cases the row serves)."""
    bound = min(SPILL_EXCEPTIONS.get((r["kernel"], c), SPILL_BOUND[c]) for c in (cases or r["cases"]))
    if any(r["constexprs"].get(flag) == "True" for flag in STORED_VARIANT_FLAGS):
        bound = max(bound, STORED_VARIANT_SPILL_BOUND)
    return bound


def _spill(r):
    return max(r["spill_stores"], r["spill_loads"])


def _rows_by_launch(rows):
    """{launch: the rows (one per autotune config) that serve it} (a row can serve several launches)."""
    by_launch = {}
    for r in rows:
        for launch in r["launches"]:
            by_launch.setdefault(launch, []).append(r)
    return by_launch


def _spill_rows(rows):
    """The rows that compiled; skips when this triton prints no ptxas -v log."""
    ok = [r for r in rows if r["ok"]]
    if any(r["spill_stores"] is None for r in ok):
        pytest.skip("no ptxas -v log printed: this triton lacks TRITON_DUMP_PTXAS_LOG")
    return ok


@pytest.mark.parametrize("arch", ARCHS)
def test_launches_cover_every_kernel(arch, request):
    # Guards the harness: a recorder that saw nothing would make the other tests vacuous.
    rows = _compiled(arch, request)
    assert {r["kernel"] for r in rows} == KERNELS
    cases = {c for r in rows for c in r["cases"]}
    assert cases == set(SPILL_BOUND)
    # Some launches are autotuned over several configs (else the sm_80 rule below, "one clean
    # config per launch", would be the same as sm_90's "every config").
    assert max(len(configs) for configs in _rows_by_launch(rows).values()) > 1


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile(arch, request):
    rows = _compiled(arch, request)
    failed = [f"{_where(r)}:\n{r['error']}" for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(rows)} sm_{arch} compiles failed:\n" + "\n\n".join(failed)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits(arch, request):
    # On sm_80 a config over the limit would only be skipped by the autotuner, but the lists
    # are meant to serve both GPUs: none may exceed either limit.
    rows = _compiled(arch, request)
    limit = SMEM_OPTIN[arch]
    over = [f"{_where(r)}: {r['smem']} bytes" for r in rows if r["ok"] and r["smem"] > limit]
    assert not over, f"shared memory above the sm_{arch} limit of {limit} bytes:\n" + "\n".join(over)


def test_no_register_spills_sm90(aot):
    bad = [f"{_where(r)}: {r['spill_stores']} B spill stores / {r['spill_loads']} B loads "
           f"({r['regs']} registers) > {_spill_bound(r)} B"
           for r in _spill_rows(aot) if _spill(r) > _spill_bound(r)]
    assert not bad, "register spills for sm_90:\n" + "\n".join(bad)


@pytest.fixture
def sass_report(monkeypatch):
    """benchmarks/sass_report.py, to read the compiles' cubins (tests/triton_aot.py --cubin-dir)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sass_report

    if sass_report.find_tool("nvdisasm") is None:
        pytest.skip("needs nvdisasm")
    return sass_report


def _cubin(rows, kernel, case):
    """The cubin of the first config that compiled `kernel` for `case`."""
    return Path(next(r for r in rows if r["ok"] and r["kernel"] == kernel and case in r["cases"])["cubin"])


def test_sass_report_reads_the_cubins(aot, sass_report):
    """benchmarks/sass_report.py on a Triton cubin: the forward's row loops, FMAs among them."""
    (kernel,) = sass_report.report(_cubin(aot, "_dwconv_layernorm_fwd_kernel", "bf16:96"), "90a", None, False)
    assert kernel["kernel"] == "_dwconv_layernorm_fwd_kernel" and kernel["instructions"] > 0
    assert max(loop["ffma"] for loop in kernel["loops"]) > 0


def test_sm100_compiles_are_blackwells_own(aot_sm100, sass_report):
    """The sm_100 compile checks Triton's Blackwell lowering, not sm_80's code: the bf16 MLP
    kernels' dots are tcgen05 MMAs (SASS UTC*MMA, accumulating in tensor memory)."""
    (lines,) = sass_report.disassemble(_cubin(aot_sm100, "_mlp_layerscale_fwd_kernel", "bf16:96")).values()
    opcodes = {sass_report.opcode(text) for _, text in sass_report.parse(lines)[0]}
    assert any(op.startswith("UTC") and op.endswith("MMA") for op in opcodes), sorted(opcodes)


@pytest.mark.parametrize("arch", (80, 100))
def test_every_launch_has_a_clean_config(arch, request):
    bad = []
    for launch, cands in sorted(_rows_by_launch(_spill_rows(_compiled(arch, request))).items()):
        case = [launch.split("#")[0]]  # the launch's own bound, not that of a case sharing its rows
        if not any(_spill(r) <= _spill_bound(r, case) for r in cands):
            worst = "; ".join(f"[{r['config']}] {_spill(r)} B > {_spill_bound(r, case)} B" for r in cands)
            bad.append(f"{cands[0]['kernel']} ({launch}): {worst}")
    assert not bad, f"launches whose every sm_{arch} config spills past the bound:\n" + "\n".join(bad)


def test_every_launch_has_a_config_for_99kb_gpus(aot_sm80):
    """On a GPU with 99 KB of shared memory a block the autotuner skips the configs that do not
    fit (OutOfResources); each launch must keep at least one."""
    by_launch = _rows_by_launch([r for r in aot_sm80 if r["ok"]])
    bad = [f"{cands[0]['kernel']} ({launch}): " + ", ".join(f"[{r['config']}] {r['smem']} B" for r in cands)
           for launch, cands in sorted(by_launch.items()) if min(r["smem"] for r in cands) > SMEM_OPTIN_99KB]
    assert by_launch and not bad, f"launches with no config within {SMEM_OPTIN_99KB} bytes:\n" + "\n".join(bad)
