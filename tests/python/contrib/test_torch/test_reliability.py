"""Careless use that used to give a wrong answer or an unclear error: in-place writes to inputs,
a failed device move, a temp directory mounted noexec."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import tvm.contrib.torch as tvm_torch
from tvm.contrib.torch import GraphModule
from conftest import assert_outputs_close

_HERE = os.path.dirname(os.path.abspath(__file__))


class _AddInPlace(torch.nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


class _WritesBoth(torch.nn.Module):
    def forward(self, x, y):
        y.mul_(3)
        x[0] = 5.0
        return x * 2 + y


@pytest.mark.parametrize("traced", [False, True])
def test_in_place_writes_to_inputs_are_refused_naming_the_op(traced, tmp_path):
    for model, ops in ((_AddInPlace(), [r"input 0 '\w+' is changed in place by aten.add_.Tensor"]),
                       (_WritesBoth(), [r"input 0 '\w+' is changed in place by aten.fill_.Tensor",
                                        r"input 1 '\w+' is changed in place by aten.mul_.Tensor"])):
        n = 2 if isinstance(model, _WritesBoth) else 1
        inputs = [torch.ones(2, 3) for _ in range(n)]
        if traced:
            model = torch.jit.trace(model, tuple(t.clone() for t in inputs))
        option = {"input_infos": [(f"i{k}", (2, 3)) for k in range(n)],
                  "export_dir": str(tmp_path / "export")}
        with pytest.raises(tvm_torch.ConversionError,
                           match=r"the model writes into its inputs") as info:
            tvm_torch.compile(model, option)
        for op in ops:
            assert re.search(op, str(info.value)), str(info.value)
        assert "clone the input first" in str(info.value)


def test_in_place_ops_on_intermediates_still_compile(tmp_path):
    class Model(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return torch.relu_(y)

    x = torch.randn(2, 3)
    compiled = tvm_torch.compile(Model(), {"input_infos": [("x", (2, 3))],
                                           "export_dir": str(tmp_path / "export")})
    before = x.clone()
    assert_outputs_close([compiled([x])[0]], [Model()(x.clone())])
    assert torch.equal(x, before)


def test_a_failed_move_leaves_wrapper_and_engine_together(cpu_program):
    module = GraphModule(num_inputs=1, num_outputs=2)
    module.init([cpu_program.shape], *cpu_program.files.as_tuple())
    with pytest.raises(ValueError, match=r"unsupported device meta"):
        module.to("meta")
    assert module.device == torch.device("cpu") and module.engine.device() == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):  # torch or the engine refuses
            module.to("cuda")
        assert module.device == torch.device("cpu") and module.engine.device() == "cpu"
    x = torch.randn(4, 8)
    assert_outputs_close(module([x]), cpu_program.reference(x))


def test_a_noexec_temp_dir_is_named_as_the_cause(cpu_program, tmp_path):
    """TMPDIR on a noexec mount (in a private mount namespace, where one can be made)."""
    unshare = shutil.which("unshare")
    mount_point = tmp_path / "noexec"
    mount_point.mkdir()
    if unshare is None or subprocess.run(
            [unshare, "-m", "sh", "-c", f"mount -t tmpfs -o noexec tmpfs {mount_point}"],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a noexec tmpfs here (needs unshare and privileges)")
    files = cpu_program.files
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        from tvm.contrib.torch import GraphModule
        try:
            GraphModule(1, 2).init([[4, 8]], {files.lib_path!r}, {files.graph_path!r},
                                   {files.params_path!r})
        except RuntimeError as err:
            print(str(err).splitlines()[0])
    """))
    command = (f"mount -t tmpfs -o noexec tmpfs {mount_point} && "
               f"TMPDIR={mount_point} {sys.executable} {script}")
    proc = subprocess.run([unshare, "-m", "sh", "-c", command], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the temp directory {mount_point} ($TMPDIR) is on a file system mounted noexec" \
        in proc.stdout, proc.stdout
