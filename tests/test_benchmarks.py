"""The benchmark scripts: --quick smoke runs as subprocesses, and the README generator on synthetic
results. The CPU runs use one thread: on a shared machine two-thread OpenMP barriers wait on other
processes, and this test checks the files, not the speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BENCHMARK_MODULES, BENCHMARKS_DIR, imported_benchmark_script, package_subprocess_env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

TOP_LEVEL_KEYS = {"device", "versions", "git_commit", "date", "command", "results"}
VERSION_KEYS = {"torch", "triton", "cuda", "driver", "package"}
THROUGHPUT_FIELDS = {"model", "bench", "provider", "backend", "dtype", "batch_size", "img_size", "img_per_s",
                     "peak_mem_mb_per_img", "iters", "speedup_vs_eager_channels_last", "error"}
THROUGHPUT_PROVIDERS = {"eager", "eager_channels_last", "compile", "fused_triton", "fused_cuda", "fused_cpu",
                        "fused_torch", "fused_compile", "resnet50", "cpu_torch_gemm"}
KERNEL_FIELDS = {"op", "pass", "shape", "provider", "backend", "dtype", "ms", "gb_per_s", "pct_copy_bw",
                 "tflop_per_s", "pct_matmul_peak", "bound_ms", "pct_roofline", "speedup_vs_eager", "error"}


@pytest.fixture(autouse=True)
def _benchmark_scripts_importable(monkeypatch):
    """`import kernels` (and the other scripts) finds benchmarks/ first, even where a package of
    the same name was imported before (transformers imports Hugging Face's `kernels`); that
    package is put back after the test."""
    monkeypatch.syspath_prepend(BENCHMARKS_DIR)
    for name in BENCHMARK_MODULES:
        if name in sys.modules and not imported_benchmark_script(name):
            monkeypatch.delitem(sys.modules, name)


def script_env() -> dict:
    """The environment for a benchmark script: conftest.py turns on Triton's interpreter, the
    CUDA emulator and NaN-poisoned outputs for the kernel tests; the benchmarks must run the
    kernels as users do."""
    return package_subprocess_env(drop=("TRITON_INTERPRET", "CONVNEXT_KERNELS_POISON_OUTPUTS",
                                        "CONVNEXT_KERNELS_BACKEND", "CONVNEXT_KERNELS_CUDA_EMULATE"))


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def single_result(out_dir: Path, prefix: str) -> dict:
    files = sorted(out_dir.glob(f"{prefix}_*.json"))
    assert len(files) == 1, files
    json_path = files[0]
    for suffix in (".md", ".png"):
        assert json_path.with_suffix(suffix).is_file(), f"no {suffix} beside {json_path.name}"
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| " in json_path.with_suffix(".md").read_text()  # a results table
    payload = json.loads(json_path.read_text())
    assert TOP_LEVEL_KEYS <= payload.keys()
    assert VERSION_KEYS <= payload["versions"].keys()
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["config"]["quick"] is True and "_quick_" in json_path.name
    assert payload["results"], "no records"
    return payload


def test_throughput_quick_cpu(tmp_path):
    stdout = run_script("throughput.py", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path))
    assert "CPU run" in stdout
    payload = single_result(tmp_path, "throughput")
    records = payload["results"]
    assert {r["bench"] for r in records} == {"infer", "train"}
    for r in records:
        assert THROUGHPUT_FIELDS <= r.keys(), sorted(THROUGHPUT_FIELDS - r.keys())
        assert r["provider"] in THROUGHPUT_PROVIDERS
        assert "compile" not in r["provider"], "--quick leaves the compile providers out unless asked"
        assert (r["img_per_s"] is None) == (r["error"] is not None), r
        if r["img_per_s"] is not None:
            assert r["img_per_s"] > 0 and len(r["iter_ms"]) == r["iters"] >= 1
            assert r["peak_mem_mb_per_img"] is None  # not measured on CPU, so not reported
    base = {r["bench"]: r for r in records if r["provider"] == "eager_channels_last"}
    assert all(base[b]["img_per_s"] and base[b]["speedup_vs_eager_channels_last"] == 1.0 for b in base)
    failed = [r for r in records if r["error"] and not r["error"].startswith("unavailable")]
    assert not failed, failed


def test_cpu_result_files_name_the_cpu_maker(monkeypatch):
    """CPU result files carry the maker (an AMD and an Intel machine's runs of one day must not
    overwrite each other) and record whose GEMMs the cpu backend ran."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    cpu = torch.device("cpu")
    for vendor, slug in (("amd", "cpu-amd"), ("intel", "cpu-intel"), ("", "cpu")):
        monkeypatch.setattr(common, "cpu_vendor", lambda v=vendor: v)
        assert common.device_slug(cpu) == slug
        assert common.result_stem("throughput", cpu, ["tiny"], False).startswith(f"throughput_{slug}_tiny_")
    for linear, gemms in ((None, "torch"), (object(), "onednn")):
        monkeypatch.setattr(common, "cpu_onednn_linear", lambda v=linear: v)
        assert common.environment(cpu, "throughput", {})["host"]["cpu_backend_gemms"] == gemms


def test_throughput_default_providers(monkeypatch):
    """The CPU default leaves fused_compile out (it is what keeps the default CPU run within three
    minutes); a GPU default has it, and every compile provider is out under --quick."""
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput

    monkeypatch.setattr(throughput.common, "fused_backends", lambda ck, device: ["cpu"] if device.type == "cpu"
                        else ["triton", "cuda"])
    monkeypatch.setattr(throughput, "torchvision_missing", lambda: "")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # Where fused_cpu runs oneDNN's GEMMs, it is also timed on torch's own.
    monkeypatch.setattr(throughput.common, "cpu_onednn_linear", lambda: None)
    assert throughput.default_providers(cpu, quick=False) == ["eager", "eager_channels_last", "compile", "fused_cpu"]
    monkeypatch.setattr(throughput.common, "cpu_onednn_linear", lambda: object())
    assert throughput.default_providers(cpu, quick=False) == [
        "eager", "eager_channels_last", "compile", "fused_cpu", "cpu_torch_gemm"]
    assert throughput.default_providers(cpu, quick=True) == [
        "eager", "eager_channels_last", "fused_cpu", "cpu_torch_gemm"]
    assert throughput.default_providers(gpu, quick=False) == [
        "eager", "eager_channels_last", "compile", "fused_triton", "fused_cuda", "fused_compile", "resnet50"]
    assert throughput.default_providers(gpu, quick=True) == [
        "eager", "eager_channels_last", "fused_triton", "fused_cuda", "resnet50"]


def test_throughput_sets_up_each_provider_once_per_bench(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput

    calls = []

    def prepare(record, args):
        calls.append((record["bench"], record["provider"]))
        record["error"] = "not built (test)"

    monkeypatch.setattr(throughput, "prepare", prepare)
    assert throughput.main(["--quick", "--device", "cpu", "--bench", "both", "--providers", "eager,fused_torch",
                            "--out", str(tmp_path)]) == 0
    assert calls == [("infer", "eager"), ("infer", "fused_torch"), ("train", "eager"), ("train", "fused_torch")]


def test_kernels_quick_cpu(tmp_path):
    stdout = run_script("kernels.py", "--quick", "--device", "cpu", "--threads", "1", "--stages", "1,4",
                        "--out", str(tmp_path))
    assert "CPU run" in stdout
    payload = single_result(tmp_path, "kernels")
    ceilings = payload["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
    assert ceilings["fp32_tflops"] == ceilings["matmul_tflops"]  # CPU, float32: the same matmul
    records = payload["results"]
    cases = {(r["op"], r["pass"], r["stage"]) for r in records}
    assert len(cases) == 2 * 2 * 2  # ops x passes x stages
    reported = list(dict.fromkeys((r["op"], r["pass"], r["stage"]) for r in records))
    assert reported == sorted(reported)  # op by op, pass by pass (run stage by stage: case_order)
    for r in records:
        assert KERNEL_FIELDS <= r.keys(), sorted(KERNEL_FIELDS - r.keys())
        assert r["bound_ms"] > 0
        if r["provider"] == "eager":
            assert r["error"] is None and r["ms"] > 0 and r["speedup_vs_eager"] == 1.0


def test_quick_gpu_runs_smoke_the_benchmarked_dtype(monkeypatch):
    """--quick on a GPU runs bf16, the dtype the GPU runs are benchmarked in (kernels.py took the
    quick profile's float32, and so smoke-tested the fp32 kernels instead); on CPU, float32."""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels
    import throughput

    for script in (kernels, throughput):
        assert script.parse_args(["--quick", "--device", "cuda"]).dtype == "bfloat16", script.__name__
        assert script.parse_args(["--quick", "--device", "cpu"]).dtype == "float32", script.__name__


def test_kernels_bound_uses_each_ops_compute_ceiling(monkeypatch):
    """dwconv_layernorm's conv is CUDA-core fp32 FMA work: its FLOP bound divides by the fp32 FMA
    rate; mlp_layerscale's by the matmul peak. At H100-like ceilings, stage 1 bf16 at batch 128,
    the dwconv forward's FLOPs then take longer than its bytes."""
    monkeypatch.syspath_prepend(str(BENCH))
    import argparse

    import kernels

    ceilings = {"copy_gbps": 3000.0, "matmul_tflops": 790.0, "fp32_tflops": 50.0}
    args = argparse.Namespace(batch_size=128, dtype="bfloat16", device=torch.device("cpu"))
    for op, tflops in (("dwconv_layernorm", 50.0), ("mlp_layerscale", 790.0)):
        r = kernels.new_record(op, "fwd", 1, "eager", args, ceilings)
        expected = 1e3 * max(r["model_bytes"] / 3000e9, r["model_flops"] / (tflops * 1e12))
        assert r["bound_ms"] == pytest.approx(expected)
    dw = kernels.new_record("dwconv_layernorm", "fwd", 1, "eager", args, ceilings)
    assert dw["model_flops"] / 50e12 > dw["model_bytes"] / 3000e9


def test_kernels_case_order(monkeypatch):
    """Cases run stage by stage (1, 3, 2, 4), both ops and passes each, so that a GPU run cut by its
    time limit keeps the stages that matter most; the report goes op by op."""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels

    cases = kernels.case_order(kernels.OPS, kernels.PASSES, [1, 2, 3, 4])
    assert [stage for _, _, stage in cases] == [1] * 4 + [3] * 4 + [2] * 4 + [4] * 4
    assert cases[:4] == [("dwconv_layernorm", "fwd", 1), ("mlp_layerscale", "fwd", 1),
                         ("dwconv_layernorm", "fwd+bwd", 1), ("mlp_layerscale", "fwd+bwd", 1)]
    assert kernels.case_order(["mlp_layerscale"], ["fwd"], [4, 2]) == [("mlp_layerscale", "fwd", 2),
                                                                       ("mlp_layerscale", "fwd", 4)]


# Runs a benchmark script's main with SIGINT sent to itself when the `hook` function is first
# called the second time: what gpu_pass.sh's time limit does to a step that runs too long.
_INTERRUPT_DRIVER = """
import os, signal, sys
sys.path.insert(0, {bench!r})
import {module} as script
real, calls = script.{hook}, []
def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)
script.{hook} = hooked
sys.exit(script.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, hook, args", [
    ("kernels", "run_case", ["--stages", "1,4", "--passes", "fwd", "--ops", "dwconv_layernorm"]),
    # Cut inside a case, after its first provider was measured (on a GPU providers are measured
    # one by one, each taking its time to compile and tune).
    ("kernels", "finish", ["--stages", "1", "--passes", "fwd", "--ops", "dwconv_layernorm",
                           "--providers", "eager,fused_cpu"]),
    ("throughput", "prepare", ["--bench", "infer", "--providers", "eager,eager_channels_last,fused_torch"]),
])
def test_interrupted_benchmark_writes_what_it_measured(tmp_path, module, hook, args):
    driver = tmp_path / "driver.py"
    driver.write_text(_INTERRUPT_DRIVER.format(bench=str(BENCH), module=module, hook=hook))
    proc = subprocess.run([sys.executable, str(driver), "--quick", "--device", "cpu", "--threads", "1",
                           "--out", str(tmp_path), *args], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]  # as for Ctrl-C, files written
    assert "interrupted" in proc.stdout
    (json_path,) = tmp_path.glob(f"{module}_*.json")
    payload = json.loads(json_path.read_text())
    assert payload["interrupted"] is True
    assert "**interrupted**" in json_path.with_suffix(".md").read_text()
    records = payload["results"]
    if hook == "run_case":  # the first case measured, the second never started
        assert {r["stage"] for r in records} == {1} and all(r["ms"] for r in records)
    elif hook == "finish":  # the case's first provider measured, its second cut short
        assert [r["provider"] for r in records] == ["eager", "fused_cpu"]
        assert records[0]["ms"] > 0 and records[0]["error"] is None
        assert records[1]["ms"] is None and records[1]["error"] == "interrupted"
    else:  # CPU: providers are timed together, after all are set up, so none was timed
        assert [r["provider"] for r in records] == ["eager", "eager_channels_last", "fused_torch"]
        assert all(r["error"] == "interrupted" and r["img_per_s"] is None for r in records)


def test_kernels_preact_pair_only_times_mlp_training(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels

    everyone = ["eager", "fused_triton", "triton_recompute", "triton_stored"]
    assert kernels.providers_for("mlp_layerscale", "fwd+bwd", everyone) == everyone
    for op, pass_ in (("mlp_layerscale", "fwd"), ("dwconv_layernorm", "fwd+bwd")):
        assert kernels.providers_for(op, pass_, everyone) == ["eager", "fused_triton"]


def test_kernels_preact_pair_steps_run(monkeypatch):
    """The triton_recompute / triton_stored steps (GPU-only providers) run the launchers, here
    through Triton's interpreter, and both backward forms give the same gradients."""
    from conftest import TRITON_CPU_MISSING
    if TRITON_CPU_MISSING:
        pytest.skip(TRITON_CPU_MISSING)
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels

    import convnext_kernels.triton as launchers

    inputs = kernels.make_inputs("mlp_layerscale", 1, 5, 40, torch.float32, True, torch.device("cpu"))
    dy = torch.randn_like(inputs["x"])
    real_bwd, grads = launchers.mlp_layerscale_bwd, []
    monkeypatch.setattr(launchers, "mlp_layerscale_bwd", lambda *a, **k: grads.append(real_bwd(*a, **k)))
    for provider in ("triton_recompute", "triton_stored"):
        kernels.preact_launcher_step(provider, inputs, dy)()
    assert len(grads) == 2
    for recomputed, stored in zip(*grads):
        torch.testing.assert_close(stored, recomputed, rtol=1e-5, atol=1e-6)


def test_kernels_gemm_variant_providers(monkeypatch):
    """cuda_mma_sync and cpu_torch_gemm time only mlp_layerscale, on their backends, with their
    GEMM switch off for the whole step (forward and backward) and the environment as it was
    afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import kernels

    everyone = ["eager", "fused_cuda", "cuda_mma_sync", "cpu_torch_gemm"]
    for pass_ in ("fwd", "fwd+bwd"):
        assert kernels.providers_for("mlp_layerscale", pass_, everyone) == everyone
        assert kernels.providers_for("dwconv_layernorm", pass_, everyone) == ["eager", "fused_cuda"]
    assert kernels.backend_of("cuda_mma_sync") == "cuda" and kernels.backend_of("cpu_torch_gemm") == "cpu"
    assert kernels.backend_of("triton_stored") == "triton" and kernels.backend_of("compile") is None
    assert kernels.GEMM_PROVIDERS["cpu_torch_gemm"][1:] == ("CONVNEXT_KERNELS_CPU_ONEDNN", "0")
    _, name, value = kernels.GEMM_PROVIDERS["cuda_mma_sync"]
    seen = []
    monkeypatch.setenv(name, "1")
    common.with_env(lambda: seen.append(os.environ.get(name)), name, value)()
    assert seen == ["0"] and os.environ[name] == "1"
    monkeypatch.delenv(name)
    common.with_env(lambda: seen.append(os.environ.get(name)), name, value)()
    assert seen == ["0", "0"] and name not in os.environ


def test_cpu_torch_gemm_steps_run_with_the_switch_off(monkeypatch):
    """Both benchmarks time cpu_torch_gemm with CONVNEXT_KERNELS_CPU_ONEDNN=0 set around each step
    (its set-up call included), fused_cpu without it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels
    import throughput

    name = "CONVNEXT_KERNELS_CPU_ONEDNN"
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(throughput.common, "cpu_onednn_linear", lambda: object())
    seen = []

    def record_switch(*args, **kwargs):
        seen.append(os.environ.get(name))

    monkeypatch.setattr(throughput, "make_step", lambda *args: record_switch)
    args = throughput.parse_args(["--quick", "--device", "cpu"])
    for provider in ("fused_cpu", "cpu_torch_gemm"):
        record = throughput.new_record(provider, "infer", args)
        step = throughput.prepare(record, args)
        assert step is not None, record["error"]
        step()
    assert seen == [None, None, "0", "0"]

    seen.clear()
    monkeypatch.setattr(kernels, "op_function", lambda op, provider: record_switch)
    args = kernels.parse_args(["--quick", "--device", "cpu"])
    ceilings = {"copy_gbps": 1.0, "matmul_tflops": 1.0, "fp32_tflops": 1.0}
    for provider in ("fused_cpu", "cpu_torch_gemm"):
        record = kernels.new_record("mlp_layerscale", "fwd", 4, provider, args, ceilings)
        step, _ = kernels.prepare(record, args)
        step()
    assert seen == [None, None, "0", "0"]
    # Where fused_cpu runs torch's GEMMs already, the variant would time it again: unavailable.
    monkeypatch.setattr(kernels.common, "cpu_onednn_linear", lambda: None)
    record = kernels.new_record("mlp_layerscale", "fwd", 4, "cpu_torch_gemm", args, ceilings)
    assert kernels.prepare(record, args) is None and record["error"].startswith("unavailable")


def test_kernels_cuda_ring_provider(monkeypatch):
    """cuda_ring2 times only dwconv_layernorm, on the cuda backend, with the ring-channels switch
    set to 2 for the whole step. (That the switch reaches the kernels: test_cuda_kernels.py.)"""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels

    everyone = ["eager", "fused_cuda", "cuda_mma_sync", "cuda_ring2"]
    for pass_ in ("fwd", "fwd+bwd"):
        assert kernels.providers_for("dwconv_layernorm", pass_, everyone) == ["eager", "fused_cuda", "cuda_ring2"]
        assert kernels.providers_for("mlp_layerscale", pass_, everyone) == ["eager", "fused_cuda", "cuda_mma_sync"]
    assert kernels.backend_of("cuda_ring2") == "cuda"
    assert kernels.CUDA_RING_PROVIDERS["cuda_ring2"] == ("cuda", "CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS", "2")


def test_kernels_ring_variant_providers(monkeypatch):
    """triton_ring6 / triton_rows32 time only dwconv_layernorm, on the triton backend, with the
    ring setting changed for the whole step, which the launcher's tiling follows, and restored
    afterwards."""
    from conftest import TRITON_UNUSABLE
    if TRITON_UNUSABLE:
        pytest.skip(TRITON_UNUSABLE)
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels

    from convnext_kernels.triton import dwconv_layernorm as ring

    everyone = ["eager", "fused_triton", "triton_ring6", "triton_rows32"]
    for pass_ in ("fwd", "fwd+bwd"):
        assert kernels.providers_for("dwconv_layernorm", pass_, everyone) == everyone
        assert kernels.providers_for("mlp_layerscale", pass_, everyone) == ["eager", "fused_triton"]
    assert kernels.backend_of("triton_ring6") == kernels.backend_of("triton_rows32") == "triton"
    seen = []
    for provider in ("triton_ring6", "triton_rows32"):
        name, value = kernels.RING_PROVIDERS[provider]
        kernels.with_ring_setting(lambda: seen.append(ring._ring_tiling(56, 56, 96)), name, value)()
    # Stage 1: 4 warps (6 values a thread) instead of 2; 28-row chunks instead of 14.
    assert seen == [(14, 8, (32, 32, 32), 4), (28, 8, (32, 32, 32), 2)]
    assert ring._ring_tiling(56, 56, 96) == (14, 8, (32, 32, 32), 2)


def test_host_overhead_quick_cpu(tmp_path):
    run_script("host_overhead.py", "--quick", "--device", "cpu", "--out", str(tmp_path))
    records = single_result(tmp_path, "host-overhead")["results"]
    assert {(r["case"], r["bench"]) for r in records} == {
        (case, bench) for case in ("dwconv_layernorm", "mlp_layerscale", "model") for bench in ("infer", "train")}
    for r in records:
        assert "error" not in r, r
        assert r["dispatcher_us"] > 0 and r["direct_us"] > 0, r


def test_host_overhead_times_both_paths():
    """host_overhead.py's dispatcher path sends the ops through torch's dispatcher, and only inside
    it (were it to set nothing the package reads, both paths would time the same calls)."""
    import host_overhead

    args = [t.requires_grad_() for t in (torch.randn(1, 3, 3, 8), torch.randn(8, 1, 7, 7), torch.randn(8),
                                         torch.randn(8), torch.randn(8))]

    def grad_fn_name():
        return type(host_overhead.ck.dwconv_layernorm(*args, backend="cpu").grad_fn).__name__

    with host_overhead.dispatcher_path(True):
        assert not grad_fn_name().endswith("_eagerBackward")
    assert grad_fn_name() == "dwconv_layernorm_fwd_cpu_eagerBackward"
    with host_overhead.dispatcher_path(False):
        assert grad_fn_name() == "dwconv_layernorm_fwd_cpu_eagerBackward"


@pytest.mark.cuda
def test_throughput_quick_gpu(tmp_path):
    run_script("throughput.py", "--quick", "--device", "cuda", "--providers", "eager_channels_last,fused_triton",
               "--out", str(tmp_path), timeout=600)
    payload = single_result(tmp_path, "throughput")
    for r in payload["results"]:
        assert r["error"] is None, r
        assert r["img_per_s"] > 0 and r["peak_mem_mb_per_img"] > 0


# ----------------------------------------------------------------------------------------------
# readme_performance.py on synthetic results
# ----------------------------------------------------------------------------------------------
def _environment(kind, device, device_type, config, date):
    return {"kind": kind, "device": device, "device_type": device_type,
            "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "driver": "580.1", "package": "0.1.0"},
            "git_commit": "0123456789abcdef", "date": date, "command": f"python benchmarks/{kind}.py",
            "config": config}


def _throughput_run(date, infer, train, quick=False, infer_batch=256):
    """infer / train: {provider: (img_per_s, peak MB per image)}."""
    config = {"model": "convnext_tiny", "img_size": 224, "dtype": "bfloat16", "quick": quick}
    run = _environment("throughput", "NVIDIA H100 80GB HBM3", "cuda", config, date)
    run["results"] = []
    for bench, figures in (("infer", infer), ("train", train)):
        base = figures["eager_channels_last"]
        for provider, (ips, mem) in figures.items():
            run["results"].append({
                "model": "convnext_tiny", "bench": bench, "provider": provider, "backend": "x", "dtype": "bfloat16",
                "batch_size": infer_batch if bench == "infer" else 128, "img_size": 224, "img_per_s": ips,
                "peak_mem_mb_per_img": mem, "speedup_vs_eager_channels_last": ips / base[0], "error": None})
    return run


def test_readme_performance(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import readme_performance
    finally:
        sys.path.remove(str(BENCH))

    results = tmp_path / "results"
    results.mkdir()
    old = _throughput_run("2026-01-01T00:00:00+00:00", {"eager_channels_last": (1000.0, 5.0), "fused_triton": (1.0, 1.0)},
                          {"eager_channels_last": (300.0, 100.0), "fused_triton": (1.0, 1.0)})
    new = _throughput_run("2026-02-01T00:00:00+00:00",
                          {"eager_channels_last": (1000.0, 5.0), "compile": (1500.0, 5.0), "fused_triton": (2345.6, 4.0)},
                          {"eager_channels_last": (300.0, 100.0), "compile": (400.0, 90.0), "fused_triton": (450.0, 60.0)})
    quick = _throughput_run("2026-03-01T00:00:00+00:00", {"eager_channels_last": (1.0, 1.0), "fused_triton": (9999.0, 1.0)},
                            {"eager_channels_last": (1.0, 1.0), "fused_triton": (1.0, 1.0)}, quick=True)
    kernels = _environment("kernels", "NVIDIA H100 80GB HBM3", "cuda", {"batch_size": 128, "dtype": "bfloat16"},
                           "2026-02-01T00:00:00+00:00")
    kernels["ceilings"] = {"copy_gbps": 3000.0, "matmul_tflops": 790.0, "matmul_dtype": "bfloat16"}
    kernels["results"] = [{"op": "mlp_layerscale", "pass": "fwd", "stage": 1, "shape": [128, 56, 56, 96],
                           "provider": p, "ms": ms, "bound_ms": 0.5, "pct_roofline": 50 / ms, "error": None}
                          for p, ms in (("eager", 2.0), ("fused_triton", 0.75))]
    # A later run at another inference batch, fused only: it must not be divided by the baseline
    # of the batch-256 run, so it supersedes that bench's older figures (here leaving no baseline).
    other_batch = _throughput_run("2026-02-15T00:00:00+00:00", {"eager_channels_last": (1.0, 1.0), "fused_cuda": (7777.0, 1.0)},
                                  {"eager_channels_last": (1.0, 1.0)}, infer_batch=32)
    other_batch["results"] = [r for r in other_batch["results"] if r["provider"] == "fused_cuda"]  # infer only
    # A run cut short at yet another batch, before it measured anything: it changes nothing.
    cut = _throughput_run("2026-02-20T00:00:00+00:00", {"eager_channels_last": (1.0, 1.0)},
                          {"eager_channels_last": (1.0, 1.0)}, infer_batch=8)
    cut["interrupted"] = True
    for r in cut["results"]:
        r.update(img_per_s=None, peak_mem_mb_per_img=None, error="interrupted")
    for name, run in (("throughput_a", old), ("throughput_b", new), ("throughput_c_quick", quick), ("kernels_a", kernels)):
        (results / f"{name}.json").write_text(json.dumps(run))

    before, after = "# Title\n\n## Performance\n\n", "\n\n## After\n\nkept as is\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + "<!-- performance:start -->\nold text\n<!-- performance:end -->" + after)
    assert readme_performance.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert readme_performance.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith(before + "<!-- performance:start -->\n") and text.endswith("<!-- performance:end -->" + after)
    section = text[text.index("<!-- performance:start -->"):text.index("<!-- performance:end -->")]
    assert "old text" not in section
    assert "2345.6" in section and "9999" not in section  # latest non-quick run wins; quick runs left out
    # Targets: inference 2.35x eager (met) and 1.56x compile (met); training 1.5x eager (not met),
    # memory 0.6x (not met).
    assert "2.35× (fused_triton) | yes" in section
    assert "1.56× (fused_triton) | yes" in section
    assert "1.50× (fused_triton) | **no**" in section
    assert "0.60× (fused_triton) | **no**" in section
    assert "0.75 (67%)" in section  # kernels table: ms (% roofline)
    assert readme_performance.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0

    (results / "throughput_d_batch32.json").write_text(json.dumps(other_batch))
    (results / "throughput_e_cut.json").write_text(json.dumps(cut))
    kernels_cut = dict(kernels, date="2026-03-01T00:00:00+00:00", interrupted=True,
                       results=[dict(kernels["results"][1], ms=None, pct_roofline=None, error="interrupted")])
    (results / "kernels_b_cut.json").write_text(json.dumps(kernels_cut))
    assert readme_performance.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    section = text[text.index("<!-- performance:start -->"):text.index("<!-- performance:end -->")]
    assert "7777" in section and "2345.6" not in section  # inference: only the batch-32 run
    assert "2.35× (fused_triton)" not in section and "7.78" not in section  # no cross-batch ratio
    assert "1.50× (fused_triton) | **no**" in section  # training untouched
    assert "0.75 (67%)" in section and "kernels_b_cut" not in section  # an interrupted record is no figure


def test_readme_performance_targets_from_another_gpu(tmp_path, monkeypatch):
    """With no H100 run, an H200 run is shown against the H100 targets, named, with no verdict."""
    monkeypatch.syspath_prepend(str(BENCH))
    import readme_performance

    results = tmp_path / "results"
    results.mkdir()
    run = _throughput_run("2026-02-01T00:00:00+00:00", {"eager_channels_last": (1000.0, 5.0), "fused_triton": (2500.0, 4.0)},
                          {"eager_channels_last": (300.0, 100.0), "fused_triton": (450.0, 60.0)})
    run["device"] = "NVIDIA H200"
    (results / "throughput_h200.json").write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- performance:start -->\n<!-- performance:end -->\n")
    assert readme_performance.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| H100 ConvNeXt-T inference vs eager"))
    assert "measured on NVIDIA H200, not an H100" in row and "2.50× (fused_triton) | – |" in row


def test_readme_performance_section_is_current():
    """The README's Performance section is what readme_performance.py makes of benchmarks/results/."""
    proc = subprocess.run([sys.executable, str(BENCH / "readme_performance.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + "\nrun: python benchmarks/readme_performance.py"
