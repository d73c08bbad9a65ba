"""compile(): real models, traced and scripted, fp32 and fp16, against PyTorch."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tvm.contrib.pt_op import PyTorchTVMModule, compile  # the seed's import path
from tvm.contrib.torch import ConversionError, GraphModule
import models
from conftest import assert_outputs_close, run_fresh_python


def _to_script(model, inputs, how):
    with torch.no_grad():
        return torch.jit.trace(model, tuple(inputs)) if how == "trace" else torch.jit.script(model)


CASES = [(name, how) for name in ["cnn", "mlp", "transformer", "two_in_two_out"]
         for how in ["trace", "script"]]


def _on(device, model, inputs):
    """The model and its inputs on ``device`` (as users trace for inference there)."""
    return model.to(device), [x.to(device) for x in inputs]


@pytest.mark.parametrize("name, how", CASES)
def test_compile_matches_torch_fp32(name, how, device, tmp_path):
    if device == "cuda" and how == "script":
        pytest.skip("the GPU run covers traced models")
    model, inputs, infos = models.make(name)
    expected = models.reference(model, inputs)
    model, inputs = _on(device, model, inputs)
    compiled = compile(_to_script(model, inputs, how),
                       {"input_infos": infos, "export_dir": str(tmp_path)})
    tol = 1e-4 if device == "cpu" else 1e-3
    outputs = compiled(inputs)
    assert len(outputs) == len(expected)
    assert all(o.device.type == device for o in outputs)
    assert_outputs_close(outputs, expected, rtol=tol, atol=tol)
    scripted = torch.jit.script(compiled)
    assert_outputs_close(scripted(inputs), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name, weights", [
    ("cnn", "float32"), ("mlp", "float32"), ("transformer", "float32"),
    ("two_in_two_out", "float32"),
    # A .half() model with default_dtype given as well (the usual GPU habit).
    ("cnn", "float16"), ("transformer", "float16")])
def test_compile_float16(name, weights, device, tmp_path):
    model, inputs, infos = models.make(name)
    expected = models.reference(model, inputs)
    model, inputs = _on(device, model, inputs)
    if weights == "float16":
        model = model.half()
    traced_with = [x.half() for x in inputs] if weights == "float16" else inputs
    compiled = compile(_to_script(model, traced_with, "trace"),
                       {"input_infos": infos, "default_dtype": "float16",
                        "export_dir": str(tmp_path)})
    outputs = compiled([x.half() for x in inputs])
    assert all(o.dtype == torch.float16 and o.device.type == device for o in outputs)
    assert_outputs_close([o.float() for o in outputs], expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match=r"float32\[.*compiled signatures: \(float16\["):
        compiled(inputs)


class _Clamps(torch.nn.Module):
    """Every clamp-based activation (their bounds are scalars, not tensors, in Relax)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = torch.nn.functional.hardswish(self.conv(x))
        z = torch.nn.functional.relu6(y) + torch.nn.functional.hardsigmoid(y)
        return torch.clamp(z, min=-0.5) * torch.nn.functional.hardtanh(x.mean(1, keepdim=True))


def test_float16_clamps_match_torch_with_nan(device, tmp_path):
    torch.manual_seed(0)
    model, x = _Clamps().eval().to(device), 4 * torch.randn(1, 3, 16, 16, device=device)
    compiled = compile(model, {"input_infos": [("x", (1, 3, 16, 16))],
                               "default_dtype": "float16", "export_dir": str(tmp_path)})
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        expected = model(x)
    actual = compiled([x.half()])[0]
    assert actual.dtype == torch.float16
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2, equal_nan=True)


def test_half_model_with_another_default_dtype_is_refused(tmp_path):
    model, inputs, infos = models.make("cnn")
    with pytest.raises(ConversionError, match=r"computes in float16 but default_dtype is "
                                              r"'float32'; pass the float32 model"):
        compile(model.half(), {"input_infos": infos, "default_dtype": "float32",
                               "export_dir": str(tmp_path)})


def test_transformer_fast_path_ops_are_decomposed(tmp_path):
    model, inputs, infos = models.make("transformer")
    traced = _to_script(model, inputs, "trace")
    assert "_transformer_encoder_layer_fwd" in str(traced.inlined_graph)  # the fused fast path
    compiled = compile(traced, {"input_infos": infos, "export_dir": str(tmp_path)})
    assert_outputs_close(compiled(inputs), models.reference(model, inputs), rtol=1e-4,
                         atol=1e-4)


