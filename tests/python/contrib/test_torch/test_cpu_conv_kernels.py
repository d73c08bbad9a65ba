"""CPU convolution kernels: each call site's chain (convolution, bias, fused epilogue, residual
add) as one oneDNN primitive on the library's own oneDNN (src/contrib/torch/onednn_conv.cc),
or as a compiled oneDNN Graph partition inside libtorch (onednn_graph_conv.cc), or on ATen's
pointwise op. Each is built once per call site and input size, and must compute what PyTorch
computes (in bfloat16, what it computes under torch.autocast), for every epilogue, every
batch size and concurrent first calls."""
from __future__ import annotations

import threading

import pytest
import torch
import tvm

from tvm.contrib.torch import compile
from tvm.contrib.torch.build import cpu_has_bfloat16
from conftest import assert_matches_with_nan_and_inf, exact_fp32


def set_conv_kernel(name: str) -> str:
    """Switch the runtime's CPU convolutions; returns the old setting."""
    return str(tvm.get_global_func("tvm_torch.set_conv_kernel")(name))


def kernels_built() -> tuple[int, int]:
    """(oneDNN primitives, oneDNN Graph partitions) this process has built."""
    return (int(tvm.get_global_func("tvm_torch.onednn_primitive_convs_built")()),
            int(tvm.get_global_func("tvm_torch.onednn_graph_convs_built")()))


def built_since(before: tuple[int, int]) -> tuple[int, int]:
    now = kernels_built()
    return now[0] - before[0], now[1] - before[1]


HAS_ONEDNN = bool(tvm.get_global_func("tvm_torch.onednn_available")())

#: Convolution call sites of _Chains: 9 + strided + grouped + depthwise.
CHAINS = 12

KERNELS = ["primitive", "graph", "pointwise"]


@pytest.fixture
def conv_kernel(request):
    if request.param == "primitive" and not HAS_ONEDNN:
        pytest.skip("the runtime library was built without oneDNN (onednn-devel-cpu-gomp)")
    previous = set_conv_kernel(request.param)
    yield request.param
    set_conv_kernel(previous)


def expected_kernels(conv_kernel: str) -> tuple[int, int]:
    """What compiling _Chains builds: one kernel per chain, of the kind chosen (the first
    convolution, which reads the program's NCHW input, included: oneDNN 3.2 has no fast kernel
    for it, so its primitive reorders the input to NHWC first)."""
    return {"primitive": (CHAINS, 0), "graph": (0, CHAINS), "pointwise": (0, 0)}[conv_kernel]


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


@pytest.mark.parametrize("conv_kernel", KERNELS, indirect=True)
def test_convolution_chains_match_pytorch(conv_kernel, tmp_path):
    torch.manual_seed(0)
    model = _Chains().eval()
    before = kernels_built()
    module = _compile(model, (2, 8, 16, 16), tmp_path)
    assert_matches_with_nan_and_inf(module, model, torch.randn(2, 8, 16, 16), (1, 2, 3, 4))
    # Every chain gets one kernel, built once (at compile's check of the module).
    assert built_since(before) == expected_kernels(conv_kernel)


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions "
                    "(AVX-512 BF16 or AMX)")
@pytest.mark.parametrize("conv_kernel", KERNELS, indirect=True)
def test_bfloat16_chains_match_autocast(conv_kernel, tmp_path):
    """A bfloat16 program's chains compute in bfloat16 and pass bfloat16 results from one to the
    next: as the float32 model under torch.autocast computes, NaN and Inf included."""
    torch.manual_seed(0)
    model = _Chains().eval()
    before = kernels_built()
    module = _compile(model, (2, 8, 16, 16), tmp_path, default_dtype="bfloat16")
    assert_matches_with_nan_and_inf(module, model, torch.randn(2, 8, 16, 16), (1, 2, 3, 4),
                                    dtype=torch.bfloat16)
    assert built_since(before) == expected_kernels(conv_kernel)


