"""Rewrite the README's Performance section from the result files in benchmarks/results/.

    python benchmarks/readme_performance.py            # rewrite README.md between the markers
    python benchmarks/readme_performance.py --check    # exit 1 if README.md is out of date

Only the text between `<!-- performance:start -->` and `<!-- performance:end -->` changes. Runs made
with --quick are left out. Where several runs cover the same device, model, image size and dtype,
each (bench, provider) figure comes from the latest of them, among the runs with that bench's
latest batch size and compile mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import common

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
MODEL_ORDER = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge")
BASE = "eager_channels_last"

# (what, device_type, device name contains, model, dtype, bench, kind, threshold, against)
#   kind "speedup": best eager-mode fused provider's img/s / against's img/s >= threshold
#   kind "memory":  that provider's peak MB per image / against's <= threshold
TARGETS = (
    ("H100 ConvNeXt-T inference vs eager channels-last", "cuda", "H100", "convnext_tiny", "bfloat16", "infer",
     "speedup", 2.0, "eager_channels_last"),
    ("H100 ConvNeXt-T inference vs torch.compile", "cuda", "H100", "convnext_tiny", "bfloat16", "infer",
     "speedup", 1.4, "compile"),
    ("H100 ConvNeXt-T training vs eager channels-last", "cuda", "H100", "convnext_tiny", "bfloat16", "train",
     "speedup", 1.6, "eager_channels_last"),
    ("H100 ConvNeXt-T training vs torch.compile", "cuda", "H100", "convnext_tiny", "bfloat16", "train",
     "speedup", 1.25, "compile"),
    ("H100 ConvNeXt-T training peak memory per image vs eager channels-last", "cuda", "H100", "convnext_tiny",
     "bfloat16", "train", "memory", 0.5, "eager_channels_last"),
    ("CPU fp32 inference vs eager channels-last", "cpu", "", None, "float32", "infer",
     "speedup", 1.15, "eager_channels_last"),
    # The CPU target says "fused >= 1.15x eager" without naming the bench: both are shown.
    ("CPU fp32 training vs eager channels-last", "cpu", "", None, "float32", "train",
     "speedup", 1.15, "eager_channels_last"),
)


def load_runs(results_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(run, dict) or run.get("kind") not in ("throughput", "kernels"):
            continue
        if run.get("config", {}).get("quick"):
            continue
        run["_path"] = path
        runs.append(run)
    return sorted(runs, key=lambda r: (r["date"], r["_path"].name))


def _model_rank(model: str) -> int:
    size = model.removeprefix("convnext_")
    return MODEL_ORDER.index(size) if size in MODEL_ORDER else len(MODEL_ORDER)


def _drop_superseded_runs(groups: dict) -> None:
    """Keeps in each group's "runs" (the commands, ceilings and charts the section cites) only the
    runs that still provide one of its records."""
    for group in groups.values():
        shown = {id(r) for r in group["records"].values()}
        group["runs"] = [run for run in group["runs"] if any(id(r) in shown for r in run["results"])]


def throughput_groups(runs: list[dict]) -> dict:
    """{(device_type, device, model, img_size, dtype): {"records": {(bench, provider): rec}, "runs": [...]}}

    Runs are merged (a GPU pass times infer and train in separate calls, and may split providers)
    but never across batch sizes or compile modes: a bench's records all come from runs with the
    batch size and compile mode of its latest run, so every ratio compares like with like."""
    groups: dict = {}
    for run in runs:
        if run["kind"] != "throughput":
            continue
        c = run["config"]
        key = (run["device_type"], run["device"], c["model"], c["img_size"], c["dtype"])
        group = groups.setdefault(key, {"records": {}, "runs": [], "setting": {}})
        group["runs"].append(run)
        for rec in run["results"]:  # runs are in date order: latest wins
            if rec.get("error") == common.INTERRUPTED:  # never measured: keeps what an earlier run had
                continue
            setting = (rec["batch_size"], c.get("compile_mode", "default"))
            if group["setting"].setdefault(rec["bench"], setting) != setting:  # older figures of that bench go
                group["records"] = {k: r for k, r in group["records"].items() if k[0] != rec["bench"]}
                group["setting"][rec["bench"]] = setting
            group["records"][(rec["bench"], rec["provider"])] = rec
    _drop_superseded_runs(groups)
    order = sorted(groups, key=lambda k: (k[0] != "cuda", k[1], _model_rank(k[2]), k[3], k[4]))
    return {k: groups[k] for k in order}


def best_fused(records: dict, bench: str):
    """The fastest eager-mode fused provider (the model as shipped, not compiled) of a bench."""
    fused = [r for (b, p), r in records.items() if b == bench and r["img_per_s"]
             and p.startswith("fused_") and p not in ("fused_compile", "fused_torch")]
    return max(fused, key=lambda r: r["img_per_s"], default=None)


def target_rows(groups: dict) -> list[list[str]]:
    rows = []
    for what, dev_type, dev_name, model, dtype, bench, kind, threshold, against in TARGETS:
        def matching(name):
            return [(k, g) for k, g in groups.items() if k[0] == dev_type and name in k[1]
                    and (model is None or k[2] == model) and k[4] == dtype]

        match = matching(dev_name)
        # Without a run on the target's GPU, another GPU's run is shown against it, named (the
        # device tool may lend an H200 instead of an H100): a ratio, not the target's own check.
        elsewhere = not match and dev_type == "cuda"
        if elsewhere:
            match = matching("")
        want = f"{'≥' if kind == 'speedup' else '≤'} {threshold}×"
        if not match:
            rows.append([what, want, "no result yet", ""])
            continue
        for (_, device, mdl, img, _), g in match:
            fused = best_fused(g["records"], bench)
            base = g["records"].get((bench, against))
            label = f"{what} ({mdl}, {img} px)" if model is None else what
            if dev_type == "cpu":  # one row per CPU measured: name it
                label += f" on {device}"
            if elsewhere:
                label += f" (measured on {device}, not an {dev_name})"
            if fused is None or base is None:
                rows.append([label, want, "no result yet", ""])
                continue
            if kind == "speedup":
                ratio = fused["img_per_s"] / base["img_per_s"] if base["img_per_s"] else None
            else:
                ratio = (fused["peak_mem_mb_per_img"] / base["peak_mem_mb_per_img"]
                         if fused["peak_mem_mb_per_img"] and base["peak_mem_mb_per_img"] else None)
            if ratio is None:
                rows.append([label, want, f"{against} not measured", ""])
                continue
            met = ratio >= threshold if kind == "speedup" else ratio <= threshold
            verdict = "–" if elsewhere else "yes" if met else "**no**"
            rows.append([label, want, f"{ratio:.2f}× ({fused['provider']})", verdict])
    return rows


def throughput_section(key, group, base: Path) -> str:
    dev_type, device, model, img, dtype = key
    records = group["records"]
    providers = list(dict.fromkeys(p for (_, p) in records))
    benches = [b for b in ("infer", "train") if any(k[0] == b for k in records)]
    on_cpu = dev_type != "cuda"
    f = common.fmt
    headers, rows = ["provider"], []
    for bench in benches:
        # On a shared CPU the best iteration is worth showing beside the median (see throughput.py).
        headers += [f"{bench} img/s", "× eager_cl"] + (["best img/s"] if on_cpu else [f"{bench} MB/img"])
    for p in providers:
        row = [p]
        for bench in benches:
            r = records.get((bench, p))
            if r is None:
                row += ["–", "–", "–"]
            elif r["img_per_s"] is None:
                row += [f"error: {(r['error'] or '')[:80]}", "", ""]
            else:
                last = f(r.get("img_per_s_best"), ".1f") if on_cpu else f(r["peak_mem_mb_per_img"], ".1f")
                row += [f"{r['img_per_s']:.1f} (b{r['batch_size']})", f(r.get("speedup_vs_eager_channels_last"), ".2f"),
                        last]
        rows.append(row)
    latest = group["runs"][-1]
    v = latest["versions"]
    load = ""
    if on_cpu:
        loads = [f"{r['host'].get('load_avg_1m_at_start', float('nan')):.1f}–"
                 f"{r['host'].get('load_avg_1m_at_end', float('nan')):.1f}" for r in group["runs"] if "host" in r]
        load = f" Shared machine, 1-minute load average during the run: {', '.join(loads)}." if loads else ""
    lines = [
        f"### {model}, {img}×{img}, {dtype}{' autocast' if dtype != 'float32' else ''}, "
        f"{'CPU' if on_cpu else 'GPU'}: {device}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, driver {v['driver']}; "
        f"commit {(latest['git_commit'] or 'unknown')[:12]}, {latest['date'][:10]}. Commands: "
        + "; ".join(f"`{r['command']}`" for r in group["runs"]) + "." + load,
        "",
        common.markdown_table(headers, rows),
        "",
    ]
    lines += [f"![{model} images/s]({_rel(r['_path'].with_suffix('.png'), base)})" for r in group["runs"]
              if r["_path"].with_suffix(".png").exists()]
    return "\n".join(lines + [""])


def kernel_groups(runs: list[dict]) -> dict:
    """{(device_type, device, batch, dtype): {"records": {(op, pass, stage, provider): rec}, "runs": [...]}};
    runs over subsets of ops, passes or stages merge, the latest figure winning."""
    groups: dict = {}
    for run in runs:
        if run["kind"] != "kernels":
            continue
        key = (run["device_type"], run["device"], run["config"]["batch_size"], run["config"]["dtype"])
        group = groups.setdefault(key, {"records": {}, "runs": []})
        group["runs"].append(run)
        for r in run["results"]:
            if r.get("error") != common.INTERRUPTED:  # never measured: keeps what an earlier run had
                group["records"][(r["op"], r["pass"], r["stage"], r["provider"])] = r
    _drop_superseded_runs(groups)
    return {k: groups[k] for k in sorted(groups, key=lambda k: (k[0] != "cuda", k[1], k[2], k[3]))}


def kernels_section(key, group, base: Path) -> str:
    dev_type, device, batch, dtype = key
    records = sorted(group["records"].values(), key=lambda r: (r["op"], r["pass"], r["stage"]))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    cases: dict = {}
    for r in records:
        case = (r["op"], r["pass"], "×".join(map(str, r["shape"][1:])))
        cases.setdefault(case, {"bound": f"{r['bound_ms']:.3g}"})[r["provider"]] = (
            "error" if r["ms"] is None else f"{r['ms']:.3g} ({r['pct_roofline']:.0f}%)")
    rows = [[op, p, shape, vals["bound"], *[vals.get(pr, "–") for pr in providers]]
            for (op, p, shape), vals in cases.items()]
    where = "GPU" if dev_type == "cuda" else "CPU"
    ceilings = "; ".join(
        f"copy {r['ceilings']['copy_gbps']:.0f} GB/s, {r['ceilings']['matmul_dtype']} matmul "
        f"{r['ceilings']['matmul_tflops']:.3g} TFLOP/s"
        + (f", fp32 FMA {r['ceilings']['fp32_tflops']:.3g} TFLOP/s" if "fp32_tflops" in r["ceilings"] else "")
        for r in group["runs"])
    details = ", ".join(f"[{r['_path'].with_suffix('.md').name}]({_rel(r['_path'].with_suffix('.md'), base)})"
                        for r in group["runs"])
    lines = [
        f"### Fused ops at the ConvNeXt-T stage shapes, batch {batch}, {dtype}, {where}: {device}",
        "",
        f"Milliseconds (% of the roofline bound: max(minimum bytes / copy bandwidth, FLOPs / compute "
        f"ceiling), the ceilings measured in the run: {ceilings}; the compute ceiling is the matmul peak "
        f"for mlp_layerscale and, where measured, the fp32 FMA rate for dwconv_layernorm). Commands: "
        + "; ".join(f"`{r['command']}`" for r in group["runs"]) + f"; details in {details}.",
        "",
        common.markdown_table(["op", "pass", "H×W×C", "bound ms", *providers], rows),
        "",
    ]
    return "\n".join(lines)


def _rel(path: Path, base: Path) -> str:
    """path as a link from a file in directory base (the README's)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def render(results_dir: Path, readme_dir: Path) -> str:
    """The Performance section body; links are relative to readme_dir."""
    runs = load_runs(results_dir)
    if not runs:
        return "No benchmark results are committed yet."
    groups = throughput_groups(runs)
    parts = [
        "Generated by `python benchmarks/readme_performance.py` from the JSON files in "
        "`benchmarks/results/` (do not edit by hand). Images/s: median of the timed iterations of "
        "`benchmarks/throughput.py`; × eager_cl: against the reference model in eager PyTorch with "
        "channels-last memory; MB/img: `torch.cuda.max_memory_allocated` over the timed iterations "
        "(weights, gradients and optimizer state included) divided by the batch, not measured on CPU.",
        "",
        "Targets (the fused model as shipped, best eager-mode backend):",
        "",
        common.markdown_table(["target", "wanted", "measured", "met"], target_rows(groups)),
        "",
    ]
    parts += [throughput_section(k, g, readme_dir) for k, g in groups.items()]
    parts += [kernels_section(k, g, readme_dir) for k, g in kernel_groups(runs).items()]
    return "\n".join(parts).rstrip()


def replace_section(readme_text: str, body: str) -> str:
    start, end = readme_text.find(START), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README needs the markers {START} and {END}, in that order")
    return readme_text[: start + len(START)] + "\n" + body + "\n" + readme_text[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=common.REPO_ROOT / "README.md")
    p.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the README is out of date")
    args = p.parse_args(argv)
    old = args.readme.read_text()
    new = replace_section(old, render(args.results, args.readme.parent))
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date; run python benchmarks/readme_performance.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"updated the Performance section of {args.readme}")
    else:
        print(f"{args.readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