def test_attention_and_epilogues_run_on_vendor_kernels(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    src = torch.rand(2, 5, 32)
    with torch.no_grad():
        compiled = compile(torch.jit.trace(layer, src), {"input_infos": [("src", (2, 5, 32))],
                                                         "export_dir": str(tmp_path)})
        torch.testing.assert_close(compiled([src])[0], layer(src), rtol=1e-4, atol=1e-4)
    relax_text = (tmp_path / "bucket0.relax").read_text()
    main = relax_text[relax_text.index("def main("):]
    # One fused attention call; the importer's layout changes around it cancel out; the
    # feed-forward relu runs in the matrix product's epilogue.
    # nn.MultiheadAttention projects q, k and v in one GEMM: ATen reads them as views of it.
    assert main.count('"tvm_torch.attention') == 1 and "R.nn.attention(" not in main
    assert '"tvm_torch.attention_views"' in main
    assert "R.permute_dims(" not in main
    assert 'R.str("relu")' in main and "R.nn.relu(" not in main


@pytest.mark.parametrize("pool, padding, ceil_mode", [
    ("max", 0, False), ("max", 1, False), ("max", 1, True), ("avg", 1, False),
    ("avg", 1, True)])
def test_pooling_runs_on_aten_channels_last(pool, padding, ceil_mode, tmp_path):
    layer = torch.nn.MaxPool2d(3, 2, padding, ceil_mode=ceil_mode) if pool == "max" else \
        torch.nn.AvgPool2d(3, 2, padding, ceil_mode=ceil_mode, count_include_pad=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), layer).eval()
    x = torch.rand(2, 3, 20, 21)
    compiled = compile(torch.jit.trace(model, x), {"input_infos": [("x", (2, 3, 20, 21))],
                                                   "export_dir": str(tmp_path)})
    torch.testing.assert_close(compiled([x])[0], model(x).detach(), rtol=1e-5, atol=1e-5)
    main = (tmp_path / "bucket0.relax").read_text()
    assert f'"tvm_torch.{pool}_pool2d_nhwc"' in main and f"R.nn.{pool}_pool2d(" not in main


