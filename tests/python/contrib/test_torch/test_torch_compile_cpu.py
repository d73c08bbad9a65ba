"""Port of TVM 0.19's apps/pt_tvmdsoop/tests/test_torch_compile_cpu.py (``compile`` on CPU,
float16, one tuning trial, scripted and saved).

This is ``tvm.contrib.torch.compile`` (the ``option`` dict API), not a ``torch.compile``
backend, so it ports as is. Changes from upstream: the script is a test function; the timing
loops and prints are dropped (a test asserts instead); files go under ``tmp_path``; the input
is ``x.half()`` (the program is compiled for ``default_dtype`` float16 and this runtime
refuses a float32 tensor for it instead of converting silently); the saved file is loaded
in a fresh process.
"""
import torch

import tvm
from tvm.contrib.torch import compile

from conftest import run_fresh_python


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor):
        return x * x


def test_torch_compile_cpu(tmp_path):
    model = Model()
    x = torch.rand([1, 3, 224, 224])
    model_jit = torch.jit.trace(model, x)

    option = {
        "input_infos": [
            ("x", (1, 3, 224, 224)),
        ],
        "default_dtype": "float16",
        "export_dir": str(tmp_path / "pytorch_compiled"),
        "num_outputs": 1,
        "tuning_n_trials": 1,  # set zero to skip tuning
        "tuning_log_file": str(tmp_path / "tuning.log"),
        "target": "llvm",
        "device": tvm.cpu(),
    }

    pytorch_tvm_module = compile(model_jit, option)
    torch.jit.script(pytorch_tvm_module).save(str(tmp_path / "model_tvm.pt"))

    outputs = pytorch_tvm_module.forward([x.half().cpu()])
    assert outputs[0].shape == (1, 3, 224, 224)
    assert outputs[0].dtype == torch.float16
    torch.testing.assert_close(outputs[0], x.half() * x.half())
    assert (tmp_path / "tuning.log").read_text().strip(), "the tuning trial left no record"

    torch.save(x.half(), str(tmp_path / "x.pt"))
    run_fresh_python("""
        import torch
        import tvm.contrib.torch
        module = torch.jit.load("model_tvm.pt")
        x = torch.load("x.pt")
        torch.testing.assert_close(module([x])[0], x * x)
    """, str(tmp_path))
