"""ConvNeXtFused against the reference model with the same weights: outputs and every gradient."""

import copy

import pytest
import torch

import convnext_kernels as ck
from convnext_kernels.reference import ConvNeXt, LayerNorm

from conftest import TRITON_CPU_MISSING, assert_pass_rule, cpu_fp32_precision, max_err, skip_triton_bf16_if_unsupported

SMALL = dict(depths=(1, 1, 2, 1), dims=(40, 80, 160, 320))  # atto dims, fewer blocks


def _pair(backend, layer_scale=0.5, drop_path_rate=0.0, **cfg):
    """A reference model and a ConvNeXtFused holding the same (randomised) weights."""
    cfg = {**SMALL, **cfg}
    torch.manual_seed(0)
    ref = ConvNeXt(num_classes=10, drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale, **cfg)
    with torch.no_grad():  # non-trivial LayerNorm affines, biases and layer scales
        for name, p in ref.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.2)
    fused = ck.ConvNeXtFused(num_classes=10, drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale,
                             backend=backend, **cfg)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _forward_backward(model, x, seed=0):
    torch.manual_seed(seed)  # the same drop-path draws for both models
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [p for _, p in model.named_parameters()])
    return out, dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_drop_path"])
def test_fused_model_matches_reference(backend, train):
    ref, fused = _pair(backend, drop_path_rate=0.4 if train else 0.0)
    ref.train(train)
    fused.train(train)
    x = torch.randn(3, 3, 72, 100)  # odd sizes: 18x25 -> 9x12 -> 4x6 -> 2x3
    ref64 = ConvNeXt(num_classes=10, drop_path_rate=0.4 if train else 0.0, **SMALL).double().train(train)
    ref64.load_state_dict(ref.state_dict())
    out64, grads64 = _forward_backward(ref64, x.double())
    out32, grads32 = _forward_backward(ref, x)
    out, grads = _forward_backward(fused, x)
    assert_pass_rule("logits", out, out64, out32, torch.float32)
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert_pass_rule(f"grad {name}", grads[name], grads64[name], grads32[name], torch.float32)


