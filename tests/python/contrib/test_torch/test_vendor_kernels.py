"""Each vendor-kernel rewrite of vendor_kernels.offload_pass on small hand-built Relax modules.

No build: the rewritten ``main`` is inspected for the ``tvm_torch.*`` packed functions it calls
and the Relax operators left in it.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from tvm.contrib.torch import vendor_kernels

Builder = Callable[[relax.BlockBuilder, List[relax.Var]], relax.Expr]


def _const(shape, dtype="float32", seed=0):
    return relax.const(np.random.default_rng(seed).random(shape).astype(dtype))


def _module(inputs: List[Tuple[tuple, str]], body: Builder) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(shape), dtype))
              for i, (shape, dtype) in enumerate(inputs)]
    with bb.function("main", params, attrs={"num_input": len(params)}):
        with bb.dataflow():
            out = bb.emit_output(body(bb, params))
        bb.emit_func_output(out)
    # As passes.simplify leaves them: no var-to-var bindings.
    return relax.transform.CanonicalizeBindings()(bb.get())


def _calls(mod: tvm.IRModule) -> Tuple[List[str], List[str]]:
    """(packed functions called, Relax operators called) by ``main``, in order."""
    packed, ops = [], []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            if expr.op.name == "relax.call_pure_packed":
                packed.append(str(expr.args[0].global_symbol))
            else:
                ops.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return packed, ops


def _offload(inputs, body, gpu=False):
    mod = vendor_kernels.offload_pass(gpu=gpu)(_module(inputs, body))
    return _calls(mod) + (mod["main"].script(),)


def _conv(bb, x, weight_shape=(8, 3, 3, 3), padding=(1, 1), dtype="float32"):
    return bb.emit(relax.op.nn.conv2d(x, _const(weight_shape, dtype), padding=padding))


IMAGE = [((1, 3, 8, 8), "float32")]


def test_conv2d_runs_on_onednn_with_a_prepacked_weight():
    packed, ops, _ = _offload(IMAGE, lambda bb, p: _conv(bb, p[0]))
    assert packed == ["tvm_torch.conv2d_nhwc_prepack", "tvm_torch.conv2d_nhwc"]
    assert "relax.nn.conv2d" not in ops


def test_convolution_of_the_program_input_reads_it_as_nchw():
    """nchw_input_pass: the input's transpose to NHWC goes; a convolution of a computed value
    keeps its NHWC input."""
    def body(bb, p):
        first = _conv(bb, p[0])
        return _conv(bb, bb.emit(relax.op.nn.relu(first)), weight_shape=(8, 8, 3, 3))

    mod = vendor_kernels.nchw_input_pass()(vendor_kernels.offload_pass()(_module(IMAGE, body)))
    packed, ops = _calls(mod)
    assert [p for p in packed if not p.endswith("prepack")] == [
        "tvm_torch.conv2d_nchw_input", "tvm_torch.conv2d_nhwc"]
    # Left: the result's transpose back to NCHW.
    assert ops.count("relax.permute_dims") == 1, ops


def test_convolutions_write_into_planned_memory():
    """destination_passing_pass: every CPU convolution call (plain, of the NCHW input, with a
    residual add) becomes R.call_dps_packed of its "_out" variant with the same arguments and
    result type, so that the program's memory plan allocates its result."""
    def body(bb, p):
        first = _conv(bb, p[0])
        second = _conv(bb, bb.emit(relax.op.nn.relu(first)), weight_shape=(8, 8, 3, 3))
        return bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(second, p[1]))))

    offloaded = vendor_kernels.nchw_input_pass()(vendor_kernels.offload_pass()(
        _module(IMAGE + [((1, 8, 8, 8), "float32")], body)))
    before = [(str(c.args[0].global_symbol), [str(a) for a in c.args[1:]], c.ty)
              for c in _op_calls(offloaded, "relax.call_pure_packed") if "prepack" not in
              str(c.args[0].global_symbol)]
    assert [name for name, _, _ in before] == [
        "tvm_torch.conv2d_nchw_input", "tvm_torch.conv2d_add_nhwc"]
    mod = vendor_kernels.destination_passing_pass()(offloaded)
    packed, _ = _calls(mod)
    assert [p for p in packed if not p.endswith("prepack")] == []
    after = [(str(c.args[0].global_symbol), [str(a) for a in c.args[1].fields], c.ty)
             for c in _op_calls(mod, "relax.call_dps_packed")]
    assert [name for name, _, _ in after] == [
        "tvm_torch.conv2d_nchw_input_out", "tvm_torch.conv2d_add_nhwc_out"]
    for (_, args, ty), (_, args_after, ty_after) in zip(before, after):
        assert args == args_after and tvm_ffi.structural_equal(ty, ty_after)
    # A program without convolutions is left as it was.
    plain = _module(IMAGE, lambda bb, p: bb.emit(relax.op.nn.relu(p[0])))
    assert vendor_kernels.destination_passing_pass()(plain).same_as(plain)


def _op_calls(mod: tvm.IRModule, op_name: str) -> List[relax.Call]:
    """The calls of the Relax operator ``op_name`` in ``main``, in order."""
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op_name else None)
    return calls


