"""Helpers shared by the benchmark scripts: environment record, timing, and result files.

One copy of each: throughput.py, kernels.py and readme_performance.py import from here. The
scripts run as `python benchmarks/<name>.py`, so this directory is on sys.path and
`import common` finds this file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"


def import_package():
    """convnext_kernels, the installed one if there is one, else the one in this checkout."""
    try:
        import convnext_kernels
    except ImportError:  # not installed: run from the source tree (built in place)
        sys.path.insert(0, str(REPO_ROOT))
        import convnext_kernels
    return convnext_kernels


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's maker as the compiled extension reads it ("amd", "intel", "other"; "" off x86 or
    without the extension)."""
    try:
        from convnext_kernels import _C
    except ImportError:
        return ""
    return _C.build_info().get("cpu_vendor", "")


def device_name(device) -> str:
    """The GPU's name, or the CPU's name with the thread count torch uses."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    """A short file-name-safe name for the device kind: 'cpu-amd', 'cpu-intel', 'h100-80gb-hbm3', ...
    (the CPU's maker: an AMD and an Intel machine's runs of one day get two files, not one)."""
    if device.type != "cuda":
        vendor = cpu_vendor()
        return f"cpu-{vendor}" if vendor else "cpu"
    name = device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _run_quiet(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Optional[str]:
    """HEAD of this checkout, with '-dirty' when tracked files differ from it (read-only git)."""
    head = _run_quiet(["git", "rev-parse", "HEAD"])
    if head is None:
        return None
    dirty = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def versions(device) -> dict:
    import torch

    ck = import_package()
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "driver": None,
        "package": ck.__version__,
        "build_info": None,
        "torchvision": None,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # a missing or broken triton is recorded as absent
        pass
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except Exception:
        pass
    try:
        out["build_info"] = ck.build_info()
    except Exception as e:  # extension not built: say so rather than fail the run
        out["build_info"] = f"unavailable: {e}"
    if device.type == "cuda":
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        out["driver"] = smi.splitlines()[0].strip() if smi else None
    return out


def command_line() -> str:
    """How this script was run, with the script path relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def environment(device, kind: str, config: dict) -> dict:
    """Top-level keys of a result file (everything except `results`)."""
    import torch

    return {
        "kind": kind,
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(device),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "host": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            # Which GEMMs the cpu backend runs here (its choice follows the CPU's maker).
            "cpu_backend_gemms": "onednn" if cpu_onednn_linear() is not None else "torch",
            "torch_threads": torch.get_num_threads(),
            # CPU runs may share their machine; other processes' load slows every OpenMP barrier.
            "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "config": config,
    }


def finish_environment(payload: dict) -> None:
    """Add what is only known at the end of a run (the load it ran under)."""
    if hasattr(os, "getloadavg"):
        payload["host"]["load_avg_1m_at_end"] = os.getloadavg()[0]


INTERRUPTED = "interrupted"  # the error of a record that a cut-short run never finished


@contextlib.contextmanager
def keep_results_on_interrupt(payload: dict, records: list[dict]):
    """Ends a measuring loop on Ctrl-C or SIGINT (gpu_pass.sh's time limit sends SIGINT) so the
    caller still writes what was measured: records not finished get error "interrupted", and the
    payload says the run was cut short."""
    # A shell without job control starts background commands with SIGINT ignored, and Python then
    # leaves it ignored: the time limit's SIGINT would do nothing, and its SIGKILL lose every record.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted: writing the results measured so far", flush=True)
        payload["interrupted"] = True
        for r in records:
            if not r.get("error") and r.get("img_per_s", r.get("ms")) is None:
                r["error"] = INTERRUPTED


def exit_status(payload: dict) -> int:
    """A script's exit status: 130 (the shell's for an interrupt) when the run was cut short."""
    return 130 if payload.get("interrupted") else 0


