"""partition(): TVM takes the operators it supports, TorchScript keeps the rest."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import partition_models as pm
import tvm.contrib.torch as tvm_torch
from conftest import run_fresh_python
from tvm.contrib.torch import ConversionError, partition, partition_report

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _as_torchscript(model, inputs, how):
    with torch.no_grad():
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, inputs)


def _signature(module):
    schema = module.forward.schema
    return ([(a.name, str(a.type)) for a in schema.arguments[1:]],
            [str(r.type) for r in schema.returns])


def _check_in_fresh_process(module, inputs, expected, tmp_path):
    """Save, load in a new interpreter (which never saw the model), compare again."""
    module.save(str(tmp_path / "partitioned.pt"))
    torch.save({"inputs": inputs, "expected": expected}, str(tmp_path / "data.pt"))
    out = run_fresh_python(f"""
        import sys
        sys.path.insert(0, {TESTS_DIR!r})
        import torch
        import tvm.contrib.torch
        import partition_models  # registers the custom operator some models use
        data = torch.load("data.pt")
        module = torch.jit.load("partitioned.pt")
        got = module(*data["inputs"])
        torch.testing.assert_close(got, data["expected"], rtol=1e-4, atol=1e-4)
        report = tvm.contrib.torch.partition_report(module)
        print("OK", report.num_subgraphs)
    """, cwd=str(tmp_path))
    return out.split()


@pytest.mark.parametrize("how", ["trace", "script"])
def test_custom_operator_in_a_cnn_stays_in_torch(how, device, tmp_path):
    if device == "cuda" and how == "script":
        pytest.skip("the GPU run covers the traced model")
    model = pm.init(pm.CustomOpCNN()).to(device)
    x = torch.rand(2, 3, 16, 16, device=device)
    expected = model(x).detach()
    module = partition(_as_torchscript(model, (x,), how), [x],
                       {"export_dir": str(tmp_path / "export")})
    tol = TOL if device == "cpu" else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(module(x), expected, **tol)
    report = partition_report(module)
    assert report.num_subgraphs == 2
    # The custom op alone stays (a scripted model also keeps Flatten's rank assertion).
    assert report.kept_operators[pm.CUSTOM_OP] == 1
    if how == "trace":
        assert report.kept_operators == {pm.CUSTOM_OP: 1}
    assert "no TVM converter" in report.kept_reasons[pm.CUSTOM_OP]
    assert report.offloaded_operators == report.num_operators - report.num_kept_operators
    assert report.offloaded_operators >= 9  # conv x3 + relu x3 + pool + flatten + linear
    assert [s["input_shapes"] for s in report.segments] == [[[2, 3, 16, 16]], [[2, 8, 16, 16]]]
    assert _signature(module) == _signature(torch.jit.script(model))
    assert _check_in_fresh_process(module, [x], expected, tmp_path) == ["OK", "2"]


def test_shapes_not_compiled_for_run_in_torchscript(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(2, 3, 16, 16)
    module = partition(torch.jit.script(model), [x], {"export_dir": str(tmp_path / "export")})
    first = module._tvm_segment_0  # pylint: disable=protected-access
    torch.testing.assert_close(module(x), model(x).detach(), **TOL)
    assert first.call_counts() == {"(float32[2, 3, 16, 16])": 1}
    other = torch.rand(5, 3, 12, 12)
    torch.testing.assert_close(module(other), model(other).detach(), **TOL)
    assert first.call_counts() == {"(float32[2, 3, 16, 16])": 1}  # served by the fallback
    assert not first.accepts([other]) and first.accepts([x])


@pytest.mark.parametrize("how", ["trace", "script"])
def test_resnet18_becomes_one_subgraph(how, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64)
    module = partition(_as_torchscript(model, (x,), how), [x],
                       {"export_dir": str(tmp_path / "export")})
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-3, atol=1e-3)
    report = partition_report(module)
    # relu_ / add_ are functionalised; a scripted model keeps flatten's rank check only.
    assert report.num_subgraphs == 1 and report.offloaded_operators == 49
    kept = {} if how == "trace" else \
        {"aten::len": 1, "aten::gt": 1, "prim::If": 1, "prim::RaiseException": 1}
    assert report.kept_operators == kept


def test_attention_with_shape_arithmetic_is_one_subgraph(tmp_path):
    model = pm.Attention().eval()
    x = torch.rand(2, 5, 32)
    module = partition(torch.jit.script(model), [x], {"export_dir": str(tmp_path / "export")})
    torch.testing.assert_close(module(x), model(x).detach(), **TOL)
    report = partition_report(module)
    # x.shape read before the first linear is copied into the program; SDPA with
    # dropout_p=0.0 is deterministic.
    assert report.num_subgraphs == 1 and report.num_kept_operators == 0
    assert report.segments[0]["operators"]["aten::scaled_dot_product_attention"] == 1
    other = torch.rand(1, 7, 32)  # not compiled for: the TorchScript fallback runs it
    torch.testing.assert_close(module(other), model(other).detach(), **TOL)


def test_branches_and_loop_bodies_get_their_own_subgraphs(tmp_path):
    model = pm.init(pm.BranchAndLoop())
    scripted = torch.jit.script(model)
    x = torch.rand(3, 3, 16, 16)
    module = partition(scripted, [x], {"export_dir": str(tmp_path / "export")})
    # Both branches are right: the one taken while recording runs in TVM, the other in torch.
    for sample in (x, -x):
        torch.testing.assert_close(module(sample), model(sample).detach(), **TOL)
    report = partition_report(module)
    assert report.kept_operators["prim::If"] == 1 and report.kept_operators["prim::Loop"] == 1
    assert report.kept_reasons["aten::sigmoid"] == "not executed with the example inputs"
    assert report.kept_reasons["aten::append"] == "mutates its inputs"
    # features (+ the condition), the positive branch, the loop body.
    assert report.num_subgraphs == 3
    assert report.segments[1]["operators"] == {"aten::conv2d": 2, "aten::relu": 1}
    assert report.segments[2]["input_shapes"] == [[8]]
    code = module.code
    assert code.index("for ") < code.index("_tvm_segment_2") and "_tvm_segment_1" in code
    assert _check_in_fresh_process(module, [-x], model(-x).detach(), tmp_path) == ["OK", "3"]


def test_transformer_encoder_layer_traced_under_no_grad(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    src = torch.rand(2, 5, 32)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (src,))  # the fused fast-path kernel
        expected = layer(src)
        module = partition(traced, [src], {"export_dir": str(tmp_path / "export")})
        torch.testing.assert_close(module(src), expected, **TOL)
    report = partition_report(module)
    assert report.segments[0]["operators"] == {"aten::_transformer_encoder_layer_fwd": 1}
    assert report.num_kept_operators == 0 and report.offloaded_operators == 1
    assert _check_in_fresh_process(module, [src], expected, tmp_path) == ["OK", "1"]


def test_torch_executed_ops_forces_fallback(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(2, 3, 16, 16)
    traced = _as_torchscript(model, (x,), "trace")
    module = partition(traced, [x], {"export_dir": str(tmp_path / "export"),
                                     "torch_executed_ops": ["aten::relu"]})
    torch.testing.assert_close(module(x), model(x).detach(), **TOL)
    report = partition_report(module)
    assert report.kept_operators["aten::relu"] == 3
    assert report.kept_reasons["aten::relu"] == "listed in torch_executed_ops"
    assert all("aten::relu" not in s["operators"] for s in report.segments)
    # Single convolutions between the relus are below min_block_size; pool+flatten+linear is not.
    assert report.segments == [s for s in report.segments if sum(s["operators"].values()) >= 3]
    assert report.num_subgraphs == 1
    assert _check_in_fresh_process(module, [x], model(x).detach(), tmp_path) == ["OK", "1"]


def test_min_block_size_decides_which_runs_become_subgraphs(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(2, 3, 16, 16)
    traced = _as_torchscript(model, (x,), "trace")
    everything_small = partition(traced, [x], {"export_dir": str(tmp_path / "a"),
                                               "torch_executed_ops": ["aten::relu"],
                                               "min_block_size": 1})
    assert partition_report(everything_small).num_subgraphs == 4
    nothing = partition(traced, [x], {"export_dir": str(tmp_path / "b"), "min_block_size": 50})
    report = partition_report(nothing)
    assert report.num_subgraphs == 0 and report.offloaded_operators == 0
    assert "below min_block_size=50" in report.kept_reasons["aten::_convolution"]
    torch.testing.assert_close(nothing(x), model(x).detach(), **TOL)


def test_require_full_compilation_names_what_would_stay(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(2, 3, 16, 16)
    traced = _as_torchscript(model, (x,), "trace")
    with pytest.raises(ConversionError, match=r"tvm_test::scale_shift x1: no TVM converter"):
        partition(traced, [x], {"export_dir": str(tmp_path / "a"),
                                "require_full_compilation": True})
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    y = torch.rand(4, 8)
    full = partition(torch.jit.trace(layer, (y,)), [y], {"export_dir": str(tmp_path / "b"),
                                                         "require_full_compilation": True})
    assert partition_report(full).num_kept_operators == 0
    torch.testing.assert_close(full(y), layer(y).detach(), **TOL)


def test_shapes_that_vary_between_iterations_get_symbolic_dims(tmp_path):
    model = pm.RaggedLoop().eval()
    x = torch.rand(6, 8)
    module = partition(torch.jit.script(model), [x, [1, 2, 3]],
                       {"export_dir": str(tmp_path / "export")})
    report = partition_report(module)
    assert report.num_subgraphs == 1
    segment = report.segments[0]
    assert segment["input_shapes"] == [["s0", 8]] and segment["dim_ranges"] == {"s0": [1, 24]}
    engine = module._tvm_segment_0  # pylint: disable=protected-access
    assert "TvmVMModule" in str(engine._type())  # pylint: disable=protected-access
    for sizes in ([1, 2, 3], [4, 5, 7], [2, 30]):  # 30 rows: beyond the range, in TorchScript
        data = torch.rand(sum(sizes), 8)
        torch.testing.assert_close(module(data, sizes), model(data, sizes).detach(), **TOL)
    assert sum(engine.call_counts().values()) == 3 + 3 + 1  # every chunk but the 30-row one
    assert engine.accepts([torch.rand(24, 8)]) and not engine.accepts([torch.rand(30, 8)])
    data = torch.rand(9, 8)
    expected = model(data, [4, 5]).detach()
    assert _check_in_fresh_process(module, [data, [4, 5]], expected, tmp_path) == ["OK", "1"]


def test_values_whose_shapes_vary_stay_in_torch_without_dynamic_shapes(tmp_path):
    model = pm.VaryingLoop()
    x = torch.rand(6, 4)
    module = partition(torch.jit.script(model), [x], {"export_dir": str(tmp_path / "export"),
                                                      "min_block_size": 1,
                                                      "dynamic_shapes": False})
    torch.testing.assert_close(module(x), model(x).detach(), **TOL)
    report = partition_report(module)
    assert report.kept_reasons["aten::relu"] == "shapes vary between calls (3 seen)"
    assert "aten::relu" not in str(report.segments)


def test_float16_model(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(2, 3, 16, 16)
    expected = model(x).detach()
    half = torch.jit.trace(copy.deepcopy(model).half(), (x.half(),))
    module = partition(half, [x.half()], {"export_dir": str(tmp_path / "export")})
    got = module(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    report = partition_report(module)
    assert report.num_subgraphs == 2 and report.kept_operators == {pm.CUSTOM_OP: 1}
    assert {d for s in report.segments for d in s["input_dtypes"]} == {"float16"}


def test_mixed_argument_and_result_types(tmp_path):
    model = pm.MixedSignature().eval()
    ids, x = torch.randint(0, 50, (2, 7)), torch.rand(2, 7, 16)
    module = partition(torch.jit.script(model), [ids, x, False],
                       {"export_dir": str(tmp_path / "export")})
    assert _signature(module) == _signature(torch.jit.script(model))
    for use_ids in (False, True):
        got, expected = module(ids, x, use_ids), model(ids, x, use_ids)
        assert sorted(got) == ["pooled", "tokens"]
        for key in got:
            for a, b in zip(got[key], expected[key]):
                torch.testing.assert_close(a, b.detach(), **TOL)
    report = partition_report(module)
    # Both residual blocks and the mean: one subgraph. The embedding branch was not taken.
    assert report.num_subgraphs == 1 and report.segments[0]["input_dtypes"] == ["float32"]
    assert report.kept_reasons["aten::embedding"] == "not executed with the example inputs"
    assert report.kept_operators["prim::DictConstruct"] == 1


def test_compile_option_partition_keeps_the_forward_signature(tmp_path):
    model = pm.init(pm.CustomOpCNN())
    x = torch.rand(1, 3, 16, 16)
    module = tvm_torch.compile(torch.jit.trace(model, (x,)), {
        "input_infos": [("x", (1, 3, 16, 16))], "partition": True,
        "export_dir": str(tmp_path / "export")})
    assert isinstance(module, torch.jit.ScriptModule)
    torch.testing.assert_close(module(x), model(x).detach(), **TOL)
    # It composes like any scripted module.
    wrapper = torch.jit.script(torch.nn.Sequential(module, torch.nn.Softmax(-1)))
    torch.testing.assert_close(wrapper(x), torch.softmax(model(x), -1).detach(), **TOL)


def test_plain_nn_module_is_scripted_or_traced(tmp_path):
    model = pm.init(pm.BranchAndLoop())
    x = torch.rand(2, 3, 8, 8)
    module = partition(model, [x], {"export_dir": str(tmp_path / "export")})
    for sample in (x, -x):
        torch.testing.assert_close(module(sample), model(sample).detach(), **TOL)


def test_bad_arguments_are_reported(tmp_path):
    model = torch.nn.Linear(4, 4)
    x = torch.rand(2, 4)
    with pytest.raises(TypeError, match="got an ExportedProgram"):
        partition(torch.export.export(model, (x,)), [x])
    with pytest.raises(ValueError, match="torch_executed_ops must be a list of operator kinds"):
        partition(model, [x], {"torch_executed_ops": "relu"})
    with pytest.raises(ValueError, match="min_block_size must be an int >= 1, got 0"):
        partition(model, [x], {"min_block_size": 0})
    with pytest.raises(ValueError, match="shapes come from example_inputs"):
        partition(model, [x], {"input_infos": [("x", (2, 4))]})
    with pytest.raises(TypeError, match="example_inputs must be a list or tuple"):
        partition(model, x)
    with pytest.raises(TypeError, match=r"forward takes 1 argument\(s\) \(input\), "
                                        "example_inputs has 2"):
        partition(model, [x, x])
    with pytest.raises(TypeError, match="leaves out forward's argument 'input', which has no"):
        partition(model, [])
    with pytest.raises(RuntimeError, match="running the model on example_inputs failed: "
                                           ".*mat1 and mat2 shapes cannot be multiplied"):
        partition(model, [torch.rand(2, 3)])
    with pytest.raises(ValueError, match="was not made by partition"):
        partition_report(torch.jit.script(model))
