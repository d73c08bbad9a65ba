"""CPU convolutions as compiled oneDNN Graph partitions (src/contrib/torch/
onednn_graph_conv.cc): each call site's chain (convolution, bias, fused epilogue, residual add)
is built once per input size, and must compute what PyTorch computes (in bfloat16, what it
computes under torch.autocast), as the pointwise op it replaces does, for every epilogue,
every batch size and concurrent first calls."""
from __future__ import annotations

import threading

import pytest
import torch
import tvm

from tvm.contrib.torch import compile
from tvm.contrib.torch.build import cpu_has_bfloat16
from conftest import assert_matches_with_nan_and_inf, exact_fp32


def set_graph_convs(enabled: bool) -> bool:
    """Switch the runtime between partitions and the pointwise op; returns the old setting."""
    return bool(tvm.get_global_func("tvm_torch.set_onednn_graph_convs")(enabled))


def partitions_built() -> int:
    return int(tvm.get_global_func("tvm_torch.onednn_graph_convs_built")())


#: Convolution call sites of _Chains: 9 + strided + grouped + depthwise.
CHAINS = 12


@pytest.fixture
def graph_convs(request):
    previous = set_graph_convs(request.param)
    yield request.param
    set_graph_convs(previous)


class _Chains(torch.nn.Module):
    """One convolution per chain the CPU kernel takes: each fused epilogue, the ones ATen
    applies after it (ReLU, ReLU6, hardsigmoid), a residual add (+ ReLU), a strided, a
    grouped and a depthwise one."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(9))
        self.strided = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = torch.nn.Conv2d(16, 16, 5, padding=2, groups=16)

    def forward(self, x):
        f = torch.nn.functional
        a = f.silu(self.convs[0](x))
        b = torch.sigmoid(self.convs[1](a))
        c = torch.tanh(self.convs[2](b))
        d = f.hardswish(self.convs[3](c))
        e = f.relu6(self.convs[4](d)) + f.hardsigmoid(self.convs[5](d))
        g = torch.relu(self.convs[6](e) + a)
        h = self.convs[7](g) + b
        k = torch.relu(self.convs[8](h))
        s = self.depthwise(self.grouped(self.strided(k)))
        return g, h, s


def _compile(model, shape, tmp_path, **extra):
    return compile(model, {"input_infos": [("x", shape)], "export_dir": str(tmp_path), **extra})


@pytest.mark.parametrize("graph_convs", [True, False], ids=["partition", "pointwise"],
                         indirect=True)
def test_convolution_chains_match_pytorch(graph_convs, tmp_path):
    torch.manual_seed(0)
    model = _Chains().eval()
    built = partitions_built()
    module = _compile(model, (2, 8, 16, 16), tmp_path)
    assert_matches_with_nan_and_inf(module, model, torch.randn(2, 8, 16, 16), (1, 2, 3, 4))
    # Every chain is one partition, built once (at compile's check of the module).
    assert partitions_built() - built == (CHAINS if graph_convs else 0)


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions "
                    "(AVX-512 BF16 or AMX)")
@pytest.mark.parametrize("graph_convs", [True, False], ids=["partition", "pointwise"],
                         indirect=True)
def test_bfloat16_chains_match_autocast(graph_convs, tmp_path):
    """A bfloat16 program's chains compute in bfloat16 and pass bfloat16 results from one to the
    next: as the float32 model under torch.autocast computes, NaN and Inf included."""
    torch.manual_seed(0)
    model = _Chains().eval()
    built = partitions_built()
    module = _compile(model, (2, 8, 16, 16), tmp_path, default_dtype="bfloat16")
    assert_matches_with_nan_and_inf(module, model, torch.randn(2, 8, 16, 16), (1, 2, 3, 4),
                                    dtype=torch.bfloat16)
    assert partitions_built() - built == (CHAINS if graph_convs else 0)


def test_every_batch_size_of_a_dynamic_batch(tmp_path):
    """A partition is built per input size, up to a bound per weight; sizes past it run on the
    pointwise op. Ten sizes cross the bound, and sizes seen before reuse their partition."""
    torch.manual_seed(0)
    model = _Chains().eval()
    built = partitions_built()
    module = _compile(model, ("batch", 8, 12, 12), tmp_path, dim_ranges={"batch": (1, 16)})
    for n in list(range(1, 11)) + [3, 1]:
        x = torch.randn(n, 8, 12, 12)
        with torch.no_grad(), exact_fp32():
            for actual, expected in zip(module([x]), model(x)):
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The first 8 sizes each weight sees (compile's check included) get a partition.
    assert partitions_built() - built == 8 * CHAINS


class _OnePixel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def test_one_pixel_image(tmp_path):
    """A 3x3 convolution (with a residual add) of a 1x1 image: strides of size-1 dims may
    differ between the tensors the program passes and the ones the partition was built for."""
    torch.manual_seed(0)
    model = _OnePixel().eval()
    built = partitions_built()
    module = _compile(model, (3, 8, 1, 1), tmp_path)
    x = torch.randn(3, 8, 1, 1)
    with torch.no_grad(), exact_fp32():
        torch.testing.assert_close(module([x])[0], model(x), rtol=1e-4, atol=1e-4)
    assert partitions_built() - built == 1


class _LargeGate(torch.nn.Module):
    """A squeeze-excite block whose two 1x1 convolutions of the pooled image have 64K weights
    each: partitions of their own (smaller gates run on MKL's GEMV)."""

    def __init__(self):
        super().__init__()
        self.reduce = torch.nn.Conv2d(256, 256, 1)
        self.expand = torch.nn.Conv2d(256, 256, 1)

    def forward(self, x):
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.nn.functional.hardsigmoid(gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_large_squeeze_excite_gates(dtype, tmp_path):
    if dtype == torch.bfloat16 and not cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)")
    torch.manual_seed(0)
    model = _LargeGate().eval()
    built = partitions_built()
    module = _compile(model, (1, 256, 4, 4), tmp_path,
                      default_dtype=str(dtype).replace("torch.", ""))
    assert_matches_with_nan_and_inf(module, model, torch.randn(1, 256, 4, 4), (0, 5, 1, 2),
                                    dtype=dtype)
    assert partitions_built() - built == 2


def test_concurrent_first_calls(tmp_path):
    """Threads calling a freshly loaded module at once build each partition once and all get
    PyTorch's result."""
    torch.manual_seed(0)
    model = _Chains().eval()
    saved = str(tmp_path / "model.pt")
    torch.jit.script(_compile(model, (1, 8, 16, 16), tmp_path / "export")).save(saved)
    module = torch.jit.load(saved)  # its weights are prepared, and partitions built, at a call
    built = partitions_built()
    inputs = [torch.randn(1, 8, 16, 16) for _ in range(4)]
    with torch.no_grad(), exact_fp32():
        expected = [model(x) for x in inputs]
    results, errors = [None] * 4, []
    start = threading.Barrier(4)

    def call(i):
        try:
            start.wait()
            with torch.no_grad():
                results[i] = module([inputs[i]])
        except Exception as err:  # pylint: disable=broad-except
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert partitions_built() - built == CHAINS
    for got, want in zip(results, expected):
        for actual, reference in zip(got, want):
            torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4)


def test_switch_returns_the_previous_setting():
    first = set_graph_convs(False)
    try:
        assert set_graph_convs(True) is False
        assert set_graph_convs(True) is True
    finally:
        set_graph_convs(first)
