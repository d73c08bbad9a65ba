"""What a call of a compiled module does with inputs PyTorch treats specially: tensors that
require grad (inference only: an error, or the TorchScript fallback in a partitioned model),
lazy negative views, and NaN/Inf (propagated as PyTorch propagates them)."""
from __future__ import annotations

import re

import pytest
import torch
import tvm
from tvm import relax

from tvm.contrib.torch import build, compile, partition, passes
from tvm.contrib.torch.nan_semantics import propagate_nan
from conftest import assert_matches_with_nan_and_inf, exact_fp32, scheduled_kernels


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4)).eval()


def test_grad_requiring_input_is_refused(tmp_path):
    model = _mlp()
    module = compile(model, {"input_infos": [("x", (2, 8))], "export_dir": str(tmp_path)})
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"input 0 requires grad, but compiled modules are "
                                           r"inference-only"):
        module([x])
    with torch.no_grad():
        torch.testing.assert_close(module([x])[0], model(x))


def test_partitioned_model_keeps_gradients_through_its_fallback(tmp_path):
    model = _mlp()
    x = torch.randn(2, 8)
    result = partition(torch.jit.trace(model, x), [x], {"export_dir": str(tmp_path)})
    leaf = torch.randn(2, 8, requires_grad=True)
    result(leaf).sum().backward()  # the TorchScript fallback runs: gradients flow
    expected = torch.randn(2, 8).copy_(leaf.detach()).requires_grad_()
    model(expected).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad)


def test_negative_view_input(tmp_path):
    model = _mlp()
    module = compile(model, {"input_infos": [("x", (2, 8))], "export_dir": str(tmp_path)})
    x = torch.randn(2, 8)
    negated = torch._neg_view(x)  # pylint: disable=protected-access
    assert negated.is_neg()
    torch.testing.assert_close(module([negated])[0], model(-x))


@pytest.mark.parametrize("vendor_kernels", [True, False], ids=["vendor", "tvm"])
def test_nan_and_inf_propagate_as_in_pytorch(vendor_kernels, device, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Hardtanh(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4),
                                torch.nn.ReLU6()).eval().to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    module = compile(model, {"input_infos": [("x", (1, 3, 8, 8))], "export_dir": str(tmp_path),
                             "vendor_kernels": vendor_kernels})
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[0, 0, 2, 2] = bad
        with torch.no_grad(), exact_fp32():
            torch.testing.assert_close(module([y])[0], model(y), equal_nan=True)


def test_nan_through_elementwise_max_min_and_reductions(tmp_path):
    class MaxMin(torch.nn.Module):
        def forward(self, a, b):
            return torch.maximum(a, b), torch.minimum(a, b), a.max(), b.min(), \
                torch.relu(a).clamp(max=0.5), torch.maximum(a, b[3:]), \
                torch.minimum(a[:, :1], b), torch.clamp(b, -0.5, 0.5)

    a, b = torch.randn(4, 6), torch.randn(4, 6)
    a[1, 2], b[3, 0] = float("nan"), float("nan")
    module = compile(MaxMin().eval(), {"input_infos": [("a", (4, 6)), ("b", (4, 6))],
                                       "export_dir": str(tmp_path)})
    for actual, expected in zip(module([a, b]), MaxMin()(a, b)):
        torch.testing.assert_close(actual, expected, equal_nan=True)


