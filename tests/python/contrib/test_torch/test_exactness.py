"""Compiled modules compute what PyTorch computes: dtype promotion, attention masks and scales,
shapes read inside traced models, low-precision models, and the verification step that
catches a program that does not."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from tvm.contrib.torch import ConversionError, compile, fx_passes, pipeline
from tvm.contrib.torch.build import (bfloat16_matmul_speedup, bfloat16_slowdown_warning,
                                        cpu_has_bfloat16)

import zoo_models


def _compile(model, inputs, tmp_path, **option):
    infos = [(f"x{i}", tuple(t.shape), str(t.dtype).replace("torch.", ""))
             for i, t in enumerate(inputs)]
    return compile(model, {"input_infos": infos, "export_dir": str(tmp_path / "export"),
                           **option})


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)


class Promotions(torch.nn.Module):
    """Binary operators between tensors of every dtype pair and with Python scalars."""

    def forward(self, u8, i32, i64, b, f32):
        tensors = [u8, i32, i64, b, f32]
        out = []
        for lhs in tensors:
            for rhs in tensors:
                out.append(lhs + rhs if lhs.dtype != torch.bool or rhs.dtype != torch.bool
                           else lhs | rhs)
                out.append(lhs * rhs)
                out.append(lhs < rhs)
            out += [lhs + 0.5, lhs * 1.5, lhs / 2, lhs + 1, lhs > 0.5, lhs == 1]
            if lhs.dtype != torch.bool:
                out.append(lhs - 1)
        out += [i32 // 3, i64 // 4, u8 // 2, i64 % 3, i32 / i64, u8 / f32]
        out += [b & (u8 > 2), b | (i32 > 3), b ^ (i64 > 4), ~b, ~i32, i64 & 6, u8 ^ 3]
        out += [b.sum(), b.cumsum(-1), torch.where(b, i32, f32), torch.where(b, u8, 0.5)]
        return tuple(out)


def _promotion_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(1, 9, (2, 6), generator=g, dtype=torch.uint8),
            torch.randint(1, 9, (2, 6), generator=g, dtype=torch.int32),
            torch.randint(1, 9, (2, 6), generator=g, dtype=torch.int64),
            torch.randint(0, 2, (2, 6), generator=g).bool(),
            torch.randn(2, 6, generator=g))


@pytest.mark.parametrize("frontend", ["trace", "module"])
def test_type_promotion_matches_pytorch(frontend, tmp_path):
    model, inputs = Promotions().eval(), _promotion_inputs()
    source = torch.jit.trace(model, inputs) if frontend == "trace" else model
    compiled = _compile(source, inputs, tmp_path)
    _assert_same(compiled(list(inputs)), list(model(*inputs)))


class Attention(torch.nn.Module):
    """Attention as users write it, one variant per ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        kind = self.kind
        if kind == "bool_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if kind == "float_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.float() * -3.0)
        if kind == "padding_mask":  # (B, S) broadcast over heads and queries
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, 0, 0, :][:, None,
                                                                                     None, :])
        if kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if kind == "scale":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        if kind == "dropout_p0":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=0.3)
        if kind == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
        if kind == "fully_masked_row":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & (
                torch.arange(q.shape[2])[:, None] > 0))
        raise ValueError(kind)


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 8, 8, generator=g) > 0.3
    mask[..., 0] = True  # every query sees a key (except where a test masks a row)
    return q, k, v, mask


@pytest.mark.parametrize("vendor_kernels", [True, False], ids=["aten", "tvm"])
@pytest.mark.parametrize("kind", ["bool_mask", "float_mask", "padding_mask", "causal", "scale",
                                  "dropout_p0", "gqa", "fully_masked_row"])
def test_attention_matches_pytorch(kind, vendor_kernels, tmp_path):
    model, inputs = Attention(kind).eval(), _attention_inputs()
    compiled = _compile(model, inputs, tmp_path, vendor_kernels=vendor_kernels)
    _assert_same(compiled(list(inputs)), [model(*inputs)])


def test_attention_dropout_is_refused(tmp_path):
    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    inputs = _attention_inputs()[:3]
    with pytest.raises(ConversionError, match=r"scaled_dot_product_attention .*dropout_p=0.5"):
        _compile(Dropout().eval(), inputs, tmp_path)