def test_conv2d_bias_relu_is_one_call():
    def body(bb, p):
        y = bb.emit(relax.op.add(_conv(bb, p[0]), _const((1, 8, 1, 1), seed=1)))
        return bb.emit(relax.op.nn.relu(y))

    packed, ops, text = _offload(IMAGE, body)
    assert packed[-1] == "tvm_torch.conv2d_nhwc" and 'R.str("relu")' in text
    assert "relax.nn.relu" not in ops and "relax.add" not in ops


@pytest.mark.parametrize("op,attr", [(relax.op.nn.silu, "silu"), (relax.op.sigmoid, "sigmoid"),
                                     (relax.op.tanh, "tanh")])
def test_conv2d_bias_activation_is_one_call(op, attr):
    def body(bb, p):
        return bb.emit(op(bb.emit(relax.op.add(_conv(bb, p[0]), _const((1, 8, 1, 1), seed=1)))))

    packed, ops, text = _offload(IMAGE, body)
    assert packed[-1] == "tvm_torch.conv2d_nhwc" and f'R.str("{attr}")' in text
    assert not {"relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.add"} & set(ops)


def test_conv2d_with_residual_add_and_relu():
    def body(bb, p):
        y = bb.emit(relax.op.add(_conv(bb, p[0]), p[1]))
        return bb.emit(relax.op.nn.relu(y))

    packed, ops, text = _offload(IMAGE + [((1, 8, 8, 8), "float32")], body)
    assert packed[-1] == "tvm_torch.conv2d_add_nhwc" and 'R.str("relu")' in text
    assert "relax.nn.relu" not in ops


def test_residual_add_goes_to_the_convolution_whose_result_nothing_else_reads():
    """``x + conv(x)`` where ``x`` is itself a convolution's result (torchvision's
    MobileNetV2): the add fuses into the second convolution. Fusing it into the first would
    run that one twice, since the second reads its result too."""
    def body(bb, p):
        x = bb.emit(relax.op.add(_conv(bb, p[0]), _const((1, 8, 1, 1), seed=1)))
        y = bb.emit(relax.op.add(_conv(bb, x, (8, 8, 3, 3)), _const((1, 8, 1, 1), seed=2)))
        return bb.emit(relax.op.add(x, y))

    packed, ops, text = _offload(IMAGE, body)
    assert packed.count("tvm_torch.conv2d_nhwc_prepack") == 2, text
    assert packed.count("tvm_torch.conv2d_nhwc") + packed.count("tvm_torch.conv2d_add_nhwc") \
        == 2, text
    assert packed[-1] == "tvm_torch.conv2d_add_nhwc" and "relax.add" not in ops


def test_epilogue_of_a_result_read_elsewhere_stays_apart():
    """relu(conv) fuses only where nothing else reads the convolution's result: otherwise
    the convolution would run twice, once with the epilogue and once without."""
    def body(bb, p):
        y = _conv(bb, p[0])
        return bb.emit(relax.op.add(bb.emit(relax.op.nn.relu(y)), y))

    packed, ops, text = _offload(IMAGE, body)
    assert packed.count("tvm_torch.conv2d_nhwc") == 1 and 'R.str("relu")' not in text, text
    assert "relax.nn.relu" in ops


