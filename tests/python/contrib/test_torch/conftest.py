"""Shared fixtures: devices, small exported Relax programs, fresh-process runs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import tvm
from tvm import relax

import tvm.contrib.torch  # noqa: F401  (loads the runtime library)
from tvm.contrib.torch import build, export

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU present")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes it runs once per device (CUDA skipped without a GPU)."""
    return request.param


def target_for(device: str) -> tvm.target.Target:
    """The build target for a device."""
    return build.resolve_target(None, device)


def _affine_program(shape, dynamic: bool):
    """main(x, w, b) -> (x @ w + b, relu(x @ w + b)); x is [n, 8] with n static or symbolic."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("batch", "int64") if dynamic else shape[0]
    x = relax.Var("x", relax.TensorType([n, 8], "float32"))
    w = relax.Var("w", relax.TensorType([8, 16], "float32"))
    b = relax.Var("b", relax.TensorType([16], "float32"))
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(x, w), b))
            z = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    return bb.get()


class AffineProgram:
    """A small exported Relax program and its torch reference."""

    def __init__(self, export_dir: str, device: str, batch=4, dynamic=False, name="prog",
                 target=None):
        torch.manual_seed(0)
        self.weight = torch.randn(8, 16)
        self.bias = torch.randn(16)
        self.dynamic = dynamic
        mod = _affine_program([batch, 8], dynamic)
        target = target or target_for(device)
        executable = build.build(mod, target)
        shape = ["batch", 8] if dynamic else [batch, 8]
        manifest = export.make_manifest(
            inputs=[{"name": "x", "shape": shape, "dtype": "float32"}], num_outputs=2,
            outputs=[], param_names=["w", "b"], target=target,
            dim_ranges={"batch": [1, 64]} if dynamic else None)
        params = {"w": tvm.runtime.tensor(self.weight.numpy()),
                  "b": tvm.runtime.tensor(self.bias.numpy())}
        self.files = export.export_program(executable, mod, manifest, params, export_dir, name)
        self.shape = [-1 if dynamic else batch, 8]

    def reference(self, x: torch.Tensor):
        y = x.float().cpu() @ self.weight + self.bias
        return [y, torch.relu(y)]


@pytest.fixture
def affine_program(tmp_path, device):
    """The program built for each device."""
    return AffineProgram(str(tmp_path / "export"), device)


@pytest.fixture
def cpu_program(tmp_path):
    """The program built for the CPU."""
    return AffineProgram(str(tmp_path / "export"), "cpu")


def set_linear_kernel(kernel: str) -> str:
    """Set the GEMM of the float32 linear layers prepacked from now on ("auto", "onednn" or
    "mkl"); returns the previous setting."""
    return str(tvm.get_global_func("tvm_torch.set_linear_kernel")(kernel))


@pytest.fixture
def linear_kernel(request):
    """The GEMM setting (an indirect parameter) for the weights prepacked during the test;
    the previous setting restored after it."""
    previous = set_linear_kernel(request.param)
    yield request.param
    set_linear_kernel(previous)


@contextlib.contextmanager
def exact_fp32():
    """cuDNN and cuBLAS in true fp32 (PyTorch lets cuDNN use TF32 by default), for the
    reference and for the vendor kernels the compiled module calls alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def scheduled_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """``mod``'s TIR kernels as the build pipeline makes them: legalized, fused and given the
    target's default schedules (:func:`build.default_schedule_pass`)."""
    lowered = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    with target:
        scheduled = build.default_schedule_pass(target)(lowered)
    return [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]


def run_fresh_python(code: str, cwd: str, timeout: int = 300) -> str:
    """Run code in a new interpreter from ``cwd``; return stdout, failing with its stderr.

    The code is written to a file first: TorchScript needs the source of scripted classes.
    """
    script = os.path.join(cwd, "_fresh_process_script.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, script], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"fresh process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def assert_matches_with_nan_and_inf(module, model, x, index, dtype=torch.float32):
    """module([y]) matches model(y) output by output (NaN where model has NaN), for y = x and
    for x with NaN, +inf and -inf at ``index``. With ``dtype=torch.bfloat16``, y is given in
    bfloat16 and model runs under ``torch.autocast("cpu", torch.bfloat16)``: the module of a
    float32 model compiled with ``default_dtype="bfloat16"``."""
    low = dtype == torch.bfloat16
    tolerance = 4e-2 if low else 1e-4
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        if bad is not None:
            y[index] = bad
        y = y.to(dtype)
        with torch.no_grad(), exact_fp32():
            with torch.autocast("cpu", torch.bfloat16, enabled=low):
                expected = model(y)
            actual = module([y])
        expected = expected if isinstance(expected, (tuple, list)) else [expected]
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance, equal_nan=True)


def assert_outputs_close(actual, expected, **kwargs):
    """Compare lists of tensors pairwise on CPU."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e.cpu(), **kwargs)

