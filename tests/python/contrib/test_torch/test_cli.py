"""python -m tvm.contrib.torch compile: saved TorchScript in, drop-in replacement out."""
from __future__ import annotations

import subprocess
import sys

import torch

import models
from conftest import run_fresh_python


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tvm.contrib.torch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_compile_writes_a_drop_in_replacement(tmp_path):
    model, inputs, _ = models.make("two_in_two_out")
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    proc = _cli("compile", "model.pt", "--input", "a:3x6", "--input", "b:3x5",
                "-o", "model_tvm.pt", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "compiled model.pt -> model_tvm.pt in" in proc.stdout
    assert "latency: TorchScript" in proc.stdout
    torch.save(inputs, str(tmp_path / "inputs.pt"))
    out = run_fresh_python("""
        import torch, tvm.contrib.torch
        original, replaced = torch.jit.load("model.pt"), torch.jit.load("model_tvm.pt")
        assert str(replaced.forward.schema).split(") -> ")[1] == \\
            str(original.forward.schema).split(") -> ")[1]
        a, b = torch.load("inputs.pt")
        for x, y in zip(replaced(a, b), original(a, b)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        print("OK")
    """, cwd=str(tmp_path))
    assert "OK" in out


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    model, _, _ = models.make("mlp")
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    proc = _cli("compile", "model.pt", "--input", "x:4x16", "--input", "y:1", "-o", "o.pt",
                cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: the model's forward takes 1 tensor(s) (x) but 2 "
                                   "--input given")
    proc = _cli("compile", "missing.pt", "--input", "x:4x16", "-o", "o.pt", cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no such model file: missing.pt"
    proc = _cli("compile", "model.pt", "--input", "x=4x16", "-o", "o.pt", cwd=str(tmp_path))
    assert proc.returncode == 2 and "--input must look like NAME:1x3x224x224" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_help_explains_every_flag(tmp_path):
    proc = _cli("compile", "--help", cwd=str(tmp_path))
    assert proc.returncode == 0
    for flag in ("--input", "--dtype", "--trials", "--tuning-log", "--repeat", "--output"):
        assert flag in proc.stdout