def test_linear_residual_add_goes_to_the_layer_whose_result_nothing_else_reads():
    """``h + linear2(h)`` where ``h`` is a linear layer's result: one run of each layer."""
    def body(bb, p):
        h = bb.emit(relax.op.add(bb.emit(relax.op.matmul(p[0], _const((16, 16)))),
                                 _const((16,), seed=1)))
        y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(h, _const((16, 16), seed=2))),
                                 _const((16,), seed=3)))
        return bb.emit(relax.op.add(h, y))

    packed, ops, _ = _offload([((4, 16), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear",
                      "tvm_torch.linear_prepack", "tvm_torch.linear_add"], packed
    assert not ops


def _relu6(bb, y, one_clip=False, high=6.0):
    """relu6 as torch decomposes it: clamp_min then clamp_max, or one clamp."""
    if one_clip:
        return bb.emit(relax.op.clip(y, 0.0, high))
    return bb.emit(relax.op.clip(bb.emit(relax.op.clip(y, 0.0, float("inf"))), float("-inf"),
                                 high))


def _hard(kind, shift=3.0, high=6.0):
    """A conv (+ bias), then hardswish, hardsigmoid or relu6, then another conv, in NCHW as
    imported."""
    def activation(bb, y):
        if kind == "relu6":
            return _relu6(bb, y, one_clip=True, high=high)
        gate = _relu6(bb, bb.emit(relax.op.add(y, relax.const(shift))), high=high)
        if kind == "hardsigmoid":
            return bb.emit(relax.op.divide(gate, relax.const(6.0)))
        return bb.emit(relax.op.divide(bb.emit(relax.op.multiply(y, gate)), relax.const(6.0)))

    def body(bb, p):
        y = bb.emit(relax.op.add(_conv(bb, p[0]), _const((1, 8, 1, 1), seed=1)))
        return _conv(bb, activation(bb, y), (4, 8, 3, 3))
    return body


@pytest.mark.parametrize("kind", ["hardswish", "hardsigmoid", "relu6"])
def test_conv2d_hard_activation_is_one_call(kind):
    packed, ops, text = _offload(IMAGE, _hard(kind))
    assert packed.count("tvm_torch.conv2d_nhwc") == 2 and f'R.str("{kind}")' in text
    # ConvertLayout's transposes around the clips are gone with them.
    assert ops == ["relax.permute_dims", "relax.permute_dims"], ops  # the input's and output's


@pytest.mark.parametrize("kind,shift,high", [("hardswish", 2.0, 6.0), ("hardsigmoid", 3.0, 5.0),
                                             ("relu6", 3.0, 5.0)])
def test_conv2d_activation_with_other_constants_is_not_fused(kind, shift, high):
    packed, ops, text = _offload(IMAGE, _hard(kind, shift, high))
    assert 'R.str("none")' in text and "relax.clip" in ops


def test_hardswish_of_another_convolution_is_not_fused():
    """conv_a * relu6(conv_b + 3) / 6 is not hardswish(conv_a)."""
    def body(bb, p):
        a = bb.emit(relax.op.add(_conv(bb, p[0]), _const((1, 8, 1, 1), seed=1)))
        conv_b = bb.emit(relax.op.nn.conv2d(p[0], _const((8, 3, 3, 3), seed=3), padding=(1, 1)))
        b = bb.emit(relax.op.add(conv_b, _const((1, 8, 1, 1), seed=2)))
        gate = _relu6(bb, bb.emit(relax.op.add(b, relax.const(3.0))))
        return bb.emit(relax.op.divide(bb.emit(relax.op.multiply(a, gate)), relax.const(6.0)))

    packed, ops, text = _offload(IMAGE, body)
    assert packed.count("tvm_torch.conv2d_nhwc") == 2 and "hardswish" not in text
    assert "relax.multiply" in ops and "relax.clip" in ops


def test_squeeze_excite_convolution_runs_as_a_gemv():
    """A 1x1 convolution of a 1x1 image (a squeeze-excite gate) is a matrix product: MKL's,
    with its epilogue, not oneDNN's convolution and its per-call set-up."""
    def body(bb, p):
        y = bb.emit(relax.op.add(_conv(bb, p[0], (8, 3, 1, 1), (0, 0)), _const((1, 8, 1, 1))))
        return bb.emit(relax.op.sigmoid(y))

    packed, ops, text = _offload([((2, 3, 1, 1), "float32")], body)
    assert packed == ["tvm_torch.matmul_bias"] and 'R.str("sigmoid")' in text
    assert "relax.sigmoid" not in ops
    packed, _, _ = _offload([((2, 3, 2, 2), "float32")], body)  # a 2x2 image: a convolution
    assert packed[-1] == "tvm_torch.conv2d_nhwc"


@pytest.mark.parametrize("bfloat16", [False, True])
@pytest.mark.parametrize("channels,expected", [(255, "tvm_torch.matmul_bias"),
                                               (256, "tvm_torch.conv2d_nhwc")])
def test_squeeze_excite_gates_from_64k_weights_run_on_onednn(channels, bfloat16, expected):
    """A gate of 64K weights or more runs as a oneDNN convolution (a compiled partition, no
    per-call set-up; in bfloat16 half the bytes to read); smaller ones on MKL's GEMV."""
    def body(bb, p):
        return _conv(bb, p[0], (channels, channels, 1, 1), (0, 0))

    mod = vendor_kernels.offload_pass(bfloat16=bfloat16)(
        _module([((1, channels, 1, 1), "float32")], body))
    assert _calls(mod)[0][-1] == expected


def test_conv2d_on_gpu_is_nchw_without_prepacking():
    for dtype in ("float32", "float16"):
        packed, ops, _ = _offload([((1, 3, 8, 8), dtype)],
                                  lambda bb, p, d=dtype: _conv(bb, p[0], dtype=d), gpu=True)
        assert packed == ["tvm_torch.conv2d_nchw"], dtype


@pytest.mark.parametrize("case", ["float16 on CPU", "asymmetric padding"])
def test_conv2d_left_alone(case):
    if case == "float16 on CPU":
        inputs, body = [((1, 3, 8, 8), "float16")], lambda bb, p: _conv(bb, p[0], dtype="float16")
    else:
        inputs, body = IMAGE, lambda bb, p: _conv(bb, p[0], padding=(0, 0, 1, 1))
    packed, ops, _ = _offload(inputs, body)
    assert packed == [] and "relax.nn.conv2d" in ops


def test_matmul_with_constant_weight_bias_relu():
    def body(bb, p):
        y = bb.emit(relax.op.matmul(p[0], _const((16, 32))))
        y = bb.emit(relax.op.add(y, _const((32,), seed=1)))
        return bb.emit(relax.op.nn.relu(y))

    packed, ops, text = _offload([((4, 16), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear"]
    assert 'R.str("relu")' in text
    assert not {"relax.matmul", "relax.add", "relax.nn.relu"} & set(ops)
    packed, ops, text = _offload([((4, 16), "float32")], body, gpu=True)
    assert packed == ["tvm_torch.matmul_bias"] and 'R.str("relu")' in text
    assert not {"relax.matmul", "relax.add", "relax.nn.relu"} & set(ops)


@pytest.mark.parametrize("op,attr", [(relax.op.nn.gelu, "gelu"),
                                     (relax.op.nn.gelu_tanh, "gelu_tanh")])
def test_linear_gelu_is_one_onednn_call_on_cpu(op, attr):
    def body(bb, p):
        y = bb.emit(relax.op.matmul(p[0], _const((16, 32))))
        return bb.emit(op(bb.emit(relax.op.add(y, _const((32,), seed=1)))))

    packed, ops, text = _offload([((2, 4, 16), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear"]
    assert f'R.str("{attr}")' in text and not ops
    # The rows of a [2, 4, 16] input: the prepack is sized for 8 rows.
    assert '"tvm_torch.linear_prepack", metadata["ir.GenericConst"][0], 8,' in text


def test_linear_residual_add_is_fused_on_cpu_unless_it_broadcasts():
    def body(bb, p):
        y = bb.emit(relax.op.matmul(p[0], _const((16, 32))))
        return bb.emit(relax.op.add(p[1], bb.emit(relax.op.add(y, _const((32,), seed=1)))))

    packed, ops, _ = _offload([((4, 16), "float32"), ((4, 32), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear_add"] and not ops
    packed, ops, _ = _offload([((4, 16), "float32"), ((1, 32), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear"] and ops == ["relax.add"]


def test_linear_without_bias_fuses_relu_and_the_residual_add_on_cpu():
    """T5's and Llama's linear layers have no bias."""
    def body(bb, p):
        hidden = bb.emit(relax.op.nn.relu(bb.emit(relax.op.matmul(p[0], _const((16, 32))))))
        out = bb.emit(relax.op.matmul(hidden, _const((32, 16), seed=1)))
        return bb.emit(relax.op.add(p[0], out))

    packed, ops, text = _offload([((4, 16), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear",
                      "tvm_torch.linear_prepack", "tvm_torch.linear_add"], packed
    assert not ops and 'R.str("relu")' in text


def test_matmul_with_transposed_constant_weight():
    """nn.Linear's ``x @ weight.T``: the pipeline folds the transpose first (passes.simplify)."""
    def body(bb, p):
        weight = bb.emit(relax.op.permute_dims(_const((32, 16)), [1, 0]))
        return bb.emit(relax.op.matmul(p[0], weight))

    mod = relax.transform.FoldConstant()(_module([((4, 16), "float32")], body))
    packed, ops = _calls(vendor_kernels.offload_pass()(mod))
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear"]
    assert "relax.permute_dims" not in ops


def test_generic_matmul():
    packed, ops, _ = _offload([((2, 4, 16), "float32"), ((2, 16, 8), "float32")],
                              lambda bb, p: bb.emit(relax.op.matmul(p[0], p[1])))
    assert packed == ["tvm_torch.matmul"] and "relax.matmul" not in ops


def test_integer_matmul_left_alone():
    packed, ops, _ = _offload([((4, 16), "int32"), ((16, 8), "int32")],
                              lambda bb, p: bb.emit(relax.op.matmul(p[0], p[1])))
    assert packed == [] and ops == ["relax.matmul"]


def test_layer_norm_and_softmax():
    def body(bb, p):
        y = bb.emit(relax.op.nn.layer_norm(p[0], _const((16,)), _const((16,), seed=1), axes=[-1]))
        return bb.emit(relax.op.nn.softmax(y, axis=-1))

    packed, ops, _ = _offload([((4, 16), "float32")], body)
    assert packed == ["tvm_torch.layer_norm", "tvm_torch.softmax"]
    assert not {"relax.nn.layer_norm", "relax.nn.softmax"} & set(ops)


def _probabilities_times(bb, p, reader):
    """softmax(s) (reshaped as batched attention reshapes it) times v, and ``reader`` of the
    probabilities (or None)."""
    probs = bb.emit(relax.op.nn.softmax(p[0], axis=-1))
    flat = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(probs, (2, 3, 6, 6))),
                                    (6, 6, 6)))
    out = bb.emit(relax.op.matmul(flat, p[1]))
    if reader is None:
        return out
    return bb.emit(relax.Tuple([out, bb.emit(reader(probs))]))


@pytest.mark.parametrize("reader, flushed", [(None, True), (relax.op.log, False),
                                             (lambda probs: probs, False)],
                         ids=["matmul-only", "log", "output"])
def test_attention_probabilities_flush_subnormals_when_only_a_product_reads_them(reader,
                                                                                 flushed):
    scores, values = ((2, 3, 6, 6), "float32"), ((6, 6, 4), "float32")
    packed, _, _ = _offload([scores, values], lambda bb, p: _probabilities_times(bb, p, reader))
    softmax = "tvm_torch.softmax_probabilities" if flushed else "tvm_torch.softmax"
    assert packed == [softmax, "tvm_torch.matmul"], packed


def test_probabilities_as_the_right_operand_are_not_flushed():
    def body(bb, p):
        probs = bb.emit(relax.op.nn.softmax(p[0], axis=-1))
        return bb.emit(relax.op.matmul(p[1], probs))

    packed, _, _ = _offload([((6, 6, 6), "float32"), ((6, 4, 6), "float32")], body)
    assert packed == ["tvm_torch.softmax", "tvm_torch.matmul"], packed


def test_layer_norm_over_a_leading_axis_left_alone():
    body = lambda bb, p: bb.emit(relax.op.nn.layer_norm(  # noqa: E731
        p[0], _const((4,)), _const((4,), seed=1), axes=[0]))
    packed, ops, _ = _offload([((4, 16), "float32")], body)
    assert packed == [] and ops == ["relax.nn.layer_norm"]


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_nhwc_pooling_runs_on_aten_on_cpu_only(pool):
    op = relax.op.nn.max_pool2d if pool == "max" else relax.op.nn.avg_pool2d

    def body(bb, p):
        return bb.emit(op(p[0], pool_size=(3, 3), strides=(2, 2), padding=(1, 1),
                          layout="NHWC"))

    packed, ops, _ = _offload([((1, 9, 9, 8), "float32")], body)
    assert packed == [f"tvm_torch.{pool}_pool2d_nhwc"]
    packed, ops, _ = _offload([((1, 9, 9, 8), "float32")], body, gpu=True)
    assert packed == [] and ops == [f"relax.nn.{pool}_pool2d"]


def test_unary_on_large_cpu_tensors_only():
    def body(bb, p):
        return bb.emit(relax.Tuple([bb.emit(relax.op.nn.gelu(p[0])),
                                    bb.emit(relax.op.nn.gelu(p[1]))]))

    inputs = [((64, 128), "float32"), ((4, 8), "float32")]
    packed, ops, text = _offload(inputs, body)
    assert packed == ["tvm_torch.unary"] and 'R.str("gelu")' in text
    assert ops.count("relax.nn.gelu") == 1  # 32 elements: a fused TVM kernel is cheaper
    packed, _, _ = _offload(inputs, body, gpu=True)
    assert packed == []


def test_mean_over_leading_axes_of_a_large_tensor_runs_on_aten():
    def body(bb, p):
        pooled = bb.emit(relax.op.mean(p[0], axis=[1, 2], keepdims=True))  # NHWC global pool
        rows = bb.emit(relax.op.mean(p[0], axis=[3]))  # innermost: TVM reads it contiguously
        small = bb.emit(relax.op.mean(p[1], axis=[1, 2], keepdims=True))
        return bb.emit(relax.Tuple([pooled, rows, small]))

    inputs = [((1, 16, 16, 32), "float32"), ((1, 2, 2, 8), "float32")]
    packed, ops, text = _offload(inputs, body)
    assert packed == ["tvm_torch.mean"] and "R.shape([1, 2])" in text
    assert ops.count("relax.mean") == 2
    assert _offload(inputs, body, gpu=True)[0] == []


@pytest.mark.parametrize("keepdims", [True, False])
def test_global_pool_after_a_relu6_reads_the_nhwc_convolution(keepdims):
    """conv -> relu6 -> mean over H and W (torchvision MobileNetV2's head): the relu6 fuses
    into the convolution and the mean reads its NHWC result, with no transpose of the image
    back to NCHW in between."""
    def body(bb, p):
        y = bb.emit(relax.op.add(_conv(bb, p[0], (64, 3, 3, 3)), _const((1, 64, 1, 1), seed=1)))
        return bb.emit(relax.op.mean(_relu6(bb, y), axis=[2, 3], keepdims=keepdims))

    packed, ops, text = _offload([((1, 3, 16, 16), "float32")], body)
    assert packed == ["tvm_torch.conv2d_nhwc_prepack", "tvm_torch.conv2d_nhwc",
                      "tvm_torch.mean"], text
    assert 'R.str("relu6")' in text and "relax.clip" not in ops
    # Only the input's transpose (and, with keepdims, the pooled vector's) is left.
    assert ops.count("relax.permute_dims") == (2 if keepdims else 1), text


def _rms_norm(square="multiply", axis=-1, weight_first=True, weight_shape=(8,)):
    """Hugging Face's T5/Llama RMSNorm as the importer writes it."""
    def body(bb, p):
        (x,) = p
        sq = bb.emit(relax.op.multiply(x, x) if square == "multiply" else
                     relax.op.power(x, relax.const(float(square), "float32")))
        mean = bb.emit(relax.op.mean(sq, axis=[axis], keepdims=True))
        scale = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(mean, relax.const(1e-6)))))
        normed = bb.emit(relax.op.multiply(x, scale))
        weight = relax.const(np.linspace(-1, 1, int(np.prod(weight_shape)), dtype="float32")
                             .reshape(weight_shape))
        return bb.emit(relax.op.multiply(weight, normed) if weight_first else
                       relax.op.multiply(normed, weight))
    return body


@pytest.mark.parametrize("square,weight_first", [("multiply", True), (2, False)],
                         ids=["x*x, weight*h", "x**2, h*weight"])
def test_rms_norm_runs_on_aten(square, weight_first):
    packed, ops, _ = _offload([((2, 5, 8), "float32")], _rms_norm(square, -1, weight_first))
    assert packed == ["tvm_torch.rms_norm"] and not {"relax.rsqrt", "relax.mean"} & set(ops)


@pytest.mark.parametrize("variant", [dict(axis=1), dict(square=3), dict(weight_shape=(5, 8))],
                         ids=["leading-axis", "cube", "2-d-weight"])
def test_other_normalizations_left_alone(variant):
    packed, ops, _ = _offload([((2, 5, 8), "float32")], _rms_norm(**variant))
    assert "tvm_torch.rms_norm" not in packed and "relax.rsqrt" in ops


def test_rms_norm_left_to_tvm_on_cuda():
    packed, _, _ = _offload([((2, 5, 8), "float32")], _rms_norm(), gpu=True)
    assert "tvm_torch.rms_norm" not in packed


def test_attention():
    shape = ((2, 6, 4, 8), "float32")
    packed, ops, _ = _offload([shape] * 3, lambda bb, p: bb.emit(relax.op.nn.attention(*p)))
    assert packed == ["tvm_torch.attention"] and "relax.nn.attention" not in ops


def _fused_qkv_attention(bb, p, q_from_add=False):
    """timm's attention: one [B, N, 3*H*D] projection, reshaped to [B, N, 3, H, D], permuted to
    [3, B, H, N, D] and unbound (strided slices, squeezes), then in relax.nn.attention's
    [B, N, H, D] layout."""
    qkv = bb.emit(relax.op.reshape(p[0], (2, 5, 3, 4, 8)))
    qkv = bb.emit(relax.op.permute_dims(qkv, [2, 0, 3, 1, 4]))
    parts = []
    for i in range(3):
        part = bb.emit(relax.op.strided_slice(qkv, [0], [i], [i + 1]))
        part = bb.emit(relax.op.squeeze(part, [0]))
        parts.append(bb.emit(relax.op.permute_dims(part, [0, 2, 1, 3])))
    if q_from_add:
        parts[0] = bb.emit(relax.op.add(parts[0], parts[0]))
    return bb.emit(relax.op.nn.attention(*parts))


def test_attention_reads_a_fused_qkv_projection_through_views():
    packed, ops, text = _offload([((2, 5, 96), "float32")], _fused_qkv_attention)
    assert packed == ["tvm_torch.attention_views"]
    assert not {"relax.permute_dims", "relax.strided_slice", "relax.squeeze"} & set(ops)
    # q, k and v: [B, N, H, D] = [2, 5, 4, 8] inside [2, 5, 3, 4, 8], a third (32) apart.
    assert "R.shape([2, 5, 4, 8, 480, 96, 8, 1, 0, 2, 5, 4, 8, 480, 96, 8, 1, 32," in text


def test_attention_on_a_computed_query_keeps_its_copies():
    packed, ops, _ = _offload([((2, 5, 96), "float32")],
                              lambda bb, p: _fused_qkv_attention(bb, p, q_from_add=True))
    assert packed == ["tvm_torch.attention"] and "relax.strided_slice" in ops


def test_attention_with_a_boolean_mask_passes_the_mask():
    qkv = ((2, 6, 4, 8), "float32")

    def body(bb, p):
        q, k, v, mask = p
        bias = bb.emit(relax.op.where(mask, relax.const(0.0), relax.const(float("-inf"))))
        return bb.emit(relax.op.nn.attention(q, k, v, bias))

    packed, ops, text = _offload([qkv] * 3 + [((2, 1, 6, 6), "bool")], body)
    assert packed == ["tvm_torch.attention_masked"] and "relax.nn.attention_bias" not in ops
    assert "relax.where" not in ops  # ATen gets the boolean mask itself


def _split_qkv_attention(bb, p):
    """GPT-2's attention: one [B, N, 3*H*D] projection split in three along its last axis,
    each third viewed as [B, N, H, D], with a boolean padding mask."""
    qkv, mask = p
    parts = bb.emit(relax.op.split(qkv, 3, axis=2))
    q, k, v = (bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(parts, i)), (2, 5, 4, 8)))
               for i in range(3))
    bias = bb.emit(relax.op.where(mask, relax.const(0.0), relax.const(float("-inf"))))
    return bb.emit(relax.op.nn.attention(q, k, v, bias))


def test_masked_attention_reads_a_split_qkv_projection_through_views():
    packed, ops, text = _offload([((2, 5, 96), "float32"), ((2, 1, 5, 5), "bool")],
                                 _split_qkv_attention)
    assert packed == ["tvm_torch.attention_views_masked"]
    assert not {"relax.split", "relax.reshape", "relax.where"} & set(ops), ops
    # q, k and v: [B, N, H, D] = [2, 5, 4, 8] inside [2, 5, 96], a third (32) apart.
    assert "R.shape([2, 5, 4, 8, 480, 96, 8, 1, 0, 2, 5, 4, 8, 480, 96, 8, 1, 32," in text


def _converted_masked_attention(bb, p):
    """relax.nn.attention as converters.py writes a boolean-masked scaled_dot_product_attention:
    the mask as a -inf bias, and the result zeroed on rows where no key is attended to."""
    q, k, v, mask = p
    bias = bb.emit(relax.op.where(mask, relax.const(0.0), relax.const(float("-inf"))))
    row_valid = bb.emit(relax.op.max(relax.op.astype(mask, "float32"), axis=-1, keepdims=True))
    heads_second = [0, 2, 1, 3]
    out = bb.emit(relax.op.nn.attention(*(bb.emit(relax.op.permute_dims(t, heads_second))
                                          for t in (q, k, v)), bias))
    out = bb.emit(relax.op.permute_dims(out, heads_second))
    return bb.emit(relax.op.where(relax.op.greater(row_valid, relax.const(0.0)), out,
                                  relax.const(0.0)))


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "cuda"])
def test_row_zeroing_after_boolean_masked_attention(gpu):
    """On CPU, ATen's attention gives 0 on a row with no key itself (test_exactness checks it
    against PyTorch), so the converter's zeroing goes; on CUDA it stays."""
    qkv = ((2, 4, 6, 8), "float32")
    packed, ops, _ = _offload([qkv] * 3 + [((2, 1, 6, 6), "bool")],
                              _converted_masked_attention, gpu=gpu)
    # (On CPU, q, k and v, permuted inputs, are read as views.)
    assert packed == ["tvm_torch.attention_masked" if gpu else "tvm_torch.attention_views_masked"]
    assert ("relax.where" in ops) == gpu and ("relax.max" in ops) == gpu, ops


def test_attention_with_an_additive_mask():
    qkv = ((2, 6, 4, 8), "float32")
    packed, ops, _ = _offload([qkv] * 3 + [((1, 1, 6, 6), "float32")],
                              lambda bb, p: bb.emit(relax.op.nn.attention(*p)))
    assert packed == ["tvm_torch.attention_masked"] and "relax.nn.attention_bias" not in ops


def test_conv1d_runs_as_a_onednn_conv2d_on_cpu():
    def body(bb, p):
        return bb.emit(relax.op.nn.conv1d(p[0], _const((8, 4, 3)), padding=(1, 1)))

    packed, ops, _ = _offload([((1, 4, 16), "float32")], body)
    assert packed == ["tvm_torch.conv2d_nhwc_prepack", "tvm_torch.conv2d_nhwc"]
    assert "relax.nn.conv1d" not in ops
    gpu_packed, gpu_ops, _ = _offload([((1, 4, 16), "float32")], body, gpu=True)
    assert gpu_packed == [] and "relax.nn.conv1d" in gpu_ops


def test_permutes_that_cancel_fold_away():
    def body(bb, p):
        y = bb.emit(relax.op.permute_dims(p[0], [0, 2, 1]))
        return bb.emit(relax.op.permute_dims(y, [0, 2, 1]))

    packed, ops, _ = _offload([((2, 3, 4), "float32")], body)
    assert packed == [] and ops == []


def test_two_permutes_become_one():
    def body(bb, p):
        y = bb.emit(relax.op.permute_dims(p[0], [0, 2, 1]))
        return bb.emit(relax.op.permute_dims(y, [1, 0, 2]))

    mod = vendor_kernels.offload_pass()(_module([((2, 3, 4), "float32")], body))
    assert _calls(mod) == ([], ["relax.permute_dims"])
    # x.transpose(0, 2, 1).transpose(1, 0, 2) has shape (4, 2, 3)
    assert [int(d) for d in mod["main"].ret_ty.shape.values] == [4, 2, 3]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_a_3d_input_loses_its_reshapes_so_its_epilogue_fuses(bias):
    """nn.Linear on [B, S, K] is exported as reshape / 2-D GEMM / reshape."""
    def body(bb, p):
        flat = bb.emit(relax.op.reshape(p[0], (8, 16)))
        y = bb.emit(relax.op.matmul(flat, _const((16, 32))))
        if bias:
            y = bb.emit(relax.op.add(y, _const((32,), seed=1)))
        return bb.emit(relax.op.nn.gelu(bb.emit(relax.op.reshape(y, (2, 4, 32)))))

    packed, ops, text = _offload([((2, 4, 16), "float32")], body)
    assert packed == ["tvm_torch.linear_prepack", "tvm_torch.linear"] and not ops
    assert 'R.str("gelu")' in text


@pytest.mark.parametrize("bfloat16", [False, True])
def test_bfloat16_programs_prepack_for_onednn_bfloat16_kernels(bfloat16):
    def body(bb, p):
        y = bb.emit(relax.op.nn.relu(_conv(bb, p[0])))
        flat = bb.emit(relax.op.reshape(y, (1, 8 * 8 * 8)))
        return bb.emit(relax.op.matmul(flat, _const((8 * 8 * 8, 4))))

    mod = vendor_kernels.offload_pass(bfloat16=bfloat16)(_module(IMAGE, body))
    packed, _ = _calls(mod)
    assert packed == ["tvm_torch.conv2d_nhwc_prepack", "tvm_torch.conv2d_nhwc",
                      "tvm_torch.linear_prepack", "tvm_torch.linear"]
    dtype = "bfloat16" if bfloat16 else "float32"
    assert mod["main"].script().count(f'R.str("{dtype}")') == 2


def _packed_calls(mod: tvm.IRModule) -> dict:
    """Each packed call of ``main`` by its function name (in order), with its bound variable."""
    found: dict = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get(
                    "relax.call_pure_packed"):
                found.setdefault(str(value.args[0].global_symbol), []).append(binding)
    return found


def test_bfloat16_results_pass_from_one_vendor_kernel_to_the_next():
    """In a bfloat16 program, convolutions return bfloat16 and the next convolution reads that
    result itself (no float32 copy between them); a residual add of two bfloat16 values is
    bfloat16; the mean and the linear layer after it read and return bfloat16."""
    def body(bb, p):
        a = bb.emit(relax.op.nn.relu(_conv(bb, p[0])))
        conv = bb.emit(relax.op.add(_conv(bb, a, (8, 8, 3, 3)), _const((1, 8, 1, 1), seed=1)))
        pooled = bb.emit(relax.op.mean(bb.emit(relax.op.add(conv, a)), [2, 3]))
        return bb.emit(relax.op.matmul(pooled, _const((8, 4))))

    mod = vendor_kernels.offload_pass(bfloat16=True)(_module([((1, 3, 32, 32), "float32")],
                                                             body))
    calls = _packed_calls(mod)
    (first,), (second,) = calls["tvm_torch.conv2d_nhwc"], calls["tvm_torch.conv2d_add_nhwc"]
    for binding in (first, second, *calls["tvm_torch.linear"]):
        assert binding.var.ty.dtype == "bfloat16"
    # The second convolution reads the first's bfloat16 result, as input and as residual.
    assert second.value.args[1].same_as(first.var) and second.value.args[2].same_as(first.var)
    # Biases are converted to bfloat16 at compile time, not at every call.
    assert isinstance(second.value.args[4], tvm.ir.GenericConst)
    assert second.value.args[4].ty.dtype == "bfloat16"
    (mean,) = calls["tvm_torch.mean"]
    assert mean.value.args[1].same_as(second.var) and mean.var.ty.dtype == "bfloat16"


def test_bfloat16_program_keeps_a_float32_residual_stream_float32():
    """x + linear(layer_norm(x)) as in a transformer block: the float32 residual makes the sum,
    and so the stream, float32 (as torch.autocast's type promotion does); the linear layer
    itself reads bfloat16."""
    def body(bb, p):
        normed = bb.emit(relax.op.nn.layer_norm(p[0], _const((16,)), _const((16,), seed=1),
                                                axes=[-1]))
        return bb.emit(relax.op.add(bb.emit(relax.op.matmul(normed, _const((16, 16)))), p[0]))

    mod = vendor_kernels.offload_pass(bfloat16=True)(_module([((8, 16), "float32")], body))
    (linear_add,) = _packed_calls(mod)["tvm_torch.linear_add"]
    assert linear_add.var.ty.dtype == "float32"
    assert linear_add.value.args[1].ty.dtype == "bfloat16"
    assert linear_add.value.args[2].ty.dtype == "float32"


def test_bfloat16_attention_reads_the_projections_bfloat16_results():
    """q, k and v reshaped out of linear layers' bfloat16 results: attention computes in
    bfloat16 on them (as scaled_dot_product_attention under torch.autocast), and the output
    projection reads the bfloat16 reshape of its result."""
    def body(bb, p):
        def heads(weight_seed):
            projected = bb.emit(relax.op.matmul(p[0], _const((16, 16), seed=weight_seed)))
            return bb.emit(relax.op.reshape(projected, (1, 8, 2, 8)))

        out = bb.emit(relax.op.nn.attention(heads(1), heads(2), heads(3)))
        return bb.emit(relax.op.matmul(bb.emit(relax.op.reshape(out, (1, 8, 16))),
                                       _const((16, 16), seed=4)))

    mod = vendor_kernels.offload_pass(bfloat16=True)(_module([((1, 8, 16), "float32")], body))
    calls = _packed_calls(mod)
    # (Reshapes of contiguous tensors: attention reads them as views of the projections.)
    (attention,) = calls["tvm_torch.attention_views"]
    assert attention.var.ty.dtype == "bfloat16"
    assert all(arg.ty.dtype == "bfloat16" for arg in attention.value.args[1:4])
    bound = vendor_kernels._bindings(mod["main"])  # pylint: disable=protected-access
    # The output projection's input is the reshape of attention's bfloat16 result.
    reshaped = bound[calls["tvm_torch.linear"][-1].value.args[1]]
    assert reshaped.op.name == "relax.reshape" and reshaped.args[0].same_as(attention.var)
