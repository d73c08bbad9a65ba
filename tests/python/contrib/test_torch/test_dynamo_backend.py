"""The torch.compile backend "tvm_contrib_torch": registration, models against eager, graph
breaks, dynamic batch, an operator kept in PyTorch, options, and the cross-process cache."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import tvm.contrib.torch
from tvm.contrib.torch import dynamo_backend

import partition_models
from conftest import run_fresh_python
from models import MODELS

BACKEND = "tvm_contrib_torch"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    dynamo_backend.clear_cache()
    yield
    torch._dynamo.reset()


def _compiled(model, **options):
    return torch.compile(model, backend=BACKEND, options=options or None)


def _builds():
    return dynamo_backend.cache_info()["builds"]


def _report():
    """The partition report of the one graph compiled since the fixture cleared the cache."""
    (script,) = dynamo_backend._memory.values()
    return tvm.contrib.torch.partition_report(script)


def test_registered_under_its_own_name():
    assert tvm.contrib.torch.TORCH_COMPILE_BACKEND == BACKEND
    assert BACKEND in torch._dynamo.list_backends()
    # torch's own "tvm" backend is still torch's.
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend(BACKEND) is dynamo_backend.tvm_contrib_torch_backend
    assert lookup_backend("tvm") is not dynamo_backend.tvm_contrib_torch_backend


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_models_match_eager(name):
    factory, shapes = MODELS[name]
    model = factory()
    torch.manual_seed(1)
    inputs = [torch.randn(shape) for shape in shapes]
    with torch.no_grad():
        expected = model(*inputs)
        compiled = _compiled(model)
        actual = compiled(*inputs)
        again = compiled(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)
    assert dynamo_backend.cache_info()["eager_graphs"] == 0
    assert _builds() == 1
    report = _report()
    assert report.offloaded_operators == report.num_operators > 0, report.summary()


def test_half_model_computes_in_float16():
    model = MODELS["mlp"][0]().half()
    x = torch.randn(4, 16).half()
    with torch.no_grad():
        actual = _compiled(model)(x)
        expected = model(x)
    assert actual.dtype == torch.float16
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)
    report = _report()
    assert report.offloaded_operators == report.num_operators > 0, report.summary()


class _PrintingModel(nn.Module):
    """An HF-style block with a Python print between two halves: Dynamo breaks the graph."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.first = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.second = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, input_ids):
        hidden = self.norm(self.embed(input_ids) + self.first(self.embed(input_ids)))
        print("hidden", tuple(hidden.shape))
        return self.second(hidden)


def test_graph_break(capsys):
    torch.manual_seed(0)
    model = _PrintingModel().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        actual = _compiled(model)(ids)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert "hidden (2, 7, 16)" in capsys.readouterr().out
    assert _builds() == 2  # one graph each side of the print


def test_dynamic_batch_is_not_recompiled_per_size():
    factory, _ = MODELS["mlp"]
    model = factory()
    compiled = _compiled(model)
    with torch.no_grad():
        for batch in (4, 7, 3, 12):
            x = torch.randn(batch, 16)
            if batch == 4:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert _builds() == 1
    report = _report()
    assert report.segments and all(s["dim_ranges"] for s in report.segments), report.summary()


def test_recompiles_are_bounded_by_automatic_dynamic_shapes():
    model = MODELS["mlp"][0]()
    compiled = _compiled(model)
    with torch.no_grad():
        for batch in (4, 7, 3, 12, 5):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    # Batch 4 static, then one recompile that Dynamo makes dynamic; no build per size after.
    assert _builds() == 2


def test_unsupported_operator_stays_in_pytorch():
    model = partition_models.init(partition_models.CustomOpCNN())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        actual = _compiled(model)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    report = _report()
    assert report.kept_operators.get(partition_models.CUSTOM_OP) == 1
    assert len(report.segments) == 2, report.summary()


def test_options_reach_the_pipeline():
    factory, shapes = MODELS["mlp"]
    model = factory()
    x = torch.randn(*shapes[0])
    with torch.no_grad():
        expected = model(x)
        actual = _compiled(model, torch_executed_ops=["aten::gelu"], min_block_size=1)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    report = _report()
    assert report.kept_operators == {"aten::gelu": 1}, report.summary()


def test_bad_options_are_errors():
    model = MODELS["mlp"][0]()
    with pytest.raises(Exception, match="unknown option key\\(s\\) \\['nonsense'\\]"):
        _compiled(model, nonsense=1)(torch.randn(4, 16))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="\\['input_infos'\\] do not apply"):
        _compiled(model, input_infos=[("x", (4, 16))])(torch.randn(4, 16))
    with pytest.raises(ValueError, match="cache_dir.. apply only to the torch.compile backend"):
        tvm.contrib.torch.compile(model, {"input_infos": [("x", (4, 16))], "cache_dir": "c"})


def test_changed_weight_runs_eagerly(caplog):
    model = MODELS["mlp"][0]()
    compiled = _compiled(model)
    x = torch.randn(4, 16)
    with torch.no_grad():
        compiled(x)
        model.fc2.bias.add_(1.0)
        with caplog.at_level(logging.WARNING, logger=dynamo_backend.__name__):
            actual = compiled(x)
        torch.testing.assert_close(actual, model(x), rtol=1e-4, atol=1e-4)
    assert "a weight changed since this graph was compiled" in caplog.text


def test_grad_mode_with_trainable_weights_runs_eagerly(caplog):
    model = MODELS["mlp"][0]()
    x = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger=dynamo_backend.__name__):
        actual = _compiled(model)(x)
    actual.sum().backward()  # gradients flow: the graph ran in PyTorch
    assert model.fc1.weight.grad is not None
    torch.testing.assert_close(actual, model(x), rtol=1e-5, atol=1e-5)
    assert "it needs autograd" in caplog.text
    assert dynamo_backend.cache_info() == {"builds": 0, "memory_hits": 0, "disk_hits": 0,
                                           "eager_graphs": 1}


def test_cache_dir_is_reused_in_a_fresh_process(tmp_path):
    model = MODELS["cnn"][0]()
    x = torch.randn(1, 3, 16, 16)
    cache = tmp_path / "cache"
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(_compiled(model, cache_dir=str(cache))(x), expected,
                                   rtol=1e-4, atol=1e-4)
    assert _builds() == 1 and len(list(cache.glob("*.pt"))) == 1
    torch.save({"model": model.state_dict(), "x": x, "expected": expected}, tmp_path / "data.pt")
    out = run_fresh_python(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tvm.contrib.torch
        from tvm.contrib.torch import dynamo_backend
        from models import MODELS
        data = torch.load("data.pt")
        model = MODELS["cnn"][0]()
        model.load_state_dict(data["model"])
        compiled = torch.compile(model, backend="tvm_contrib_torch",
                                 options={{"cache_dir": {str(cache)!r},
                                           "export_dir": "second_build"}})
        with torch.no_grad():
            torch.testing.assert_close(compiled(data["x"]), data["expected"],
                                       rtol=1e-4, atol=1e-4)
        info = dynamo_backend.cache_info()
        assert info["builds"] == 0 and info["disk_hits"] == 1, info
        assert not os.path.exists("second_build"), "TVM built again"
        print("reused")
    """, cwd=str(tmp_path))
    assert "reused" in out