def comma_subset(parser, text: str, allowed: Sequence[str], flag: str) -> list[str]:
    """The items of a comma-separated option value; a parser error names any not in `allowed`."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        parser.error(f"{flag}: {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def fused_backends(ck, device) -> list[str]:
    """The fused backends worth timing on device: all that run there except the plain-torch one,
    and except Triton on CPU (its interpreter, TRITON_INTERPRET=1, checks results, not speed)."""
    return [b for b in ck.available_backends(device)
            if b != "torch" and not (b == "triton" and device.type == "cpu")]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def with_env(step, name: str, value: str):
    """step() with os.environ[name] = value while it runs (the launchers read it at each call)."""
    def wrapped():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            step()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return wrapped


# The cpu_torch_gemm provider (kernels.py and throughput.py): fused_cpu with its fp32 GEMMs on
# torch's own matmuls instead of oneDNN, as (backend, environment variable, value).
CPU_TORCH_GEMM = ("cpu", "CONVNEXT_KERNELS_CPU_ONEDNN", "0")


def cpu_torch_gemm_unavailable() -> str:
    """Why cpu_torch_gemm would only time fused_cpu again, or "" (it differs: oneDNN is in use)."""
    if cpu_onednn_linear() is not None:
        return ""
    return ("fused_cpu runs torch's GEMMs here already (no oneDNN in this torch, not an x86-64 CPU, or "
            "not an AMD one, where torch's are the default: CONVNEXT_KERNELS_CPU_ONEDNN=1 takes oneDNN's)")


def cpu_onednn_linear():
    """The oneDNN op the cpu backend runs its fp32 GEMMs with, or None where it runs torch's: none
    found by convnext_kernels.launchers.cpu, not its choice on this CPU (see
    PACKAGE_GEMMS_BY_DEFAULT there), or no compiled extension."""
    try:
        from convnext_kernels.launchers import cpu
    except ImportError:
        return None
    return cpu.ONEDNN_LINEAR if cpu._onednn_gemms() else None


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], device, warmup: int, iters: int,
                    between: Optional[Callable[[], None]] = None) -> list[float]:
    """Seconds taken by each of `iters` calls of fn after `warmup` untimed calls.

    GPU: a pair of CUDA events around each call, read after one final synchronize, so the
    iterations run back to back as in training. CPU: time.perf_counter around each call (CPU
    ops are synchronous). `between` runs outside the timed region before every call.
    """
    import torch

    for _ in range(warmup):
        if between:
            between()
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            if between:
                between()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(iters):
        if between:
            between()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(steps: dict, warmup: int, iters: int, between: Optional[dict] = None,
                     on_round: Optional[Callable[[int], None]] = None) -> tuple[dict, dict]:
    """CPU: seconds per call of each named fn, the fns taking turns one call each per round, so
    that load from other processes on a shared machine falls on all of them alike.

    Returns ({name: [seconds of the `iters` timed rounds]}, {name: exception}); a fn that raises
    drops out of the later rounds. `between[name]` runs untimed before each call of that fn.
    """
    between = between or {}
    times = {name: [] for name in steps}
    errors = {}
    for i in range(warmup + iters):
        for name, fn in steps.items():
            if name in errors:
                continue
            if name in between:
                between[name]()
            try:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            except Exception as e:  # the caller records it; the others go on
                errors[name] = e
                continue
            if i >= warmup:
                times[name].append(elapsed)
        if on_round:
            on_round(i)
    return {n: t for n, t in times.items() if n not in errors}, errors


def kernel_ms(fn: Callable[[], object], device, grad_to_none: Sequence = (), cpu_warmup: int = 2,
              cpu_iters: int = 10) -> float:
    """Median milliseconds of one call of fn: triton.testing.do_bench on GPU (it flushes L2
    between calls), time_iterations on CPU. Gradients of `grad_to_none` are reset before each call
    so that backward passes never accumulate."""
    def reset_grads():
        for t in grad_to_none:
            t.grad = None

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=list(grad_to_none) or None, return_mode="median"))
    return 1e3 * median(time_iterations(fn, device, cpu_warmup, cpu_iters, between=reset_grads))


def graphed_kernel_ms(fn: Callable[[], object], grad_to_none: Sequence = (), warmup: int = 10,
                      iters: int = 100) -> float:
    """Median milliseconds of fn's GPU work without its Python launch cost: fn is captured once in
    a CUDA graph and each timed replay follows an L2 flush (as do_bench does), between CUDA events.
    At the small stage shapes a fused op's kernels take ~10 us while the Python around a call
    (checks, op dispatch, autotuner lookup) takes tens of us: do_bench times that too. Raises if
    fn cannot be captured (the caller then falls back to kernel_ms)."""
    import torch

    def reset_grads():
        for t in grad_to_none:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graph asks
        for _ in range(3):
            reset_grads()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    reset_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return median(s.elapsed_time(e) for s, e in zip(starts, ends))


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class Progress:
    """A tqdm bar on stderr (a no-op without tqdm): set(text) names the current step, advance()
    completes one."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def set(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()


def short_error(e: BaseException) -> str:
    """One line naming the exception, for a result record (compile errors can run to pages)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


# ----------------------------------------------------------------------------------------------
# Result files
# ----------------------------------------------------------------------------------------------
def result_stem(kind: str, device, parts: Sequence[str], quick: bool) -> str:
    """File stem `kind_device_part..._date`: distinct per model, bench and dtype (and CPU thread
    count), one per day."""
    import torch

    date = datetime.date.today().isoformat()
    threads = [f"t{torch.get_num_threads()}"] if device.type != "cuda" else []
    pieces = [kind, device_slug(device), *parts, *threads] + (["quick"] if quick else []) + [date]
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(p)) for p in pieces)


def fmt(value, spec: str = ".1f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    def cell(c) -> str:  # a "|" or newline (error messages) would break the table
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table for stdout."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bar_chart(path: Path, title: str, ylabel: str, categories: Sequence[str],
              series: dict[str, Sequence[Optional[float]]]) -> Optional[Path]:
    """Grouped bars: one group per category, one bar per series; None values are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no chart written", file=sys.stderr)
        return None
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) * max(1, n / 2) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str,
                  chart: Callable[[Path], Optional[Path]]) -> list[Path]:
    """<stem>.json, <stem>.md and <stem>.png in out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown.rstrip() + "\n")
    written = [json_path, md_path]
    png = chart(out_dir / f"{stem}.png")
    if png is not None:
        written.append(png)
    return written


def markdown_header(title: str, payload: dict) -> str:
    """Title plus the environment lines every markdown summary starts with."""
    v = payload["versions"]
    return "\n".join([
        f"# {title}",
        "",
        f"- device: {payload['device']}",
        f"- versions: torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, driver {v['driver']}, "
        f"convnext_kernels {v['package']}",
        f"- git commit: {payload['git_commit']}; date: {payload['date']}",
        f"- command: `{payload['command']}`",
        *(["- **interrupted** (time limit or Ctrl-C): results measured before that"] if payload.get("interrupted")
          else []),
        "",
    ])