def test_every_batch_size_of_a_dynamic_batch(tmp_path):
    """A kernel is built per input size, up to a bound per weight; sizes past it run on the
    pointwise op. Ten sizes cross the bound, and sizes seen before reuse their kernel."""
    torch.manual_seed(0)
    model = _Chains().eval()
    before = kernels_built()
    module = _compile(model, ("batch", 8, 12, 12), tmp_path, dim_ranges={"batch": (1, 16)})
    for n in list(range(1, 11)) + [3, 1]:
        x = torch.randn(n, 8, 12, 12)
        with torch.no_grad(), exact_fp32():
            for actual, expected in zip(module([x]), model(x)):
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The first 8 sizes each weight sees (compile's check included) get a kernel.
    assert sum(built_since(before)) == 8 * CHAINS


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
    before = kernels_built()
    module = _compile(model, (3, 8, 1, 1), tmp_path)
    x = torch.randn(3, 8, 1, 1)
    with torch.no_grad(), exact_fp32():
        torch.testing.assert_close(module([x])[0], model(x), rtol=1e-4, atol=1e-4)
    assert sum(built_since(before)) == 1


class _LargeGate(torch.nn.Module):
    """A squeeze-excite block whose two 1x1 convolutions of the pooled image have 64K weights
    each: convolution kernels of their own (smaller gates run on MKL's GEMV)."""

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
    before = kernels_built()
    module = _compile(model, (1, 256, 4, 4), tmp_path,
                      default_dtype=str(dtype).replace("torch.", ""))
    assert_matches_with_nan_and_inf(module, model, torch.randn(1, 256, 4, 4), (0, 5, 1, 2),
                                    dtype=dtype)
    assert sum(built_since(before)) == 2


def _run_at_once(work, count: int) -> list:
    """Run work(i) for i < count on as many threads, started together (no grad); returns the
    exceptions they raised."""
    errors = []
    start = threading.Barrier(count)

    def run(i):
        try:
            start.wait()
            with torch.no_grad():
                work(i)
        except Exception as err:  # pylint: disable=broad-except
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_concurrent_first_calls(tmp_path):
    """Threads calling a freshly loaded module at once build each kernel once and all get
    PyTorch's result."""
    torch.manual_seed(0)
    model = _Chains().eval()
    saved = str(tmp_path / "model.pt")
    torch.jit.script(_compile(model, (1, 8, 16, 16), tmp_path / "export")).save(saved)
    module = torch.jit.load(saved)  # its weights are prepared, and kernels built, at a call
    before = kernels_built()
    inputs = [torch.randn(1, 8, 16, 16) for _ in range(4)]
    with torch.no_grad(), exact_fp32():
        expected = [model(x) for x in inputs]
    results = [None] * 4

    def call(i):
        results[i] = module([inputs[i]])

    errors = _run_at_once(call, 4)
    assert not errors, errors
    assert sum(built_since(before)) == CHAINS
    for got, want in zip(results, expected):
        for actual, reference in zip(got, want):
            torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4)


def test_more_concurrent_calls_than_memory_slots(tmp_path):
    """A primitive keeps oneDNN memory objects for 4 calls at a time; calls from more threads
    at once make their own. Every call gets its own input's result."""
    torch.manual_seed(0)
    model = _Chains().eval()
    module = _compile(model, (1, 8, 16, 16), tmp_path / "export")
    inputs = [torch.randn(1, 8, 16, 16) for _ in range(10)]
    with torch.no_grad(), exact_fp32():
        expected = [model(x) for x in inputs]
        module([inputs[0]])  # builds the kernels

    def call(i):
        for _ in range(20):
            for actual, reference in zip(module([inputs[i]]), expected[i]):
                torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4)

    errors = _run_at_once(call, 10)
    assert not errors, errors[0]


def test_switch_returns_the_previous_setting():
    first = set_conv_kernel("pointwise")
    try:
        assert first == "primitive"
        assert set_conv_kernel("graph") == "pointwise"
        assert set_conv_kernel("graph") == "graph"
        with pytest.raises(RuntimeError, match="expected 'primitive', 'graph' or 'pointwise', "
                           "got 'cudnn'"):
            set_conv_kernel("cudnn")
        assert set_conv_kernel("graph") == "graph"
    finally:
        set_conv_kernel(first)


def clips_fused() -> int:
    return int(tvm.get_global_func("tvm_torch.onednn_clips_fused")())


