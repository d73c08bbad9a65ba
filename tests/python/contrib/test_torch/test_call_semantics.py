"""What a call of a compiled module does with inputs PyTorch treats specially: tensors that
require grad (inference only: an error, or the TorchScript fallback in a partitioned model)
and lazy negative views."""
from __future__ import annotations

import pytest
import torch

from tvm.contrib.torch import compile, partition


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4)).eval()


def test_grad_requiring_input_is_refused(tmp_path):
    model = _mlp()
    module = compile(model, {"input_infos": [("x", (2, 8))], "export_dir": str(tmp_path)})
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"input 0 requires grad, but compiled modules are "
                                           r"inference-only"):
        module([x])
    with torch.no_grad():
        torch.testing.assert_close(module([x])[0], model(x))


def test_partitioned_model_keeps_gradients_through_its_fallback(tmp_path):
    model = _mlp()
    x = torch.randn(2, 8)
    result = partition(torch.jit.trace(model, x), [x], {"export_dir": str(tmp_path)})
    leaf = torch.randn(2, 8, requires_grad=True)
    result(leaf).sum().backward()  # the TorchScript fallback runs: gradients flow
    expected = torch.randn(2, 8).copy_(leaf.detach()).requires_grad_()
    model(expected).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad)


def test_negative_view_input(tmp_path):
    model = _mlp()
    module = compile(model, {"input_infos": [("x", (2, 8))], "export_dir": str(tmp_path)})
    x = torch.randn(2, 8)
    negated = torch._neg_view(x)  # pylint: disable=protected-access
    assert negated.is_neg()
    torch.testing.assert_close(module([negated])[0], model(-x))
