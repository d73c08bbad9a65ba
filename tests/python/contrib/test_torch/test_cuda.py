"""The CUDA path: code generation everywhere, execution where a GPU is present.

Compile and partition tests shared with the CPU take the ``device`` fixture (test_compile.py,
test_partition.py); this file holds what only the GPU has (streams, CUDA code generation).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tvm.contrib.torch import PyTorchTVMModule, build, compile
import models
from conftest import HAS_CUDA, exact_fp32

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU present")


def _have_cuda_compiler() -> bool:
    """nvcc, or NVRTC through cuda-python (TVM's default CUDA compiler; it needs no GPU)."""
    if shutil.which("nvcc") is not None or HAS_CUDA:
        return True
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return False
    try:
        result, _major, _minor = nvrtc.nvrtcVersion()
    except (RuntimeError, OSError):  # cuda-python present, libnvrtc missing
        return False
    return result == nvrtc.nvrtcResult.NVRTC_SUCCESS


@pytest.mark.skipif(not _have_cuda_compiler(), reason="no CUDA compiler (nvcc or NVRTC) is present")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name, vendor_kernels", [("mlp", True), ("transformer", True),
                                                  ("transformer", False)])
def test_cuda_target_generates_code_without_a_gpu(name, vendor_kernels, dtype, tmp_path):
    """CPU CI compiles the CUDA path (code generation only) so that it cannot silently rot."""
    model, inputs, infos = models.make(name)
    ptm = PyTorchTVMModule(target=build.cuda_target("sm_80"), device="cuda")
    ptm.vendor_kernels = vendor_kernels
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(inputs))
    ptm.from_pytorch(traced, infos, default_dtype=dtype)
    files = ptm.build_tvm(str(tmp_path))
    manifest = json.loads(open(files[0].graph_path).read())
    assert '"kind": "cuda"' in manifest["target"]
    assert manifest["inputs"][0]["dtype"] == dtype
    with open(files[0].lib_path, "rb") as f:
        lib = f.read()
    assert b"cuda" in lib  # the CUDA device module is embedded in the library


@requires_gpu
def test_gpu_runs_on_the_callers_stream(tmp_path):
    """TVM kernels are ordered with torch work on the current stream (no hidden sync)."""
    model, inputs, infos = models.make("mlp")
    model = model.cuda()
    compiled = compile(model, {"input_infos": infos, "export_dir": str(tmp_path)})
    stream = torch.cuda.Stream()
    x = inputs[0].cuda()
    with torch.cuda.stream(stream):
        y = x * 2.0  # queued on `stream`
        out = compiled([y])[0]
        z = out + 1.0
    stream.synchronize()
    with torch.no_grad():
        want = model(x * 2.0) + 1.0
    torch.testing.assert_close(z, want, rtol=1e-3, atol=1e-3)


@requires_gpu
def test_gpu_module_saved_and_reloaded(tmp_path):
    model, inputs, infos = models.make("cnn")
    model = model.cuda()
    compiled = torch.jit.script(compile(model, {"input_infos": infos,
                                                "export_dir": str(tmp_path / "e")}))
    path = str(tmp_path / "m.pt")
    compiled.save(path)
    x = inputs[0].cuda()
    # map_location="cuda" moves every saved tensor, the program blobs too.
    for loaded in (torch.jit.load(path), torch.jit.load(path, map_location="cuda")):
        torch.testing.assert_close(loaded([x])[0], compiled([x])[0])


@requires_gpu
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_torch_compile_backend_on_gpu(name):
    model, inputs, _ = models.make(name)
    model = model.cuda()
    inputs = [x.cuda() for x in inputs]
    with torch.no_grad(), exact_fp32():
        expected = model(*inputs)
        actual = torch.compile(model, backend="tvm_contrib_torch")(*inputs)
    assert actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
