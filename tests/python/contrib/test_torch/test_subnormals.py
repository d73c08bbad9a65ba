"""Subnormal attention probabilities (``tvm_torch.softmax_probabilities`` in src/contrib/torch/
vendor_kernels.cc): where only a matrix product reads a softmax's result (attention's
probabilities times the values), the CPU kernel sets its subnormal entries to 0, since a GEMM
runs 10-50x slower on them and they change the product by less than its rounding. Swin's
window masks of -100 give exp(-100) ~ 4e-44 in every shifted block. The compiled module must
still compute what PyTorch computes, and a softmax that anything else reads keeps them."""
from __future__ import annotations

import torch
import tvm

from tvm.contrib.torch import compile

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def _subnormal(t: torch.Tensor) -> torch.Tensor:
    return (t != 0) & (t.abs() < TINY)


class _ShiftedWindowAttention(torch.nn.Module):
    """Swin's window attention as timm writes it without fused attention: scaled q @ k^T, a
    relative-position bias and a 0/-100 shift mask added, softmax, times v."""

    def __init__(self, return_probabilities: bool):
        super().__init__()
        self.return_probabilities = return_probabilities
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.bias = torch.nn.Parameter(torch.randn(1, 2, 9, 9) * 0.02)
        mask = torch.zeros(4, 9, 9)
        mask[1:, :5, 5:] = mask[1:, 5:, :5] = -100.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q * 8 ** -0.5) @ k.transpose(-2, -1) + self.bias + self.mask.unsqueeze(1)
        probs = scores.softmax(-1)
        out = self.proj((probs @ v).transpose(1, 2).reshape(windows, tokens, channels))
        return (out, probs) if self.return_probabilities else out


def _compiled(model, x, tmp_path):
    return compile(model, {"input_infos": [("x", tuple(x.shape))],
                           "export_dir": str(tmp_path / "export")})


def test_masked_window_attention_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model, x = _ShiftedWindowAttention(False).eval(), torch.randn(4, 9, 16)
    with torch.no_grad():
        expected = model(x)
        assert _subnormal(model.mask.unsqueeze(1).exp()).any()  # the case this is about
        (actual,) = _compiled(model, x, tmp_path)([x])
    torch.testing.assert_close(actual, expected)
    program = (tmp_path / "export" / "bucket0.relax").read_text()
    assert "tvm_torch.softmax_probabilities" in program, program


def test_probabilities_the_model_returns_keep_their_subnormals(tmp_path):
    torch.manual_seed(0)
    model, x = _ShiftedWindowAttention(True).eval(), torch.randn(4, 9, 16)
    with torch.no_grad():
        out, probs = model(x)
        actual_out, actual_probs = _compiled(model, x, tmp_path)([x])
    torch.testing.assert_close(actual_out, out)
    program = (tmp_path / "export" / "bucket0.relax").read_text()
    assert "tvm_torch.softmax_probabilities" not in program, program
    torch.testing.assert_close(actual_probs, probs, rtol=1e-5, atol=0)
    assert _subnormal(probs).sum() > 0
    assert torch.equal(_subnormal(actual_probs), _subnormal(probs))


def _softmax(x: torch.Tensor, flush: bool) -> torch.Tensor:
    fn = tvm.get_global_func("tvm_torch.softmax_probabilities" if flush else "tvm_torch.softmax")
    return torch.from_dlpack(fn(tvm.runtime.from_dlpack(x), -1))


def test_flushed_softmax_is_pytorchs_with_its_subnormals_set_to_zero():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 40).to(dtype)
        x[:, 20:] -= 90.0  # exp(-90) ~ 8e-40: subnormal in float32 and bfloat16
        x[2, 3], x[4, :] = float("nan"), -float("inf")  # a NaN row; an all -inf row (NaN)
        expected = torch.softmax(x, -1)
        assert _subnormal(expected.float()).any()
        torch.testing.assert_close(_softmax(x, False), expected, rtol=0, atol=0,
                                   equal_nan=True)
        flushed = torch.where(_subnormal(expected.float()), 0.0, expected.float()).to(dtype)
        torch.testing.assert_close(_softmax(x, True), flushed, rtol=0, atol=0, equal_nan=True)


def test_the_callers_floating_point_mode_is_restored():
    _softmax(torch.randn(4, 40) - 100.0, True)
    tiny = torch.tensor([1e-30]) * torch.tensor([1e-10])
    assert _subnormal(tiny).all(), tiny  # still gradual underflow on this thread
