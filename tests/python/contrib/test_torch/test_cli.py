"""python -m tvm.contrib.torch compile: saved TorchScript in, drop-in replacement out."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import models
import partition_models
from conftest import run_fresh_python

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS_DIR] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "tvm.contrib.torch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def test_compile_writes_a_drop_in_replacement(tmp_path):
    model, inputs, _ = models.make("two_in_two_out")
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    proc = _cli("compile", "model.pt", "--input", "a:3x6", "--input", "b:3x5",
                "-o", "model_tvm.pt", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "compiled model.pt -> model_tvm.pt in" in proc.stdout
    assert "latency: TorchScript" in proc.stdout
    assert "operators offloaded to TVM in 1 subgraph(s); 0 kept in TorchScript" in proc.stdout
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


def test_partitions_a_model_with_a_custom_operator(tmp_path):
    model = partition_models.init(partition_models.CustomOpCNN())
    x = torch.rand(1, 3, 16, 16)
    torch.jit.trace(model, (x,)).save(str(tmp_path / "model.pt"))
    proc = _cli("compile", "model.pt", "--input", "x:1x3x16x16",
                "--import-module", "partition_models", "--torch-executed-op", "aten::flatten",
                "--min-block-size", "2", "-o", "model_tvm.pt", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == ("7 of 10 operators offloaded to TVM in 2 subgraph(s); 3 kept in "
                        "TorchScript")
    # linear alone after the kept flatten is a run of 1, below --min-block-size 2
    assert ("  kept aten::linear x1: a run of 1 operator(s), below min_block_size=2"
            in lines)
    assert "  kept aten::flatten x1: listed in torch_executed_ops" in lines
    assert "  kept tvm_test::scale_shift x1: no TVM converter (not an ATen operator)" in lines
    torch.save([x, model(x).detach()], str(tmp_path / "data.pt"))
    out = run_fresh_python(f"""
        import sys
        sys.path.insert(0, {TESTS_DIR!r})
        import torch, tvm.contrib.torch, partition_models
        x, expected = torch.load("data.pt")
        torch.testing.assert_close(torch.jit.load("model_tvm.pt")(x), expected,
                                   rtol=1e-4, atol=1e-4)
        print("OK")
    """, cwd=str(tmp_path))
    assert "OK" in out
    proc = _cli("compile", "model.pt", "--input", "x:1x3x16x16", "--import-module",
                "partition_models", "--require-full-compilation", "-o", "full.pt",
                cwd=str(tmp_path))
    assert proc.returncode == 1 and "tvm_test::scale_shift x1" in proc.stderr
    assert not (tmp_path / "full.pt").exists()


def test_arguments_with_defaults_keep_them(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    torch.jit.script(layer).save(str(tmp_path / "layer.pt"))  # forward(src, src_mask=None, ...)
    proc = _cli("compile", "layer.pt", "--input", "src:2x4x16", "-o", "layer_tvm.pt",
                "--repeat", "2", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    replaced = torch.jit.load(str(tmp_path / "layer_tvm.pt"))
    src = torch.rand(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(replaced(src), layer(src), rtol=1e-4, atol=1e-4)
    assert [a.name for a in replaced.forward.schema.arguments] == \
        ["self", "src", "src_mask", "src_key_padding_mask", "is_causal"]


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
    proc = _cli("compile", "model.pt", "--input", "y:4x16", "-o", "o.pt", cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --input names 'y' do not match the model's forward "
                                   "arguments: give them in order as x:SHAPE")
    for output, why in (("missing_dir/o.pt", "does not exist"),
                        ("model.pt/o.pt", "does not exist")):
        proc = _cli("compile", "model.pt", "--input", "x:4x16", "-o", output, cwd=str(tmp_path))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: cannot write {output}: directory ") and \
            proc.stderr.strip().endswith(why), proc.stderr


def test_output_is_written_through_an_exclusive_temp_file(tmp_path):
    """A symlink planted where the old predictable temp name was is left alone."""
    model, _, _ = models.make("mlp")
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / ".o.pt.partial")
    proc = _cli("compile", "model.pt", "--input", "x:4x16", "-o", "o.pt", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    assert (tmp_path / "o.pt").is_file() and not (tmp_path / "o.pt").is_symlink()
    assert sorted(os.listdir(tmp_path)) == [".o.pt.partial", "model.pt", "o.pt", "victim.txt"]


def test_help_explains_every_flag(tmp_path):
    proc = _cli("compile", "--help", cwd=str(tmp_path))
    assert proc.returncode == 0
    for flag in ("--input", "--dtype", "--trials", "--tuning-log", "--repeat", "--output",
                 "--import-module", "--load-library", "--min-block-size", "--torch-executed-op",
                 "--require-full-compilation", "--tuning-rpc", "--tuning-key", "--tuning-workers",
                 "--tuning-timeout", "--tuning-builders"):
        assert flag in proc.stdout


def test_tuning_rpc_flags(tmp_path):
    """--tuning-rpc: flag errors are one line (exit 2); an unreachable tracker fails the
    compile (exit 1) instead of leaving the model in TorchScript."""
    import socket

    class Elementwise(torch.nn.Module):  # one fused kernel that TVM generates (and tunes)
        def forward(self, x):
            return (x * 2 + 1).clamp(0, 1)

    torch.jit.script(Elementwise()).save(str(tmp_path / "model.pt"))
    base = ("compile", "model.pt", "--input", "x:4x16", "--trials", "2", "-o", "o.pt")
    proc = _cli(*base, "--tuning-key", "k", cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --tuning-key given without --tuning-rpc HOST:PORT"
    proc = _cli(*base, "--tuning-rpc", "localhost", "--tuning-key", "k", cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('error: --tuning-rpc must be "host:port" with a port in '
                                   "1..65535, got 'localhost'")
    proc = _cli(*base, "--tuning-rpc", "127.0.0.1:9190", cwd=str(tmp_path))
    assert proc.returncode == 2 and "--tuning-rpc needs --tuning-key KEY" in proc.stderr
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _cli(*base, "--tuning-rpc", f"127.0.0.1:{port}", "--tuning-key", "k",
                "--tuning-builders", "1", cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert (f"error: tvm.contrib.torch tuning: cannot reach the RPC tracker at 127.0.0.1:{port} "
            "(ConnectionRefusedError") in proc.stderr
    assert not (tmp_path / "o.pt").exists()