def _assert_model_in_dtype_matches(backend, dtype):
    """ConvNeXtFused (one block a stage) on `backend` with its parameters in dtype, forward and
    every gradient, against float64 by the pass rule. The same-dtype baseline is the same model on
    the torch backend, so that only the two fused ops differ: in 16 bits, torch's own error in the
    stem / downsample layers depends on their layout (NHWC here, NCHW in the reference) and on the
    torch version (2.7's CPU bf16 is 10x less accurate than 2.13's on a downsample bias gradient,
    either backend alike)."""
    fused = _pair(backend, depths=(1, 1, 1, 1))[1].to(dtype)
    baseline = _pair("torch", depths=(1, 1, 1, 1))[1].to(dtype)
    x = torch.randn(2, 3, 64, 64)
    ref64 = ConvNeXt(num_classes=10, depths=(1, 1, 1, 1), dims=SMALL["dims"]).double()
    ref64.load_state_dict(baseline.state_dict())
    out64, grads64 = _forward_backward(ref64, x.double())
    out_e, grads_e = _forward_backward(baseline, x.to(dtype))
    out, grads = _forward_backward(fused, x.to(dtype))
    assert out.dtype == dtype
    assert_pass_rule("logits", out, out64, out_e, dtype)
    for name in grads64:
        assert grads[name].dtype == dtype, name
        assert_pass_rule(f"grad {name}", grads[name], grads64[name], grads_e[name], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_model_with_16_bit_parameters(dtype):
    # The whole model in 16 bits, no autocast (README: inference without autocast's weight casts);
    # the gradients come back in the parameters' dtype (in bf16 from the bf16 weight-gradient
    # GEMMs where the CPU has AVX512-BF16).
    _assert_model_in_dtype_matches("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemms", ["1", "0"], ids=["package_gemms", "torch_gemms"])
def test_cpu_model_on_either_gemm_library(gemms, dtype, monkeypatch):
    # The cpu backend's GEMM library follows the CPU's maker (oneDNN and gemm_tn_bf16_cpu on AMD,
    # torch's matmuls elsewhere: launchers/cpu.py); the model passes on either, so a machine of
    # one maker checks the other's route too.
    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", gemms)
    _assert_model_in_dtype_matches("cpu", dtype)


@pytest.mark.parametrize("case", ["bfloat16", "float16", "bf16_autocast"])
def test_cpu_16_bit_layer_norms_sum_in_fp32(case):
    """ConvNeXtFused's own LayerNorms (stem, downsampling, head) on 16-bit CPU tensors: output,
    input and parameter gradients by the pass rule, against the official channels_first
    LayerNorm in the same dtype. torch's CPU layer_norm sums 16-bit inputs' weight and bias
    gradients with 16-bit roundings (5% relative error in bf16 over these 4096 rows)."""
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    param_dtype = torch.float32 if case == "bf16_autocast" else dtype
    norm = ck.ConvNeXtFused(**SMALL).downsample_layers[0][1]
    official = LayerNorm(SMALL["dims"][0], eps=1e-6, data_format="channels_first")
    torch.manual_seed(0)
    with torch.no_grad():
        official.weight.normal_(1.0, 0.2)
        official.bias.normal_(0.0, 0.2)
    norm.load_state_dict(official.state_dict())
    x = torch.randn(4, 32, 32, SMALL["dims"][0]) * 3 + 1
    dy = torch.randn(x.shape)

    def run(module, dtype, channels_first=False):
        module = copy.deepcopy(module).to(torch.float64 if dtype == torch.float64 else param_dtype)
        xs = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast" and dtype != torch.float64):
            out = module(xs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if channels_first else module(xs)
        out.backward(dy.to(out.dtype))
        return {"out": out, "dx": xs.grad, "dweight": module.weight.grad, "dbias": module.bias.grad}

    got, ref64, eager = run(norm, dtype), run(official, torch.float64, True), run(official, dtype, True)
    assert got["out"].dtype == got["dx"].dtype == dtype and got["dweight"].dtype == param_dtype
    for name in got:
        assert_pass_rule(name, got[name], ref64[name], eager[name], dtype)


@pytest.mark.skipif(bool(TRITON_CPU_MISSING), reason=f"triton on CPU tensors: {TRITON_CPU_MISSING}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_model_matches_reference_through_interpreter(dtype):
    # Under the interpreter off a GPU (conftest); bf16 through tests/triton_interpreter_bf16.py.
    skip_triton_bf16_if_unsupported("triton", dtype)
    _assert_model_in_dtype_matches("triton", dtype)

def test_forward_features_and_intermediates():
    ref, fused = _pair("cpu")
    ref.eval(), fused.eval()
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        feats = fused.forward_features(x)
        inter = fused.forward_intermediates(x)
        expected = []
        h = x
        for i in range(4):
            h = ref.stages[i](ref.downsample_layers[i](h))
            expected.append(h)
        torch.testing.assert_close(feats, ref.forward_features(x), rtol=1e-4, atol=1e-4)
    assert len(inter) == 4
    for got, want in zip(inter, expected):
        assert got.shape == want.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_no_layer_scale_and_grad_checkpointing():
    ref, fused = _pair("cpu", layer_scale=0.0)
    assert "stages.0.0.gamma" not in fused.state_dict()
    x = torch.randn(2, 3, 32, 32)
    out, grads = _forward_backward(fused, x)
    fused.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _forward_backward(fused, x)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,depths,dims", [
    ("atto", (2, 2, 6, 2), (40, 80, 160, 320)),
    ("femto", (2, 2, 6, 2), (48, 96, 192, 384)),
    ("pico", (2, 2, 6, 2), (64, 128, 256, 512)),
    ("nano", (2, 2, 8, 2), (80, 160, 320, 640)),
    ("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
    ("small", (3, 3, 27, 3), (96, 192, 384, 768)),
    ("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
    ("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
    ("xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048)),
])
def test_factories(name, depths, dims):
    with torch.device("meta"):  # shapes only: no memory for the big ones
        m = getattr(ck, f"convnext_{name}")(num_classes=5)
    assert tuple(len(s) for s in m.stages) == depths
    assert tuple(s[0].dwconv.in_channels for s in m.stages) == dims
    assert m.head.out_features == 5


def test_model_backend_switch_and_errors(monkeypatch):
    monkeypatch.delenv("CONVNEXT_KERNELS_CUDA_EMULATE", raising=False)  # conftest's: CPU tensors allowed
    m = ck.convnext_atto(backend="torch", num_classes=3)
    assert m.backend == "torch"
    m.set_backend("cuda")
    with pytest.raises(ck.BackendUnavailableError, match="needs CUDA tensors"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4 entries"):
        ck.ConvNeXtFused(depths=(1, 1, 1))


def test_images_of_the_wrong_shape_raise_value_error():
    # 32 pixels a side is the least the stem (stride 4) and three 2x2 downsamplings take; torch's
    # conv would fail at the last downsampling with a message about kernel sizes.
    m = ck.ConvNeXtFused(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3, backend="torch")
    assert m(torch.randn(2, 3, 32, 33)).shape == (2, 3)
    for shape in ((2, 3, 31, 40), (2, 3, 40, 31), (2, 4, 32, 32), (3, 32, 32)):
        with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\) with H, W >= 32"):
            m(torch.randn(shape))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_matches_reference_gpu(backend, dtype):
    ref, fused = _pair(backend, depths=(2, 2, 2, 2), dims=(96, 192, 384, 768))
    ref64 = ConvNeXt(num_classes=10, depths=(2, 2, 2, 2), dims=(96, 192, 384, 768)).double()
    ref64.load_state_dict(ref.state_dict())
    ref, fused, ref64 = ref.cuda().to(dtype), fused.cuda().to(dtype), ref64.cuda()
    x = torch.randn(4, 3, 160, 224, device="cuda")
    out64, grads64 = _forward_backward(ref64, x.double())
    out_e, grads_e = _forward_backward(ref, x.to(dtype))
    out, grads = _forward_backward(fused, x.to(dtype))
    assert_pass_rule("logits", out, out64, out_e, dtype)
    for name in grads64:
        assert_pass_rule(f"grad {name}", grads[name], grads64[name], grads_e[name], dtype)
    assert max_err(out, out64) < 1.0


def _export_check(backend, device):
    """torch.inference_mode and torch.export: outputs equal eager, the graph holds our ops."""
    ref, fused = _pair(backend)
    fused = fused.to(device).eval()
    x = torch.randn(2, 3, 64, 96, device=device)
    with torch.no_grad():
        expected = fused(x)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    exported = torch.export.export(fused, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any(o.startswith(f"convnext_kernels.dwconv_layernorm_fwd_{backend}") for o in ops), ops
    assert any(o.startswith(f"convnext_kernels.mlp_layerscale_fwd_{backend}") for o in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_inference_mode_and_export(backend):
    _export_check(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inference_mode_and_export_gpu(backend):
    _export_check(backend, "cuda")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("model", ["fused_torch", "fused_cpu", "converted_reference"])
def test_onnx_export(model, dynamo, tmp_path):
    """torch.onnx.export of a ConvNeXtFused or a converted model gives a plain ONNX graph (the ops
    compute with the reference functions while it exports) that onnxruntime runs, at another
    batch size too, giving what the model gives."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
        if torch.__version__ < (2, 8):
            pytest.skip("torch.onnx.is_in_onnx_export() is set by the dynamo exporter from torch 2.8 on")
    ref, fused = _pair(model.removeprefix("fused_") if model.startswith("fused_") else "cpu")
    net = (fused if model.startswith("fused_") else ck.convert_model(ref, backend="cpu")).eval()
    path = str(tmp_path / "model.onnx")
    x = torch.randn(2, 3, 64, 96)
    if dynamo:
        torch.onnx.export(net, (x,), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(net, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    graph = onnx.load(path).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, {n.domain for n in graph.node}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        images = torch.randn(batch, 3, 64, 96)
        (got,) = session.run(None, {"x": images.numpy()})
        with torch.no_grad():
            expected = net(images)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_step_in_a_cuda_graph_gpu(backend, dtype, monkeypatch):
    """Forward and backward captured in a CUDA graph (by hand, as torch.compile's "reduce-overhead"
    mode does) replay as they run eagerly, for new inputs: every launch is on the current stream,
    nothing synchronises with the host, workspaces come from torch's allocator, and no value is
    fixed at capture time. Eager and replay run the same kernels (deterministic cuDNN for the stem
    and downsampling convs); the tolerance allows a rounding, not a stale or unwritten buffer."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _, fused = _pair(backend)
    fused = fused.cuda().to(dtype)
    params = list(fused.parameters())
    static_x = torch.empty(4, 3, 64, 96, device="cuda", dtype=dtype)

    def step():
        out = fused(static_x)
        return [out] + list(torch.autograd.grad(out.float().square().sum(), params))

    gen = torch.Generator(device="cuda").manual_seed(0)
    static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=gen))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream: autotuning, lazy set-up
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=gen))
        graph.replay()
        replayed = [t.clone() for t in captured]
        eager = step()
        for i, (got, want) in enumerate(zip(replayed, eager)):
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=lambda m: f"output {i} (0: logits, then {len(params)} gradients): {m}")


def _torch_func_check(backend, device):
    """Functional training and analysis of a whole ConvNeXtFused with torch.func: grad_and_value of
    functional_call (training mode, drop path) equals autograd; an ensemble of two models vmapped
    over their stacked parameters, and per-sample gradients (vmap of grad) equal loops over the
    models and the samples. vmap also needs the stem's channels_last copy made without a memory
    format argument (vmap has none)."""
    import copy

    _, fused = _pair(backend, depths=(1, 1, 1, 1), drop_path_rate=0.3)
    fused = fused.to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    params = {n: p.detach() for n, p in fused.named_parameters()}

    def loss(params, x):
        return torch.func.functional_call(fused, params, (x,)).square().sum()

    torch.manual_seed(1)
    grads, value = torch.func.grad_and_value(loss)(params, x)
    out, expected = _forward_backward(fused, x, seed=1)
    assert torch.equal(value, out.square().sum())
    for name, want in expected.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-6 * want.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")

    fused.eval()  # no drop path: vmap refuses random draws unless told how to batch them
    other = _pair(backend, depths=(1, 1, 1, 1))[1].to(device).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    stacked, buffers = torch.func.stack_module_state([fused, other])
    skeleton = copy.deepcopy(fused).to("meta")
    ensemble = torch.func.vmap(lambda p, b, x: torch.func.functional_call(skeleton, (p, b), (x,)),
                               in_dims=(0, 0, None))(stacked, buffers, x)
    for k, model in enumerate((fused, other)):
        with torch.no_grad():
            torch.testing.assert_close(ensemble[k], model(x), rtol=1e-5, atol=1e-5, msg=lambda m: f"model {k}: {m}")

    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for n in range(x.shape[0]):
        _, want = _forward_backward(fused, x[n:n + 1])
        for name in want:
            torch.testing.assert_close(per_sample[name][n], want[name], rtol=1e-5,
                                       atol=1e-5 * want[name].abs().max().item(),
                                       msg=lambda m: f"sample {n}, grad {name}: {m}")


# Triton's interpreter takes over a minute here: test_ops.py's test_torch_func_transforms covers
# the Triton ops under torch.func on CPU tensors.
@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"])
def test_torch_func_transforms_on_the_model(backend):
    _torch_func_check(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_func_transforms_on_the_model_gpu(backend, monkeypatch):
    # vmap runs the stem and downsampling convs as other cuDNN calls (grouped over the models,
    # batched differently) than the loops compared with: deterministic algorithms there (and
    # fp32, not TF32, as conftest sets for every test).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    _torch_func_check(backend, "cuda")


def test_double_backward_is_refused():
    # The backward ops have no autograd formula: a second derivative must raise, not come out zero.
    x = torch.randn(1, 5, 6, 40, requires_grad=True)
    w, b, nw, nb = torch.randn(40, 1, 7, 7), torch.randn(40), torch.randn(40), torch.randn(40)
    y = ck.dwconv_layernorm(x, w, b, nw, nb, backend="cpu")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        g.sum().backward()


@pytest.mark.parametrize("precision", ("highest", "medium"))
@pytest.mark.parametrize("fp16_in_fp32", (True, False), ids=("no_fp16_conv", "fp16_conv"))
def test_stem_and_downsample_convs_in_fp16_on_cpu(fp16_in_fp32, precision, monkeypatch):
    """Under CPU fp16 autocast, where the CPU has no fp16 convs, the stem and downsampling convs
    run as fp32 convs of the fp16-rounded operands with autocast off (not under a lowered fp32
    conv precision), and give what autocast's fp16 convs give, up to summation order."""
    import convnext_kernels.model as model_module

    _, fused = _pair("cpu", depths=(1, 1, 1, 1))  # blocks in C++: the convs are the model's four
    x = torch.randn(2, 3, 64, 64)

    def run(reroute):
        monkeypatch.setattr(model_module, "CPU_FP16_IN_FP32", reroute)
        autocast_at_conv = []
        real = torch.nn.functional.conv2d

        def spy(*args, **kwargs):
            autocast_at_conv.append(torch.is_autocast_enabled("cpu"))
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
        with cpu_fp32_precision("conv", precision), torch.autocast("cpu", dtype=torch.float16):
            out = fused(x)
        grads = torch.autograd.grad(out.float().square().sum(), list(fused.parameters()))
        monkeypatch.setattr(torch.nn.functional, "conv2d", real)
        return out, grads, autocast_at_conv

    out, grads, autocast_at_conv = run(fp16_in_fp32)
    rerouted = fp16_in_fp32 and precision == "highest"
    assert autocast_at_conv == [not rerouted] * 4, "stem + 3 downsampling convs"
    assert out.dtype == torch.float16 and all(g.dtype == torch.float32 for g in grads)
    out_ref, grads_ref, _ = run(False)  # torch's own fp16 convs
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    for (name, _), g, g_ref in zip(fused.named_parameters(), grads, grads_ref):
        scale = g_ref.abs().max().item()
        assert max_err(g, g_ref) <= 3e-2 * max(scale, 1e-3), name
