"""A plain C++ libtorch program (apps/pt_tvm_demo/cpp) serves a saved model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tvm.contrib.torch import compile, partition, runtime_library_path
import models
import partition_models

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
APP_DIR = os.path.join(REPO, "apps", "pt_tvm_demo", "cpp")


@pytest.fixture(scope="module")
def infer_binary(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build_dir = tmp_path_factory.mktemp("cpp_build")
    subprocess.run(["cmake", "-S", APP_DIR, "-B", str(build_dir),
                    f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True)
    return str(build_dir / "pt_tvm_infer")


def test_cpp_program_matches_python(infer_binary, tmp_path):
    model, inputs, infos = models.make("cnn")
    compiled = torch.jit.script(compile(torch.jit.trace(model, tuple(inputs)),
                                        {"input_infos": infos,
                                         "export_dir": str(tmp_path / "export")}))
    saved = str(tmp_path / "model.pt")
    compiled.save(saved)
    shutil.rmtree(tmp_path / "export")
    x = inputs[0]
    x.numpy().astype("<f4").tofile(str(tmp_path / "input.bin"))
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([infer_binary, runtime_library_path(), saved,
                           str(tmp_path / "input.bin"), "x".join(map(str, x.shape)),
                           "--output", str(tmp_path / "out.bin"), "--repeat", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output 0 shape [1, 10]" in proc.stdout
    assert "median latency ms" in proc.stdout
    got = torch.from_numpy(np.fromfile(str(tmp_path / "out.bin"), dtype="<f4")).view(1, 10)
    torch.testing.assert_close(got, torch.jit.load(saved)([x])[0], rtol=0, atol=0)
    torch.testing.assert_close(got, models.reference(model, inputs)[0], rtol=1e-4, atol=1e-4)


def test_cpp_program_serves_a_partitioned_model(infer_binary, tmp_path):
    """Control flow in TorchScript, TVM subgraphs in a branch and a loop body, from C++."""
    model = partition_models.init(partition_models.BranchAndLoop())
    x = torch.rand(3, 3, 16, 16)
    saved = str(tmp_path / "model.pt")
    partition(torch.jit.script(model), [x], {"export_dir": str(tmp_path / "export")}).save(saved)
    shutil.rmtree(tmp_path / "export")
    x.numpy().astype("<f4").tofile(str(tmp_path / "input.bin"))
    proc = subprocess.run([infer_binary, runtime_library_path(), saved,
                           str(tmp_path / "input.bin"), "3x3x16x16",
                           "--output", str(tmp_path / "out.bin"), "--repeat", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output 0 shape [3, 4]" in proc.stdout
    got = torch.from_numpy(np.fromfile(str(tmp_path / "out.bin"), dtype="<f4")).view(3, 4)
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-4)


def test_cpp_program_reports_a_missing_runtime_library(infer_binary, tmp_path):
    proc = subprocess.run([infer_binary, str(tmp_path / "missing.so"), "m.pt", "in.bin", "1x2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot load the runtime library" in proc.stderr