@pytest.mark.parametrize("target", ["llvm", "cuda"])
def test_float16_clamps_stay_one_operator_each(target):
    """A float16 program's clamps are one NaN-propagating select each, fused into one kernel.

    ToMixedPrecision needs clip split into maximum and minimum; each of those and of clip reads
    its input three times (``where(isnan(x), x, op(x))``), and inlined into one kernel a chain
    grows as 3**depth: split, relu6 -> relu -> clamp read the input 243 times, and a float16
    model with hardswish, relu6 and clamps took minutes to build for CUDA."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([8, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.clip(x, 0.0, 6.0))
            y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(relax.op.clip(y, -0.5, 5.5))
        bb.emit_func_output(out)
    mod = propagate_nan(passes.to_float16(bb.get()))
    target = build.cuda_target("sm_80") if target == "cuda" else build.host_cpu_target()
    kernels = [f for f in scheduled_kernels(mod, target) if "isnan" in f.script()]
    assert len(kernels) == 1
    body = [line for line in kernels[0].script().splitlines()
            if not line.strip().startswith(("T.reads", "T.writes"))]
    assert sum(len(re.findall(r"\bx\[", line)) for line in body) == 3 ** 3


@pytest.mark.parametrize("op", ["relu", "clip", "minimum"])
def test_nan_through_bfloat16_tvm_kernels(op):
    """relu, clip and minimum on bfloat16 tensors in TVM's kernels match PyTorch exactly, NaN
    included (TIR's isnan takes no bfloat16)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "bfloat16"))
    w = relax.Var("w", relax.TensorType([1, 8], "bfloat16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output({"relu": lambda: relax.op.nn.relu(x),
                                  "clip": lambda: relax.op.clip(x, -0.5, 2.0),
                                  "minimum": lambda: relax.op.minimum(x, w)}[op]())
        bb.emit_func_output(out)
    target = build.host_cpu_target()
    vm = relax.VirtualMachine(build.build(propagate_nan(bb.get()), target), tvm.cpu())
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(1, 8).bfloat16()
    a[0, 0], b[0, 3] = float("nan"), float("nan")
    actual = torch.from_dlpack(vm["main"](tvm.runtime.from_dlpack(a), tvm.runtime.from_dlpack(b)))
    expected = {"relu": torch.relu(a), "clip": a.clamp(-0.5, 2.0),
                "minimum": torch.minimum(a, b)}[op]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


class _FusedLinears(torch.nn.Module):
    """Linear layers with every epilogue the CPU linear kernel fuses: GELU (erf and tanh), SiLU
    (also written as ``x * sigmoid(x)``), a residual add, and ReLU; with and without a bias."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.fc3, self.fc4 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
        self.wi = torch.nn.Linear(16, 32, bias=False)
        self.wo = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        y = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        z = torch.relu(self.fc3(y))
        gate = self.fc3(z)
        swish = gate * torch.sigmoid(gate)  # SiLU written out
        t5 = z + self.wo(torch.relu(self.wi(z)))  # T5's feed-forward block
        return torch.nn.functional.gelu(self.fc4(z), approximate="tanh"), y, \
            torch.nn.functional.silu(self.fc4(swish)), t5


@pytest.mark.parametrize("vendor_kernels,linear_kernel",
                         [(True, "onednn"), (True, "mkl"), (False, "auto")],
                         ids=["vendor-onednn", "vendor-mkl", "tvm"], indirect=["linear_kernel"])
def test_linear_epilogues_match_pytorch_with_nan_and_inf(vendor_kernels, linear_kernel, device,
                                                         tmp_path):
    """On CPU, with the linear layers on each GEMM (MKL's packed one, oneDNN's)."""
    if linear_kernel == "mkl" and (device != "cpu" or not torch.backends.mkl.is_available()):
        pytest.skip("MKL's GEMM is a CPU kernel of libtorch built with MKL")
    torch.manual_seed(0)
    model = _FusedLinears().eval().to(device)
    x = torch.randn(2, 5, 16, device=device)
    module = compile(model, {"input_infos": [("x", (2, 5, 16))], "export_dir": str(tmp_path),
                             "vendor_kernels": vendor_kernels})
    assert_matches_with_nan_and_inf(module, model, x, (1, 3, 4))


class _ConvEpilogues(torch.nn.Module):
    """Convolutions followed by each activation the CPU convolution kernel fuses, and a
    MobileNetV3-style squeeze-excite gate (global pooling, a 1x1 convolution of the pooled
    image, run as a matrix product, then hardsigmoid)."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.gate = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = torch.nn.functional.silu(self.convs[0](x))
        b = torch.sigmoid(self.convs[1](a))
        c = torch.tanh(self.convs[2](b))
        d = torch.nn.functional.hardswish(self.convs[4](c))
        gate = torch.nn.functional.hardsigmoid(self.gate(d.mean((2, 3), keepdim=True)))
        e = torch.nn.functional.relu6(self.convs[5](d * gate))
        return c, torch.relu(self.convs[3](c) + a), self.convs[0](e)


@pytest.mark.parametrize("vendor_kernels", [True, False], ids=["vendor", "tvm"])
def test_conv_epilogues_match_pytorch_with_nan_and_inf(vendor_kernels, device, tmp_path):
    torch.manual_seed(0)
    model = _ConvEpilogues().eval().to(device)
    x = torch.randn(1, 4, 32, 32, device=device)  # 4096 elements: the gate's mean runs on ATen
    module = compile(model, {"input_infos": [("x", (1, 4, 32, 32))], "export_dir": str(tmp_path),
                             "vendor_kernels": vendor_kernels})
    assert_matches_with_nan_and_inf(module, model, x, (0, 1, 2, 3))