class RMSNorm(torch.nn.Module):
    """Hugging Face's T5/Llama RMSNorm (float32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim, generator=torch.Generator()
                                                     .manual_seed(2)))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


@pytest.mark.parametrize("vendor_kernels", [True, False], ids=["aten", "tvm"])
def test_rms_norm_matches_pytorch(vendor_kernels, tmp_path):
    """On ATen, bit for bit (NaN and Inf rows included); on TVM's kernels, within rounding."""
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(3)) * 30
    x[0, 1, 5], x[1, 2, 0], x[1, 3, :] = float("nan"), float("inf"), 0.0
    model = RMSNorm(96).eval()
    (out,) = _compile(model, (x,), tmp_path, vendor_kernels=vendor_kernels)([x])
    expected = model(x)
    if vendor_kernels:
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    else:
        _assert_same([out], [expected])


class PositionSlice(torch.nn.Module):
    """What traced HF/timm embeddings do: a buffer sliced by the input's length, an arange on
    sizes, an expanded buffer, and integer arithmetic on sizes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(32)[None, :], persistent=False)
        self.register_buffer("token_type", torch.zeros(1, 32, dtype=torch.long),
                             persistent=False)
        self.pos = torch.nn.Parameter(torch.randn(1, 32, 8))
        self.embed = torch.nn.Embedding(32, 8)

    def forward(self, x):
        seq, past = x.size(1), 0
        ids = self.position_ids[:, past:seq + past]  # as BERT: the traced sum is add.Scalar
        types = self.token_type[:, :seq].expand(x.size(0), seq)
        steps = torch.arange(seq // 2) * 2
        out = x + self.pos[:, 0:x.size(1)] + self.embed(ids) + self.embed(types)
        return out[:, steps], torch.full((1,), seq * 3 // 4)


def test_traced_size_arithmetic(tmp_path):
    model = PositionSlice().eval()
    x = torch.randn(2, 12, 8)
    compiled = _compile(torch.jit.trace(model, (x,)), (x,), tmp_path)
    _assert_same(compiled([x]), list(model(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_compiles_in_its_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4)).eval().to(dtype)
    x = torch.randn(1, 3, 8, 8).to(dtype)
    compiled = _compile(torch.jit.trace(model, (x,)), (x,), tmp_path)
    out = compiled([x])[0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model(x).float(), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions "
                    "(AVX-512 BF16 or AMX)")
def test_bfloat16_transformer_matches_autocast(tmp_path):
    """A BERT with a padding mask compiled with default_dtype="bfloat16" (linear layers and
    attention in bfloat16, passing bfloat16 results to one another) against the float32 model
    under torch.autocast."""
    model, inputs = zoo_models.bert("sdpa")
    compiled = _compile(model, inputs, tmp_path, default_dtype="bfloat16")
    actual = compiled(list(inputs))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model(*inputs)
    expected = expected.to_tuple() if hasattr(expected, "to_tuple") else expected
    assert len(actual) == len(expected) and actual[0].dtype == torch.bfloat16
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("speedup,warns", [(0.6, True), (0.95, False), (1.4, False)])
def test_bfloat16_slowdown_warning(speedup, warns):
    message = bfloat16_slowdown_warning(speedup)
    assert (message is not None) == warns
    if warns:
        assert "1.7x slower than float32" in message and "default_dtype='float32'" in message


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions "
                    "(AVX-512 BF16 or AMX)")
def test_bfloat16_program_warns_where_bfloat16_measures_slower(tmp_path, caplog):
    """The compile-time measurement decides the warning (cached: the same value here)."""
    speedup = bfloat16_matmul_speedup()
    assert 0.05 < speedup < 50
    model = torch.nn.Linear(16, 8).eval()
    x = torch.randn(2, 16)
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        _compile(model, (x,), tmp_path, default_dtype="bfloat16")
    expected = bfloat16_slowdown_warning(speedup)
    assert (expected in caplog.text) if expected else "slower than float32" not in caplog.text


class _LinearResidual(torch.nn.Module):
    """Residual adds whose both sides are bfloat16 in a bfloat16 program (linear layers'
    results, and the program's bfloat16 input): bfloat16 sums, which oneDNN's binary linear
    op computes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        y = self.fc1(x)
        z = self.fc2(y) + y
        return torch.relu(self.fc3(z) + x), z


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions "
                    "(AVX-512 BF16 or AMX)")
