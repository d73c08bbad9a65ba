"""torch.export of models holding compiled modules: traced through the engine operator,
saved with torch.export.save and loaded in a fresh process; a dynamic VMModule; errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvm.contrib.torch

from conftest import run_fresh_python
from models import MODELS


class _Holder(nn.Module):
    """A model around a compiled module: PyTorch ops before and after it."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return torch.relu(self.compiled([x * 1.0])[0]) * self.scale


def _mlp_module(tmp_path, shape):
    model = MODELS["mlp"][0]()
    x = torch.randn(4, 16)
    option = {"input_infos": [("x", shape)], "export_dir": str(tmp_path / "build")}
    if any(isinstance(d, str) for d in shape):
        option["dim_ranges"] = {"n": (1, 64)}
    with torch.no_grad():
        compiled = tvm.contrib.torch.compile(torch.jit.trace(model, x), option)
    return model, compiled


def _ops(program: torch.export.ExportedProgram):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def test_export_save_and_load_in_a_fresh_process(tmp_path):
    model, compiled = _mlp_module(tmp_path, (4, 16))
    assert isinstance(compiled, tvm.contrib.torch.GraphModule)
    holder = _Holder(compiled).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = torch.relu(model(x)) * 2.0
        program = torch.export.export(holder, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-4)
    assert "tvm_torch.run_graph_module.default" in _ops(program)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    torch.save({"x": x, "expected": expected}, tmp_path / "data.pt")
    out = run_fresh_python("""
        import torch
        import tvm.contrib.torch
        program = torch.export.load("model.pt2")
        data = torch.load("data.pt")
        assert any("run_graph_module" in str(n.target) for n in program.graph.nodes)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(data["x"]), data["expected"],
                                       rtol=1e-4, atol=1e-4)
        print("loaded and matched")
    """, cwd=str(tmp_path))
    assert "loaded and matched" in out


def test_dynamic_vm_module_exports_with_a_dynamic_dim(tmp_path):
    model, compiled = _mlp_module(tmp_path, ("n", 16))
    assert isinstance(compiled, tvm.contrib.torch.VMModule)
    holder = _Holder(compiled).eval()
    n = torch.export.Dim("n", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(holder, (torch.randn(4, 16),), dynamic_shapes=({0: n},))
        for batch in (3, 9):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(program.module()(x), torch.relu(model(x)) * 2.0,
                                       rtol=1e-4, atol=1e-4)
    assert "tvm_torch.run_vm_module.default" in _ops(program)


def test_inputs_no_program_takes_are_an_export_error(tmp_path):
    _, compiled = _mlp_module(tmp_path, (4, 16))
    with pytest.raises(RuntimeError, match=r"no compiled program takes \(float32\[4, 15\]\); "
                                           r"compiled for \(float32\[4, 16\]\)"):
        torch.export.export(_Holder(compiled), (torch.randn(4, 15),))


def test_aot_inductor_package_runs_in_a_fresh_python_process(tmp_path):
    model, compiled = _mlp_module(tmp_path, (4, 16))
    x = torch.randn(4, 16)
    with torch.no_grad():
        program = torch.export.export(_Holder(compiled).eval(), (x,))
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "model_aoti.pt2"))
    torch.save({"x": x, "expected": torch.relu(model(x)) * 2.0}, tmp_path / "data.pt")
    out = run_fresh_python(f"""
        import torch
        import tvm.contrib.torch
        runner = torch._inductor.aoti_load_package({package!r})
        data = torch.load("data.pt")
        torch.testing.assert_close(runner(data["x"]), data["expected"], rtol=1e-4, atol=1e-4)
        print("aoti matched")
    """, cwd=str(tmp_path))
    assert "aoti matched" in out


def test_torchscript_path_is_unchanged(tmp_path):
    model, compiled = _mlp_module(tmp_path, (4, 16))
    scripted = torch.jit.script(compiled)
    assert "tvm_torch::run" not in str(scripted.graph)  # libtorch loaders need no Python op
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted([x])[0], model(x), rtol=1e-4, atol=1e-4)


def test_dispatch_modes_and_jit_trace_see_the_operator(tmp_path):
    """A plain call from Python goes straight to the engine (the operator's Python dispatch
    cost ~25 us a call); whatever may record the call still gets the operator: a
    TorchDispatchMode (FlopCounterMode, FakeTensorMode) and torch.jit.trace."""
    # pylint: disable-next=import-outside-toplevel
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model, compiled = _mlp_module(tmp_path, (4, 16))
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled([x])[0], expected, rtol=1e-4, atol=1e-4)
        with Seen() as seen:
            torch.testing.assert_close(compiled([x])[0], expected, rtol=1e-4, atol=1e-4)
        assert "tvm_torch.run_graph_module.default" in seen.ops
        traced = torch.jit.trace(_Holder(compiled).eval(), (x,))
    assert "tvm_torch::run_graph_module" in str(traced.inlined_graph)
    y = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(y), torch.relu(model(y)) * 2.0, rtol=1e-4, atol=1e-4)