@pytest.mark.parametrize("name, fn", [
    ("gelu", torch.nn.functional.gelu),
    ("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    ("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("silu", torch.nn.functional.silu),
    ("exp", torch.exp)])
def test_transcendental_functions_run_on_aten(name, fn, tmp_path):
    class Model(torch.nn.Module):
        def forward(self, x, small):
            return fn(x * 2.0 - 1.0), fn(small)

    x, small = torch.rand(64, 128), torch.rand(4, 8)
    compiled = compile(Model(), {"input_infos": [("x", (64, 128)), ("small", (4, 8))],
                                 "export_dir": str(tmp_path)})
    for got, expected in zip(compiled([x, small]), Model()(x, small)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    main = (tmp_path / "bucket0.relax").read_text()
    main = main[main.index("def main("):]
    # 8192 elements go to ATen; 32 stay in a fused TVM kernel (a vendor call costs more).
    # (torch.export decomposes silu into x * sigmoid(x); fx_passes makes it silu again.)
    assert main.count('"tvm_torch.unary", ') == 1 and f'R.str("{name}")' in main


@pytest.mark.parametrize("vendor_kernels", [True, False])
def test_scaled_dot_product_attention(vendor_kernels, tmp_path):
    import partition_models  # pylint: disable=import-outside-toplevel

    model = partition_models.Attention().eval()
    x = torch.rand(2, 6, 32)
    compiled = compile(torch.jit.script(model), {"input_infos": [("x", (2, 6, 32))],
                                                 "export_dir": str(tmp_path),
                                                 "vendor_kernels": vendor_kernels})
    torch.testing.assert_close(compiled([x])[0], model(x).detach(), rtol=1e-4, atol=1e-4)
    main = (tmp_path / "bucket0.relax").read_text()
    assert ('"tvm_torch.attention' in main) == vendor_kernels  # plain, or on q/k/v views


def test_scripted_data_dependent_branch_keeps_both_branches(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if bool(x.sum() > 0):
                return x * 2.0
            return x - 1.0

    compiled = compile(torch.jit.script(Branchy()), {"input_infos": [("x", (2, 3))],
                                                     "export_dir": str(tmp_path)})
    for x in (torch.ones(2, 3), -torch.ones(2, 3)):
        torch.testing.assert_close(compiled([x])[0], Branchy()(x))


def test_unconvertible_torchscript_is_reported(tmp_path):
    """A construct torch's converter cannot take: a readable ConversionError suggesting tracing."""

    class Appender(torch.nn.Module):
        def forward(self, x):
            out = []
            for i in range(int(x.shape[0])):
                out.append(x[i] * float(i))
            return torch.stack(out) if len(out) > 0 else x

    with pytest.raises(ConversionError, match=r"(?s)could not convert the TorchScript module.*"
                                              r"torch.jit.trace"):
        compile(torch.jit.script(Appender()), {"input_infos": [("x", (2, 3))],
                                               "export_dir": str(tmp_path)})


def test_scripted_multi_head_attention(tmp_path):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    compiled = compile(torch.jit.script(mha), {"input_infos": [("q", (2, 3, 16)),
                                                                ("k", (2, 4, 16)),
                                                                ("v", (2, 4, 16))],
                                               "export_dir": str(tmp_path)})
    assert_outputs_close(compiled([q, k, v]), models.reference(mha, [q, k, v]), rtol=1e-4,
                         atol=1e-4)


def test_multi_head_attention_fast_path(tmp_path):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 3, 16)
    traced = _to_script(SelfAttention().eval(), [x], "trace")
    assert "_native_multi_head_attention" in str(traced.inlined_graph)
    compiled = compile(traced, {"input_infos": [("x", (2, 3, 16))],
                                "export_dir": str(tmp_path)})
    assert_outputs_close(compiled([x]), models.reference(SelfAttention().eval(), [x]),
                         rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
@pytest.mark.parametrize("kind", ["nn.Module", "ExportedProgram"])
def test_compile_accepts_module_and_exported_program(kind, name, tmp_path):
    model, inputs, infos = models.make(name)
    source = model if kind == "nn.Module" else torch.export.export(model, tuple(inputs))
    compiled = compile(source, {"input_infos": infos, "export_dir": str(tmp_path)})
    assert_outputs_close(compiled(inputs), models.reference(model, inputs), rtol=1e-4,
                         atol=1e-4)


def test_two_shape_buckets_in_one_module(tmp_path):
    model, _, _ = models.make("mlp")
    compiled = compile(torch.jit.script(model),
                       {"input_infos": [[("x", (1, 16))], [("x", (8, 16))]],
                        "export_dir": str(tmp_path)})
    assert compiled.signatures() == ["(float32[1, 16])", "(float32[8, 16])"]
    for batch in (1, 8):
        x = torch.randn(batch, 16)
        assert_outputs_close(compiled([x]), models.reference(model, [x]), rtol=1e-4, atol=1e-4)


def test_export_dir_holds_lib_graph_params(tmp_path):
    model, inputs, infos = models.make("cnn")
    compile(model, {"input_infos": infos, "export_dir": str(tmp_path)})
    names = sorted(os.listdir(tmp_path))
    # programs.json: what this build wrote (load_tvm reads it); .lock: the directory's lock.
    assert names == [".lock", "bucket0.graph.json", "bucket0.params", "bucket0.relax",
                     "bucket0.so", "programs.json"]
    manifest = json.loads((tmp_path / "bucket0.graph.json").read_text())
    assert manifest["inputs"] == [{"name": "in0", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert manifest["num_outputs"] == 1
    assert manifest["outputs"] == [{"shape": [1, 10], "dtype": "float32"}]
    assert manifest["torch_version"] == torch.__version__
    assert "def main" in (tmp_path / "bucket0.relax").read_text()
    # The seed's step-by-step API loads the same directory back.
    module = PyTorchTVMModule().load_tvm(str(tmp_path)).build_pytorch_module(1, 1)
    assert isinstance(module, GraphModule)
    assert_outputs_close(module(inputs), models.reference(model, inputs), rtol=1e-4, atol=1e-4)


def test_seed_step_by_step_api(tmp_path):
    model, inputs, infos = models.make("mlp")
    ptm = PyTorchTVMModule()
    ptm.from_pytorch(torch.jit.trace(model, tuple(inputs)), infos)
    ptm.build_tvm(str(tmp_path))
    module = ptm.build_pytorch_module(num_inputs=1, num_outputs=1)
    assert_outputs_close(module(inputs), models.reference(model, inputs), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_outputs=2 but the model returns 1 tensors"):
        ptm.build_pytorch_module(num_inputs=1, num_outputs=2)


class PredictorTVM(torch.nn.Module):
    """The seed's pattern: native preprocessing around a TVM module, scripted as a whole."""

    def __init__(self, tvm_module):
        super().__init__()
        self.tvm_module = tvm_module
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) * 2.0
        logits = self.tvm_module([x])[0]
        return logits.argmax(dim=1)


def test_predictor_pattern_saved_and_loaded_in_fresh_process(tmp_path):
    model, _, infos = models.make("cnn")
    compiled = compile(torch.jit.trace(model, torch.randn(1, 3, 16, 16)),
                       {"input_infos": infos, "export_dir": str(tmp_path / "export"),
                        "num_outputs": 1})
    predictor = torch.jit.script(PredictorTVM(compiled))
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    expected = PredictorTVM(model)
    with torch.no_grad():
        x = (images.float() / 255.0 - expected.mean) * 2.0
        want = model(x).argmax(dim=1)
    assert torch.equal(predictor(images), want)
    path = str(tmp_path / "predictor.pt")
    predictor.save(path)
    torch.save({"images": images, "want": want}, str(tmp_path / "io.pt"))
    import shutil
    shutil.rmtree(tmp_path / "export")
    out = run_fresh_python(f"""
        import torch, tvm.contrib.torch
        p = torch.jit.load({path!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(p(io["images"]), io["want"])
        print("OK")
    """, cwd=str(tmp_path))
    assert "OK" in out


def test_num_outputs_is_checked(tmp_path):
    model, inputs, infos = models.make("two_in_two_out")
    with pytest.raises(ValueError, match=r"num_outputs=1 but the model returns 2 tensor"):
        compile(model, {"input_infos": infos, "num_outputs": 1, "export_dir": str(tmp_path)})


@pytest.mark.parametrize("option, message", [
    ({"input_infos": [("x", (4, 16))], "tuning_trials": 3},
     r"unknown option key\(s\) \['tuning_trials'\]; valid keys are:\n  input_infos"),
    ({"input_infos": [("x", (4, 16))], "default_dtype": "int8"},
     r"default_dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'int8'"),
    ({"input_infos": [("x", (4, 16))], "tuning_n_trials": -1},
     r"tuning_n_trials must be an int >= 0, got -1"),
    ({"input_infos": [("x", (4, "16x"))], "num_outputs": "1"},
     r"num_outputs must be an int >= 1, got '1'"),
    ({}, r"input_infos is required"),
    ({"input_infos": [("x", (4, 0))]}, r"input_infos\[0\] \('x'\) dims must be positive"),
    ({"input_infos": [("x", (4, 16))], "min_block_size": 2},
     r"\['min_block_size'\] apply only with 'partition': True"),
])
def test_bad_options_are_rejected(option, message):
    model, _, _ = models.make("mlp")
    with pytest.raises(ValueError, match=message):
        compile(model, option)


def test_wrong_input_count_is_reported(tmp_path):
    model, _, _ = models.make("two_in_two_out")
    with pytest.raises(Exception, match=r"2|argument"):
        compile(model, {"input_infos": [("a", (3, 6))], "export_dir": str(tmp_path)})


@torch.library.custom_op("tvm_torch_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 3.0


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_operator_is_named_with_its_place(tmp_path):
    class WithCustomOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.ops.tvm_torch_test.mystery(x))

    with pytest.raises(ConversionError, match=r"TVM cannot convert these operators yet:\n"
                                              r"  mystery.default: used at .*"):
        compile(WithCustomOp().eval(), {"input_infos": [("x", (2, 4))],
                                        "export_dir": str(tmp_path)})


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_symbolic_batch_compiles_one_vm_module(name, tmp_path):
    from tvm.contrib.torch import VMModule

    model, inputs, infos = models.make(name)
    shape = ("batch",) + tuple(infos[0][1][1:])
    compiled = compile(torch.jit.trace(model, tuple(inputs)),
                       {"input_infos": [("x", shape)], "dim_ranges": {"batch": (1, 32)},
                        "export_dir": str(tmp_path)})
    assert isinstance(compiled, VMModule)
    for batch in (1, 3, 8, 17):
        x = torch.randn(batch, *inputs[0].shape[1:])
        assert_outputs_close(compiled([x]), models.reference(model, [x]), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"expected batch in \[1, 32\]"):
        compiled([torch.randn(33, *inputs[0].shape[1:])])


class _ReturnsNone(torch.nn.Module):
    def forward(self, x):
        return None


class _ReturnsTensorAndNone(torch.nn.Module):
    def forward(self, x):
        return x + 1, None


@pytest.mark.parametrize("model,index", [(_ReturnsNone(), 0), (_ReturnsTensorAndNone(), 1)])
def test_non_tensor_outputs_are_refused(model, index, tmp_path):
    with pytest.raises(ConversionError, match=rf"output {index} of the model is None, not a "
                                              r"tensor"):
        compile(model, {"input_infos": [("x", (2, 3))], "export_dir": str(tmp_path)})


def test_a_model_ignoring_its_input_compiles(tmp_path):
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.ones(3)

    module = compile(Constant(), {"input_infos": [("x", (2, 3))], "export_dir": str(tmp_path)})
    torch.testing.assert_close(module([torch.randn(2, 3)])[0], torch.ones(3))