def test_bfloat16_residual_adds_match_autocast(tmp_path):
    torch.manual_seed(0)
    model = _LinearResidual().eval()
    x = torch.randn(4, 32)
    x[0, 3] = float("nan")
    compiled = compile(model, {"input_infos": [("x", (4, 32))], "default_dtype": "bfloat16",
                               "export_dir": str(tmp_path)})
    actual = compiled([x.bfloat16()])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model(x.bfloat16())
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e.float(), rtol=4e-2, atol=4e-2, equal_nan=True)


class IntDivision(torch.nn.Module):
    def forward(self, x):
        return x / 2


def test_verification_catches_a_wrong_program(tmp_path, monkeypatch):
    # Without explicit promotion TVM divides the integers as integers: a silently wrong
    # program, which the verification step must catch.
    monkeypatch.setattr(fx_passes, "make_promotion_explicit", lambda graph_module: None)
    x = torch.arange(1, 13, dtype=torch.int32).reshape(3, 4)
    with pytest.raises(ConversionError, match=r"output 0 has dtype torch.int32, the model's "
                                              r"has torch.float32"):
        _compile(IntDivision(), (x,), tmp_path)
    # With the check off, the same wrong program comes back (which is why it is on).
    wrong = _compile(IntDivision(), (x,), tmp_path, verify=False)
    assert wrong([x])[0].dtype == torch.int32


def test_verification_uses_example_inputs(tmp_path):
    class Gather(torch.nn.Module):
        def forward(self, table, index):
            return table[index]

    table, index = torch.randn(10, 4), torch.tensor([[9, 0, 3]])
    # Generated int inputs would be all ones; the user's exercise the real indices.
    compiled = _compile(Gather(), (table, index), tmp_path, example_inputs=[table, index])
    torch.testing.assert_close(compiled([table, index])[0], table[index])


class Block(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, q):
        return self.block(q) + 1


def test_conversion_errors_name_the_operator_and_place(tmp_path):
    q = torch.randn(1, 2, 2, 4, 8)  # 5-D attention: not converted
    with pytest.raises(ConversionError) as info:
        _compile(Nested().eval(), (q,), tmp_path)
    message = str(info.value)
    assert "scaled_dot_product_attention" in message and "block" in message, message
    assert "ranks 5, 5, 5" in message
    assert isinstance(info.value.__cause__, Exception)


class NewGelu(torch.nn.Module):
    """GPT-2's GELU: ``x ** 3`` inside."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0)))) \
            + x ** 2


def test_small_powers_are_products(tmp_path):
    from tvm.contrib.torch import frontend  # pylint: disable=import-outside-toplevel

    x = torch.randn(4, 64)
    ep = frontend.decompose(frontend.to_exported_program(NewGelu().eval(), [x]))
    mod, _ = frontend.to_relax(ep)
    assert "R.power" not in mod.script(show_meta=False)
    compiled = _compile(NewGelu().eval(), (x,), tmp_path)
    torch.testing.assert_close(compiled([x])[0], NewGelu()(x), rtol=1e-5, atol=1e-5)


class TanhGeluWrittenOut(torch.nn.Module):
    """GPT-2's activation as Hugging Face writes it (``gelu_new``), cubed two ways, after a
    linear layer; and a near miss (another coefficient) that must stay as written."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        c = (2.0 / 3.141592653589793) ** 0.5
        a = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * torch.pow(h, 3.0))))
        b = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * (h * h * h))))
        near_miss = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.05 * torch.pow(h, 3.0))))
        return a, b, near_miss


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "module"])
def test_tanh_gelu_written_out_becomes_one_gelu(traced, tmp_path):
    from tvm.contrib.torch import frontend  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = TanhGeluWrittenOut().eval()
    x = torch.randn(2, 5, 8)
    source = torch.jit.trace(model, x) if traced else model
    ep = frontend.decompose(frontend.to_exported_program(source, [x]))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.gelu.default) == 2
    assert targets.count(torch.ops.aten.tanh.default) == 1  # the near miss
    module = _compile(source, [x], tmp_path)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        if bad is not None:
            y[1, 2, 3] = bad
        with torch.no_grad():
            for actual, expected in zip(module([y]), model(y)):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5,
                                           equal_nan=True)


