"""An export_dir holds exactly what its last build wrote: no stale programs, no changed files,
no cross-talk between concurrent compiles."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tvm.contrib.torch import PyTorchTVMModule, compile


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()


def test_load_tvm_reads_only_the_last_build(tmp_path):
    export_dir = str(tmp_path / "export")
    first, second = _linear(0), _linear(1)
    compile(first, {"input_infos": [[("x", (2, 8))], [("x", (4, 8))]], "export_dir": export_dir})
    compile(second, {"input_infos": [("x", (2, 8))], "export_dir": export_dir})
    loaded = PyTorchTVMModule().load_tvm(export_dir).build_pytorch_module(1, 1)
    x = torch.randn(2, 8)
    assert loaded.signatures() == ["(float32[2, 8])"]
    torch.testing.assert_close(loaded([x])[0], second(x))
    with pytest.raises(RuntimeError):
        loaded([torch.randn(4, 8)])  # the first build's second bucket is gone


def test_load_tvm_refuses_a_changed_file(tmp_path):
    export_dir = str(tmp_path / "export")
    compile(_linear(0), {"input_infos": [("x", (2, 8))], "export_dir": export_dir})
    with open(os.path.join(export_dir, "bucket0.params"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"bucket0.params is missing or changed"):
        PyTorchTVMModule().load_tvm(export_dir)
    with pytest.raises(FileNotFoundError, match="no exported program"):
        PyTorchTVMModule().load_tvm(str(tmp_path))


def test_concurrent_compiles_into_one_export_dir_get_their_own_model(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        import tvm.contrib.torch as tvm_torch
        seed = int(sys.argv[1])
        torch.manual_seed(seed)
        width = 8 + seed  # different programs, not only different weights
        model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.ReLU()).eval()
        module = tvm_torch.compile(model, {"input_infos": [("x", (2, width))],
                                           "export_dir": sys.argv[2], "verify": False})
        x = torch.randn(2, width)
        torch.testing.assert_close(module([x])[0], model(x))
        print("own model")
    """)
    path = tmp_path / "compile_one.py"
    path.write_text(script)
    export_dir = str(tmp_path / "shared_export")
    procs = [subprocess.Popen([sys.executable, str(path), str(seed), export_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "own model" in out
