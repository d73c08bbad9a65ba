"""TVM 0.19's spellings that still mean something: ``tvm.Device`` as ``device``,
``shape_repr``, ``PyTorchTVMModule``'s attributes and ``build_tvm``'s runnable result
(see docs/coming_from_tvm019.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm
from tvm.contrib.torch import GraphModule, PyTorchTVMModule, VMModule, pytorch_tvm
from tvm.contrib.torch.options import parse_options

from conftest import assert_outputs_close


def test_device_option_takes_tvm_devices():
    assert parse_options({"input_infos": [("x", (1,))], "device": tvm.cpu()}).device == "cpu"
    assert parse_options({"input_infos": [("x", (1,))],
                          "device": tvm.cuda(1)}).device == "cuda:1"
    assert parse_options({"input_infos": [("x", (1,))],
                          "device": torch.device("cuda", 2)}).device == "cuda:2"
    assert PyTorchTVMModule(device=tvm.cpu()).device == "cpu"
    assert PyTorchTVMModule(device=tvm.cpu()).dev == tvm.cpu()
    assert PyTorchTVMModule(device="cuda:1").dev == tvm.cuda(1)


def test_bad_devices_are_refused_when_parsed():
    """A device TVM has but this runtime does not is refused before anything is built."""
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda', 'cuda:N', a "
                                         r"torch.device or tvm.cpu\(\)/tvm.cuda\(N\), got "
                                         r"device\(type='metal'"):
        parse_options({"input_infos": [("x", (1,))], "device": tvm.metal()})
    with pytest.raises(ValueError, match="PyTorchTVMModule device must be .* got int 0"):
        PyTorchTVMModule(device=0)
    with pytest.raises(ValueError, match="device must be .* got 'tpu'"):
        parse_options({"input_infos": [("x", (1,))], "device": "tpu"})
    with pytest.raises(ValueError, match="device must be .* got 'meta'"):
        GraphModule(1, 1, "meta")


def test_runtime_modules_take_tvm_devices():
    assert GraphModule(1, 1, tvm.cpu()).device == torch.device("cpu")
    assert VMModule(1, 1, tvm.cpu()).engine.device() == "cpu"


def test_shape_repr_is_tvm019s_key():
    assert GraphModule.shape_repr([[1, 3, 224, 224]]) == "1_3_224_224___"
    assert VMModule.shape_repr([[2, 3], [4]]) == "2_3___4___"
    assert GraphModule.shape_repr([torch.Size([5])]) == "5___"
    with pytest.raises(TypeError, match="each shape must be a list of ints, got"):
        GraphModule.shape_repr([[1.5]])
    with pytest.raises(TypeError, match="input_shapes must be a list of shapes"):
        GraphModule.shape_repr("1,2")


def test_pytorch_tvm_module_attributes_and_build_tvm_result(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(2, 4)
    traced = torch.jit.trace(model, x)
    ptm = pytorch_tvm.PyTorchTVMModule(target="llvm", device=tvm.cpu())
    ptm.from_pytorch(traced, [("x", (2, 4))])
    assert ptm.script_module is traced
    assert ptm.input_infos == [("x", (2, 4))]
    assert isinstance(ptm.mod, tvm.IRModule)
    assert "main" in [gv.name_hint for gv in ptm.mod.get_global_vars()]
    assert len(ptm.params) == 2  # weight and bias
    assert ptm.log_file is None and ptm.tvm_module is None and ptm.tvm_lib is None

    built = ptm.build_tvm(str(tmp_path / "export"))
    assert ptm.tvm_module is built
    assert isinstance(ptm.tvm_lib, tvm.runtime.Executable)
    assert ptm.tvm_params is not None
    # Still the list of exported files it was before...
    assert len(built) == 1 and built[0].lib_path.startswith(str(tmp_path / "export"))
    # ... and runnable: TVM 0.19's graph executor calls, or the module itself.
    with torch.no_grad():
        expected = model(x)
    built.set_input("x", x.numpy())
    built.run()
    torch.testing.assert_close(built.get_output(0), expected)
    built.run(x=tvm.runtime.tensor(np.ascontiguousarray(x.numpy())))
    torch.testing.assert_close(built.get_output(0), expected)
    assert built.get_num_inputs() == 1 and built.get_num_outputs() == 1
    assert isinstance(built.module, GraphModule)
    assert_outputs_close(built([x]), [expected])
    with pytest.raises(KeyError, match=r"no input named 'y'; the inputs are \['x'\]"):
        built.set_input("y", x)
    with pytest.raises(IndexError, match="output index 1 out of range; the program returns 1"):
        built.get_output(1)

    loaded = PyTorchTVMModule().load_tvm(str(tmp_path / "export"))
    assert loaded.tvm_module is not None
    assert_outputs_close(loaded.tvm_module([x]), [expected])


def test_build_tvm_result_needs_run_before_get_output(tmp_path):
    ptm = PyTorchTVMModule()
    ptm.from_pytorch(torch.nn.ReLU(), [("x", (3,))])
    built = ptm.build_tvm(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"call run\(\) first"):
        built.get_output(0)
    with pytest.raises(ValueError, match=r"inputs \['x'\] are not set"):
        built.run()
