"""The kernel profiler: where a compiled model's time goes (Python API and CLI)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tvm.contrib.torch as tvm_torch
from tvm.contrib.torch.profiler import OUTSIDE_TVM, VM_OVERHEAD, profile


class ConvNet(torch.nn.Module):
    """Two convolutions (oneDNN on CPU), a mean and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.rand(1, 3, 16, 16)
    export_dir = str(tmp_path_factory.mktemp("profiler"))
    module = tvm_torch.compile(torch.jit.trace(model, x),
                               {"input_infos": [("x", (1, 3, 16, 16))],
                                "export_dir": export_dir})
    return model, module, x, export_dir


def test_rows_name_each_kernel_with_its_calls_and_add_up(compiled):
    _, module, x, _ = compiled
    report = profile(module, [x], repeat=4, warmup=1)
    # The first convolution reads the NCHW input itself (conv2d_nchw_input), the second NHWC;
    # both write into the program's planned memory (their "_out" variants).
    convs = {r.name: r for r in report.rows if r.name.startswith("tvm_torch.conv2d_")}
    assert sorted(convs) == ["tvm_torch.conv2d_nchw_input_out", "tvm_torch.conv2d_nhwc_out"], \
        convs
    assert all(r.calls == 1 and r.kind == "vendor: oneDNN" for r in convs.values())
    assert any(r.kind == "TVM" for r in report.rows), report.table(top=None)
    names = {r.name for r in report.rows}
    assert {VM_OVERHEAD, OUTSIDE_TVM} <= names
    assert sum(r.share for r in report.rows) == pytest.approx(1.0, abs=0.02)
    assert report.latency_ms > 0 and report.profiled_ms > 0
    text = report.table(top=None)
    assert "tvm_torch.conv2d_nhwc_out" in text and "vendor: oneDNN" in text


def test_profiling_leaves_results_unchanged_and_switches_off(compiled):
    model, module, x, _ = compiled
    profile(module, [x], repeat=2, warmup=0)
    with torch.no_grad():
        torch.testing.assert_close(module([x])[0], model(x), rtol=1e-4, atol=1e-4)
    # Off again: a second profile starts from zero, not from the first one's totals.
    second = profile(module, [x], repeat=1, warmup=0)
    assert [r.calls for r in second.rows if r.name == "tvm_torch.conv2d_nhwc_out"] == [1]


def test_a_model_without_tvm_programs_is_refused(compiled):
    model, _, x, _ = compiled
    with pytest.raises(ValueError, match="the model ran no TVM program"):
        profile(torch.jit.trace(model, x), [x], repeat=1, warmup=0)
    with pytest.raises(ValueError, match="repeat must be a positive int, got 0"):
        profile(model, [x], repeat=0)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tvm.contrib.torch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_profile_command_prints_the_kernels_of_a_saved_model(compiled):
    _, module, _, export_dir = compiled
    torch.jit.script(module).save(os.path.join(export_dir, "model.pt"))
    proc = _cli("profile", "model.pt", "--input", "x:1x3x16x16:float32", "--repeat", "3",
                cwd=export_dir)
    assert proc.returncode == 0, proc.stderr
    assert "latency" in proc.stdout and "tvm_torch.conv2d_nhwc_out" in proc.stdout
    proc = _cli("profile", "model.pt", "--input", "x:1x3x16x16:float99", cwd=export_dir)
    assert proc.returncode == 2
    assert "unknown dtype 'float99'" in proc.stderr
