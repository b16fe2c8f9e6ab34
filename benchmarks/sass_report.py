"""Static instruction counts of GPU kernels from their SASS: the proxy for speed when no GPU is at hand.

    python benchmarks/sass_report.py csrc/cuda/dwconv_layernorm_fwd_bf16.cu          # sm_90a
    python benchmarks/sass_report.py csrc/cuda/dwconv_layernorm_bwd_bf16.cu --kernel stats_ring --arch 80
    python benchmarks/sass_report.py ~/.triton/cache/<hash>/_dwconv_layernorm_fwd_kernel.cubin
    python benchmarks/sass_report.py csrc/cuda/mlp_layerscale_fwd_bf16.cu --json out.json
    # Triton: tests/triton_aot.py compiles the launchers' kernels for a GPU that need not be here
    python tests/triton_aot.py /tmp/aot.json --cases bf16:96 --cubin-dir /tmp/cubins   # no TRITON_INTERPRET
    python benchmarks/sass_report.py /tmp/cubins/_dwconv_layernorm_fwd_kernel_*.cubin   # one a config

A .cu translation unit is compiled by nvcc as the extension's build compiles it (-O3,
--expt-relaxed-constexpr, C++17, CNK_CUDA_HAS_SM90A for 90a; one arch); a .cubin (Triton's cache,
tests/triton_aot.py) is read as it is. nvdisasm (the CUDA toolkit's, or the one Triton ships)
disassembles it. For each kernel: registers and spill bytes (ptxas -v; .cu only), its instruction
count, and each loop (a backward branch; the longest first): static instructions, FFMA among them
and the commonest opcodes. Barrier-delimited segments (--segments) split an unrolled loop into its
steps, e.g. the ring kernels' row steps.

Static counts are not executed counts: a predicated-off path counts, a loop counts once. They
compare two versions of a kernel (instructions per FMA in its hot loop, spill reloads) where no
GPU can time them; only a GPU timing settles which is faster.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_ENTRY_RE = re.compile(r"Compiling entry function '(\S+)' for")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL_RE = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH_RE = re.compile(r"\bBRA\b.*`\(\.(L_x_\d+)\)")


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, under CUDA_HOME / the default toolkit, or (nvdisasm) the one Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).is_file():
            return str(Path(root) / "bin" / name)
    try:
        import triton
    except Exception:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else None


def compile_cubin(source: Path, arch: str, out: Path) -> dict[str, dict]:
    """nvcc -cubin of one translation unit; {mangled kernel name: registers / spills} from ptxas -v."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("sass_report: nvcc not found (PATH, CUDA_HOME or /usr/local/cuda)")
    cmd = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-arch=sm_{arch}", "-cubin",
           "-Xptxas", "-v", "-I", str(source.parent), "-o", str(out), str(source)]
    if arch == "90a":
        cmd.insert(1, "-DCNK_CUDA_HAS_SM90A")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sass_report: nvcc failed:\n{proc.stderr[-4000:]}")
    info, current = {}, None
    for line in proc.stderr.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            current = m.group(1)
            info[current] = {}
            continue
        if current is None:
            continue
        m = _SPILL_RE.search(line)
        if m:
            info[current].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                                 spill_load_bytes=int(m.group(3)))
        m = _REGS_RE.search(line)
        if m:
            info[current]["registers"] = int(m.group(1))
    return info


