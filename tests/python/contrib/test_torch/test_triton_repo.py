"""Triton Inference Server model repositories for compiled models (triton_repo.py, the CLI)."""
from __future__ import annotations

import os
import re

import pytest
import torch

import tvm.contrib.torch as tvm_torch
from tvm.contrib.torch import cli
from tvm.contrib.torch.triton_repo import write_repository
from conftest import run_fresh_python


class TwoInTwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x, ids):
        return torch.relu(self.fc(x)), ids * 2


def _fields(config: str):
    """The config's top-level scalars and its input/output entries, as Triton reads them."""
    scalars = dict(re.findall(r"^(\w+): (.+)$", config, re.M))
    tensors = {kind: re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([\d, ]+) \]',
                                block)
               for kind, block in re.findall(r"^(input|output) \[\n(.*?)\n\]", config,
                                             re.M | re.S)}
    return scalars, tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("triton")
    x, ids = torch.randn(3, 6), torch.tensor([[1, 2, 3]])
    compiled = tvm_torch.compile(TwoInTwoOut().eval(), {
        "input_infos": [("x", (3, 6)), ("ids", (1, 3), "int64")],
        "export_dir": str(directory / "export")})
    torch.jit.script(compiled).save(str(directory / "model_tvm.pt"))
    return directory, (x, ids)


def test_repository_has_the_fields_triton_requires_and_serves_positionally(saved):
    directory, (x, ids) = saved
    model = torch.jit.load(str(directory / "model_tvm.pt"))
    config = write_repository(model, [x, ids], str(directory / "repo"), name="two_in_two_out")
    with open(config, encoding="utf-8") as f:
        scalars, tensors = _fields(f.read())
    assert scalars["name"] == '"two_in_two_out"'
    assert scalars["platform"] == '"pytorch_libtorch"' and scalars["max_batch_size"] == "0"
    assert tensors["input"] == [("INPUT__0", "TYPE_FP32", "3, 6"),
                                ("INPUT__1", "TYPE_INT64", "1, 3")]
    assert tensors["output"] == [("OUTPUT__0", "TYPE_FP32", "3, 4"),
                                 ("OUTPUT__1", "TYPE_INT64", "1, 3")]
    torch.save((x, ids), str(directory / "io.pt"))
    out = run_fresh_python("""
        import torch, tvm.contrib.torch
        served = torch.jit.load("repo/two_in_two_out/1/model.pt")
        original = torch.jit.load("model_tvm.pt")
        x, ids = torch.load("io.pt")
        with torch.inference_mode():
            got = served(x, ids)          # as Triton's backend calls it: one tensor per input
        for a, b in zip(got, original([x, ids])):
            torch.testing.assert_close(a, b)
        print("OK", type(got).__name__)
    """, cwd=str(directory))
    assert "OK tuple" in out


def test_bad_names_and_outputs_are_refused(saved):
    directory, (x, ids) = saved
    model = torch.jit.load(str(directory / "model_tvm.pt"))
    with pytest.raises(ValueError, match=r"model name must match .*, got 'a b'"):
        write_repository(model, [x, ids], str(directory / "repo"), name="a b")
    with pytest.raises(TypeError, match="inputs must be a non-empty list of tensors"):
        write_repository(model, [], str(directory / "repo"))


def test_triton_repo_command(saved, capsys):
    directory, _ = saved
    code = cli.main(["triton-repo", str(directory / "model_tvm.pt"), "--input", "x:3x6",
                     "--input", "ids:1x3:int64", "-o", str(directory / "cli_repo")])
    assert code == 0, capsys.readouterr().err
    assert "LD_PRELOAD=" in capsys.readouterr().out
    assert os.path.isfile(directory / "cli_repo" / "model" / "1" / "model.pt")
    assert os.path.isfile(directory / "cli_repo" / "model" / "config.pbtxt")