class _Clips(torch.nn.Module):
    """A ReLU6 and a ReLU convolution whose inputs are no larger than twice their results
    (where the primitive may fuse the clip), then a strided one (where it never does)."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(4, 16, 1)
        self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.strided = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.expand(x))
        y = torch.relu(self.depthwise(y))
        return torch.relu(self.strided(y))


@pytest.mark.skipif(not HAS_ONEDNN, reason="the runtime library was built without oneDNN "
                    "(onednn-devel-cpu-gomp)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_clips_fuse_only_where_no_nan_can_reach_them(dtype, tmp_path):
    """oneDNN's ReLU and ReLU6 turn NaN into a number. A call fuses them only where its input
    and bias bound every pre-activation value below overflow; NaN, Inf and inputs large
    enough to overflow run the exact convolution and ATen's clip, as PyTorch computes."""
    if dtype == torch.bfloat16 and not cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)")
    torch.manual_seed(0)
    model = _Clips().eval()
    with torch.no_grad():
        model.expand.weight[0, :2] = torch.tensor([2.0, 2.0]).view(2, 1, 1)
    module = _compile(model, (1, 4, 8, 8), tmp_path,
                      default_dtype=str(dtype).replace("torch.", ""))
    low = dtype == torch.bfloat16
    x = torch.randn(1, 4, 8, 8) * 4

    def check(y, fused):
        before = clips_fused()
        y = y.to(dtype)
        with torch.no_grad(), exact_fp32():
            with torch.autocast("cpu", torch.bfloat16, enabled=low):
                expected = model(y)
            actual = module([y])[0]
        tolerance = 4e-2 if low else 1e-4
        torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tolerance,
                                   atol=tolerance, equal_nan=True)
        assert clips_fused() - before == fused
        return actual

    # A finite input: the expansion's and the depthwise convolution's clips are fused.
    check(x, 2)
    # NaN at the input: the expansion runs exact (NaN kept), so the depthwise convolution's
    # input holds NaN too, and it runs exact as well.
    nan = x.clone()
    nan[0, 1, 3, 3] = float("nan")
    assert check(nan, 0).isnan().any()
    # +-Inf at the input: the expansion runs exact; its ReLU6 maps the pixel's +-Inf results
    # to 6 and 0, so the depthwise convolution's input is finite again, and it fuses.
    for bad in (float("inf"), float("-inf")):
        inf = x.clone()
        inf[0, 2, 4, 4] = bad
        check(inf, 1)
    # Finite, but large enough for sums to overflow: the expansion runs exact (its sums reach
    # +-Inf before its clip, as in PyTorch); its clipped result is finite, so the depthwise
    # convolution fuses.
    big = x.clone()
    big[0, :2, 5, 5] = 3e38
    check(big, 1)


@pytest.mark.skipif(not HAS_ONEDNN, reason="the runtime library was built without oneDNN "
                    "(onednn-devel-cpu-gomp)")
def test_fused_clips_can_be_switched_off(tmp_path):
    torch.manual_seed(0)
    model = _Clips().eval()
    module = _compile(model, (1, 4, 8, 8), tmp_path)
    x = torch.randn(1, 4, 8, 8)
    switch = tvm.get_global_func("tvm_torch.set_fused_clips")
    assert switch(False) is True
    try:
        before = clips_fused()
        with torch.no_grad(), exact_fp32():
            torch.testing.assert_close(module([x])[0], model(x), rtol=1e-4, atol=1e-4)
        assert clips_fused() == before
    finally:
        assert switch(True) is False
    module([x])
    assert clips_fused() - before == 2


@pytest.mark.skipif(not HAS_ONEDNN, reason="the runtime library was built without oneDNN "
                    "(onednn-devel-cpu-gomp)")
def test_a_weight_too_large_to_bound_never_fuses_its_clip(tmp_path):
    torch.manual_seed(0)
    model = _Clips().eval()
    with torch.no_grad():
        model.expand.weight[3, 1] = 3e38
    module = _compile(model, (1, 4, 8, 8), tmp_path)
    x = torch.randn(1, 4, 8, 8)
    before = clips_fused()
    with torch.no_grad(), exact_fp32():
        torch.testing.assert_close(module([x])[0], model(x), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)
    # The depthwise convolution's input is bounded (it reads the clipped expansion) and fuses.
    assert clips_fused() - before == 1