def disassemble(cubin: Path) -> dict[str, list[str]]:
    """{mangled kernel name: its SASS lines} (nvdisasm -c)."""
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:
        raise SystemExit("sass_report: nvdisasm not found (CUDA toolkit or the Triton package)")
    proc = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sass_report: nvdisasm failed:\n{proc.stderr[-2000:]}")
    kernels, current = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith(".text."):
            current = line[len(".text."):].rstrip(":")
            kernels[current] = []
        elif current is not None:
            kernels[current].append(line)
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return dict(zip(names, out)) if proc.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def opcode(text: str) -> str:
    """The opcode of one SASS instruction, without its predicate and modifiers (FFMA, LDG, ...)."""
    parts = text.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def parse(lines: list[str]) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction) pairs and {label: address of the instruction after it}."""
    instructions, labels, pending = [], {}, []
    for line in lines:
        m = _LABEL_RE.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR_RE.match(line)
        if m:
            address = int(m.group(1), 16)
            instructions.append((address, m.group(2)))
            for label in pending:
                labels[label] = address
            pending = []
    return instructions, labels


def mix(instructions: list[tuple[int, str]], top: int = 8) -> dict:
    ops = collections.Counter(opcode(t) for _, t in instructions)
    total = len(instructions)
    ffma = ops.get("FFMA", 0)
    return {"instructions": total, "ffma": ffma, "per_ffma": round(total / ffma, 3) if ffma else None,
            "top": dict(ops.most_common(top))}


def loops(instructions: list[tuple[int, str]], labels: dict[str, int]) -> list[dict]:
    """Each backward branch's body [target, branch], the longest first (unrolled hot loops)."""
    found = []
    for address, text in instructions:
        m = _BRANCH_RE.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= address:
            start = labels[m.group(1)]
            body = [(a, t) for a, t in instructions if start <= a <= address]
            found.append({"start": hex(start), "end": hex(address), **mix(body)})
    return sorted(found, key=lambda r: -r["instructions"])


def segments(instructions: list[tuple[int, str]]) -> list[dict]:
    """The stretches between consecutive barriers (BAR.SYNC), each after its barrier."""
    bars = [i for i, (_, t) in enumerate(instructions) if opcode(t) == "BAR"]
    return [{"start": hex(instructions[a][0]), **mix(instructions[a + 1:b + 1])} for a, b in zip(bars, bars[1:])]


def report(path: Path, arch: str, kernel_filter: str | None, with_segments: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix == ".cu":
            cubin = Path(tmp) / "out.cubin"
            ptxas = compile_cubin(path, arch, cubin)
        else:
            cubin, ptxas = path, {}
        kernels = disassemble(cubin)
    names = demangle(list(kernels))
    pattern = re.compile(kernel_filter) if kernel_filter else None
    rows = []
    for mangled, lines in kernels.items():
        if pattern and not (pattern.search(names[mangled]) or pattern.search(mangled)):
            continue
        instructions, labels = parse(lines)
        row = {"kernel": names[mangled], "mangled": mangled, **ptxas.get(mangled, {}),
               "instructions": len(instructions), "loops": loops(instructions, labels)}
        if with_segments:
            row["segments"] = segments(instructions)
        rows.append(row)
    return rows


def print_rows(rows: list[dict], max_loops: int) -> None:
    for row in rows:
        spill = (f", spills {row['spill_store_bytes']} B stored / {row['spill_load_bytes']} B loaded"
                 if "spill_store_bytes" in row else "")
        regs = f", {row['registers']} registers" if "registers" in row else ""
        print(f"{row['kernel']}\n  {row['instructions']} instructions{regs}{spill}")
        for kind in ("loops", "segments"):
            for r in row.get(kind, [])[:max_loops] if kind == "loops" else row.get(kind, []):
                per = f", {r['per_ffma']} a FFMA" if r["per_ffma"] else ""
                top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
                name = "loop" if kind == "loops" else "segment"
                print(f"  {name} {r['start']}: {r['instructions']} ({r['ffma']} FFMA{per}); {top}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", type=Path, nargs="+", help="csrc/cuda .cu translation units or .cubin files")
    p.add_argument("--arch", default="90a", help="nvcc arch for a .cu: 90a (default), 90, 80, ...")
    p.add_argument("--kernel", help="regular expression on the (demangled) kernel names")
    p.add_argument("--segments", action="store_true", help="also the stretches between barriers")
    p.add_argument("--loops", type=int, default=4, help="loops listed a kernel, the longest first (default 4)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    args = p.parse_args(argv)
    rows = []
    for path in args.paths:
        path = path if path.is_absolute() or path.exists() else REPO / path
        rows += [{"path": str(path), **row} for row in report(path, args.arch, args.kernel, args.segments)]
    if not rows:
        print("sass_report: no kernel matched", file=sys.stderr)
        return 1
    print_rows(rows, args.loops)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