class SwishWrittenOut(torch.nn.Module):
    def forward(self, x, y):
        return x * torch.sigmoid(x), torch.sigmoid(y) * y, x * torch.sigmoid(y)


def test_sigmoid_products_become_silu_only_when_the_operands_match(tmp_path):
    from tvm.contrib.torch import frontend  # pylint: disable=import-outside-toplevel

    x, y = torch.randn(3, 7), torch.randn(3, 7)
    x[0, 0], y[1, 1] = float("nan"), float("-inf")
    ep = frontend.decompose(frontend.to_exported_program(SwishWrittenOut(), [x, y]))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.silu.default) == 2
    assert targets.count(torch.ops.aten.sigmoid.default) == 1  # x * sigmoid(y) stays
    _assert_same(_compile(SwishWrittenOut(), [x, y], tmp_path)([x, y]), SwishWrittenOut()(x, y))


class BiasedConvBatchNorm(torch.nn.Module):
    """Convolutions with a bias (``nn.Conv2d``'s default) before batch norm: with affine and
    non-affine batch norm, a non-default eps, and ReLU after one of them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8, eps=1e-3, affine=False)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(self.bn1.weight, 0.5, 1.5)
        torch.nn.init.uniform_(self.bn1.bias, -0.5, 0.5)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_batch_norm_after_a_biased_convolution_is_folded(tmp_path):
    """Folded into the convolution (one bias, the ReLU as its epilogue): no elementwise
    batch-norm arithmetic is left for TVM, and the result is the model's."""
    from tvm.contrib.torch import frontend, passes  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = BiasedConvBatchNorm().eval()
    x = torch.randn(1, 3, 12, 12)
    ep = frontend.decompose(frontend.to_exported_program(model, [x]))
    mod, params = frontend.to_relax(ep)
    text = passes.simplify(passes.bind_params(mod, params)).script(show_meta=False)
    assert "R.nn.batch_norm" not in text and "R.subtract" not in text
    assert "R.divide" not in text and "R.multiply" not in text
    assert text.count("R.add(") == 2  # one bias per convolution
    module = _compile(model, [x], tmp_path)
    for bad in (None, float("nan"), float("inf")):
        y = x.clone()
        if bad is not None:
            y[0, 1, 5, 5] = bad
        with torch.no_grad():
            torch.testing.assert_close(module([y])[0], model(y), rtol=1e-5, atol=1e-5,
                                       equal_nan=True)


class SharedResults(torch.nn.Module):
    """Results that two ops read: ``x + conv(x)`` with ``x`` a convolution's result
    (torchvision's MobileNetV2 blocks), a convolution read by its ReLU and by an add, and
    ``h + linear(h)`` with ``h`` a linear layer's result."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(8, 8, 1)
        self.b = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.c = torch.nn.Conv2d(16, 8, 1)
        self.l1 = torch.nn.Linear(8, 8)
        self.l2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = self.a(x)
        y = x + self.c(F.relu6(self.b(x)))
        z = self.a(y)
        h = self.l1(y.mean((2, 3)))
        return h + self.l2(h), F.relu(z) + z


def test_results_read_twice_are_computed_once(tmp_path):
    """Each convolution and linear layer runs once (a fused epilogue or residual add never
    repeats the kernel whose result another op reads), and the results are PyTorch's."""
    torch.manual_seed(0)
    model = SharedResults().eval()
    x = torch.randn(1, 8, 6, 6)
    module = _compile(model, [x], tmp_path)
    program = (tmp_path / "export" / "bucket0.relax").read_text()
    main = program[program.index("def main("):]
    # CPU convolutions write into planned memory (the destination-passing "_out" variants).
    convs = sum(main.count(f'"tvm_torch.{name}_out"')
                for name in ("conv2d_nhwc", "conv2d_nchw_input", "conv2d_add_nhwc"))
    linears = main.count('"tvm_torch.linear"') + main.count('"tvm_torch.linear_add"')
    assert (convs, linears) == (4, 2), main
    for bad in (None, float("nan"), float("inf")):
        y = x.clone()
        if bad is not None:
            y[0, 1, 2, 2] = bad
        with torch.no_grad():
            _assert_same(module([y]), model(y))
