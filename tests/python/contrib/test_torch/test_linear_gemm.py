"""Which GEMM a float32 linear layer runs on (src/contrib/torch/linear_kernels.cc): MKL's
packed GEMM for weights of 512 KiB or more on Intel CPUs, oneDNN's inner product otherwise,
chosen when the weight is prepacked; bfloat16 layers, and layers whose row count is only
known per call, always on oneDNN. Each GEMM must compute what PyTorch computes, every
epilogue included."""
from __future__ import annotations

import pytest
import torch
import tvm

from tvm.contrib.torch._library import load_runtime_library
from tvm.contrib.torch.build import cpu_has_bfloat16

from conftest import set_linear_kernel

load_runtime_library()
_prepack = tvm.get_global_func("tvm_torch.linear_prepack")
_runs_on_mkl = tvm.get_global_func("tvm_torch.linear_runs_on_mkl")
_linear = tvm.get_global_func("tvm_torch.linear")
_linear_add = tvm.get_global_func("tvm_torch.linear_add")

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(),
                               reason="this libtorch is built without MKL")


def _intel_cpu() -> bool:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        return any(line.split(":")[-1].strip() == "GenuineIntel"
                   for line in cpuinfo if line.startswith("vendor_id"))


def _tvm(t: torch.Tensor):
    return tvm.runtime.from_dlpack(t)


def _prepacked(weight: torch.Tensor, rows: int, dtype: str = "float32"):
    return _prepack(_tvm(weight), rows, dtype)


@needs_mkl
@pytest.mark.parametrize("linear_kernel", ["mkl", "onednn"], indirect=True)
@pytest.mark.parametrize("epilogue", ["none", "relu", "gelu", "gelu_tanh", "silu", "add"])
def test_each_gemm_matches_pytorch_with_nan_and_inf(linear_kernel, epilogue):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    x, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    x[0, 1, 3], x[1, 2, 0], x[1, 4, 7] = float("nan"), float("inf"), -float("inf")
    residual[0, 0, 5] = float("nan")
    packed = _prepacked(weight, 10)
    assert bool(_runs_on_mkl(packed)) == (linear_kernel == "mkl")
    if epilogue == "add":
        actual = _linear_add(_tvm(x), _tvm(residual), packed, _tvm(bias))
        expected = torch.nn.functional.linear(x, weight, bias) + residual
    else:
        actual = _linear(_tvm(x), packed, _tvm(bias), epilogue)
        y = torch.nn.functional.linear(x, weight, bias)
        f = torch.nn.functional
        expected = {"none": y, "relu": torch.relu(y), "gelu": f.gelu(y),
                    "gelu_tanh": f.gelu(y, approximate="tanh"), "silu": f.silu(y)}[epilogue]
    actual = torch.from_dlpack(actual)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert torch.equal(actual.isnan(), expected.isnan())


@needs_mkl
@pytest.mark.parametrize("linear_kernel", ["mkl"], indirect=True)
def test_mkl_takes_float32_layers_of_a_static_row_count_only(linear_kernel):
    weight = torch.randn(8, 4)
    assert _runs_on_mkl(_prepacked(weight, 3))
    assert not _runs_on_mkl(_prepacked(weight, 0))  # rows known per call: MKL packs for one
    if cpu_has_bfloat16():
        assert not _runs_on_mkl(_prepacked(weight, 3, "bfloat16"))


@needs_mkl
@pytest.mark.parametrize("linear_kernel", ["mkl"], indirect=True)
def test_an_mkl_layer_refuses_another_row_count(linear_kernel):
    """The packed weight is for one row count (a program's static shape)."""
    packed = _prepacked(torch.randn(8, 4), 3)
    with pytest.raises(RuntimeError, match=r"packed for 3 rows of 4 features, got an input of "
                                        r"shape \[5, 4\]"):
        _linear(_tvm(torch.randn(5, 4)), packed, _tvm(torch.zeros(8)), "none")


@pytest.mark.parametrize("linear_kernel", ["auto"], indirect=True)
def test_auto_picks_mkl_for_large_weights_on_intel_cpus_only(linear_kernel):
    large = _intel_cpu() and torch.backends.mkl.is_available()
    assert bool(_runs_on_mkl(_prepacked(torch.randn(512, 256), 3))) == large  # 512 KiB
    assert not _runs_on_mkl(_prepacked(torch.randn(511, 256), 3))


def test_setting_returns_the_previous_one_and_refuses_unknown_names():
    previous = set_linear_kernel("onednn")
    try:
        assert set_linear_kernel("mkl") == "onednn"
        with pytest.raises(RuntimeError, match="expected 'auto', 'onednn' or 'mkl', got 'blas'"):
            set_linear_kernel("blas")
        assert set_linear_kernel("auto") == "mkl"
    finally:
        set_linear_kernel(previous)


def test_a_weight_of_another_kind_is_refused():
    with pytest.raises(RuntimeError, match="expected a prepacked linear weight, got None"):
        _linear(_tvm(torch.randn(2, 4)), None, _tvm(torch.zeros(8)), "none")
