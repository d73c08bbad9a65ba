"""Port of TVM 0.19's apps/pt_tvmdsoop/tests/test_trace_tvm_module.py (``TraceTvmModule``).

Changes from upstream: the module-level script is a test function; ``export_dir`` and
``tuning_log_file`` are under pytest's ``tmp_path`` (upstream wrote into the working
directory). ``"target": "llvm"`` and ``"device": tvm.cpu()`` are kept as upstream wrote them.
"""
import pytest
import torch

import tvm
import tvm.testing
from tvm.contrib.torch import compile, TraceTvmModule, pytorch_tvm  # noqa: F401


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x * y


def test_trace_tvm_module(tmp_path):
    model = Model()
    x = torch.rand([1, 2, 3])
    y = torch.rand([1, 2, 3])
    model_jit = torch.jit.script(model)

    option = {
        "input_infos": [("x", (1, 2, 3)), ("y", (1, 2, 3))],
        "default_dtype": "float32",
        "export_dir": str(tmp_path / "pytorch_compiled"),
        "num_outputs": 1,
        "tuning_n_trials": 0,  # set zero to skip tuning
        "tuning_log_file": str(tmp_path / "tuning.log"),
        "target": "llvm",
        "device": tvm.cpu(),
    }

    # use TraceTvmModule to convert List[Tensor] input/output
    # to tuple of Tensors
    pytorch_tvm_module = compile(model_jit, option)
    scripted = torch.jit.script(pytorch_tvm_module)
    traced = torch.jit.trace(TraceTvmModule(scripted), (x, y))

    res_traced = traced.forward(x, y)
    res_expected = pytorch_tvm_module.forward([x, y])[0]
    tvm.testing.assert_allclose(res_traced, res_expected)


# ---- This project's own checks (not in upstream) ----


class TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x + 1, x * 2


def test_several_outputs_trace_as_a_tuple_and_save(tmp_path):
    x = torch.rand(2, 3)
    module = compile(TwoOutputs(), {"input_infos": [("x", (2, 3))],
                                    "export_dir": str(tmp_path / "export")})
    traced = torch.jit.trace(TraceTvmModule(module), (x,))
    first, second = traced(x)
    torch.testing.assert_close(first, x + 1)
    torch.testing.assert_close(second, x * 2)
    traced.save(str(tmp_path / "traced.pt"))
    first, second = torch.jit.load(str(tmp_path / "traced.pt"))(x)
    torch.testing.assert_close(second, x * 2)


def test_wrapping_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="tvm_module must be a torch.nn.Module taking "
                                        r"List\[Tensor\].*got function"):
        TraceTvmModule(lambda inputs: inputs)
