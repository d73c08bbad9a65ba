"""bfloat16 activations between the vendor kernels of a bfloat16 CPU program.

A bfloat16 program computes in float32 (its TVM kernels) between bfloat16 inputs and outputs,
and :mod:`.vendor_kernels` runs its convolutions and linear layers on oneDNN's bfloat16
kernels. Left as it is, each of those kernels converts its float32 input to bfloat16 and its
bfloat16 result back to float32: two passes over every activation, and a float32 tensor
written and read again between two convolutions.

This pass (after the offload) lets them take and return bfloat16 tensors instead:

* a convolution's or linear layer's result is bfloat16 (as under ``torch.autocast``); its
  float32 value is an ``astype`` that the TVM kernels reading it fuse (they read bfloat16);
* a kernel's input is converted by an ``astype`` that fuses into the TVM kernel producing it,
  or is the bfloat16 result of the vendor kernel before it, read as it is;
* a residual add (``conv2d_add_nhwc``, ``linear_add``) is bfloat16 only when both of its
  sides are, as torch.autocast's type promotion makes it: a float32 residual stream (the
  transformers' one, after float32 layer norms) stays float32;
* ATen's mean, pooling and transcendental functions (``tvm_torch.mean``,
  ``tvm_torch.max_pool2d_nhwc``, ``tvm_torch.avg_pool2d_nhwc``, ``tvm_torch.unary``) of a
  bfloat16 result read it and return bfloat16, as those ATen ops do for bfloat16 tensors;
* attention whose q, k and v are bfloat16 results computes in bfloat16, as
  ``scaled_dot_product_attention`` does under torch.autocast;
* reshapes, transposes and slices of a bfloat16 result are taken on the bfloat16 tensor.

Layer norm, softmax and the remaining matrix products keep float32.
"""
from __future__ import annotations

from typing import Dict, Optional

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .passes import VIEW_OPS

#: Vendor kernels computing in bfloat16 -> positions (in the packed call's arguments, after
#: the function name) of their activations: the input, then a residual added to the result.
_COMPUTE_IN_BF16 = {
    "tvm_torch.conv2d_nhwc": (0,),
    "tvm_torch.conv2d_nchw_input": (0,),
    "tvm_torch.conv2d_add_nhwc": (0, 1),
    "tvm_torch.linear": (0,),
    "tvm_torch.linear_add": (0, 1),
}

#: Where the convolutions take their bias, converted to bfloat16 once (at load, with the
#: weights) instead of at every call.
_CONV_BIAS = {"tvm_torch.conv2d_nhwc": 2, "tvm_torch.conv2d_nchw_input": 2,
              "tvm_torch.conv2d_add_nhwc": 3}

#: ATen kernels that return their input's dtype; taken in bfloat16 when their input already is.
_FOLLOW_INPUT = ("tvm_torch.mean", "tvm_torch.max_pool2d_nhwc", "tvm_torch.avg_pool2d_nhwc",
                 "tvm_torch.unary")

#: ATen's scaled_dot_product_attention (bfloat16 under torch.autocast; a float mask is cast to
#: bfloat16 as autocast casts it): in bfloat16 when q, k and v (its first three arguments) are.
_ATTENTION = ("tvm_torch.attention", "tvm_torch.attention_masked", "tvm_torch.attention_views",
              "tvm_torch.attention_views_masked")

#: Operators that only move or select elements: on a bfloat16 value they give, exactly, the
#: bfloat16 value of their float32 result (its float32 twin is dropped when nothing else
#: reads it).
_LAYOUT_OPS = (*VIEW_OPS, "relax.expand_dims")

_BF16 = "bfloat16"
_F32 = "float32"


def _packed_name(call: relax.Expr) -> Optional[str]:
    if isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_pure_packed"):
        return str(call.args[0].global_symbol)
    return None


def _dtype(expr: relax.Expr) -> Optional[str]:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _as_dtype(ty: relax.TensorType, dtype: str) -> relax.TensorType:
    return relax.TensorType(ty.shape, dtype, ty.vdevice)


@mutator
class _Bf16Flow(PyExprMutator):  # pylint: disable=abstract-method
    """See :func:`bfloat16_activations`."""

    def __init__(self):
        super().__init__()
        # A float32 variable -> a bfloat16 variable of which it is the exact float32 copy.
        self.twin: Dict[relax.Var, relax.Var] = {}

    def visit_var_binding_(self, binding):  # pylint: disable=arguments-renamed
        value = self.visit_expr(binding.value)
        name = _packed_name(value)
        if name in _COMPUTE_IN_BF16 and _dtype(value) == _F32:
            value = self._compute_in_bf16(binding.var, value, _COMPUTE_IN_BF16[name])
        elif name in _FOLLOW_INPUT and _dtype(value) == _F32 and value.args[1] in self.twin:
            value = self._returning_bf16(binding.var, value, {1: self.twin[value.args[1]]})
        elif name in _ATTENTION and _dtype(value) == _F32 and \
                all(a in self.twin for a in value.args[1:4]):
            value = self._returning_bf16(binding.var, value,
                                         {i: self.twin[value.args[i]] for i in (1, 2, 3)})
        elif (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
              and value.op.name in _LAYOUT_OPS and _dtype(value) == _F32
              and value.args[0] in self.twin):
            self.twin[binding.var] = self.builder_.emit(
                relax.Call(value.op, [self.twin[value.args[0]], *value.args[1:]], value.attrs,
                           value.ty_args))
        elif isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.astype"):
            source = value.args[0]
            if _dtype(value) == _BF16 and source in self.twin:
                value = self.twin[source]  # bfloat16 -> float32 -> bfloat16 is exact
            elif _dtype(value) == _F32 and _dtype(source) == _BF16:
                self.twin[binding.var] = source  # e.g. a bfloat16 input of the program
        self.builder_.emit_normalized(
            relax.VarBinding(binding.var, self.builder_.normalize(value)))

    def _compute_in_bf16(self, var: relax.Var, call: relax.Call, positions) -> relax.Expr:
        if any(_dtype(call.args[1 + p]) != _F32 for p in positions):
            return call
        args = {}
        bias = _CONV_BIAS.get(_packed_name(call))
        if bias is not None and _dtype(call.args[1 + bias]) == _F32:
            args[1 + bias] = self.builder_.emit(relax.op.astype(call.args[1 + bias], _BF16))
        for position in positions:
            arg = call.args[1 + position]
            if arg in self.twin:
                args[1 + position] = self.twin[arg]
            elif position == 0:
                # The kernel converts its input anyway: in TVM, the cast fuses into the
                # kernel that produces it.
                args[1 + position] = self.builder_.emit(relax.op.astype(arg, _BF16))
        if sum(1 + p in args for p in positions) < len(positions):
            # A float32 residual: the sum, and the result, are float32.
            return relax.Call(call.op, [a if i not in args else args[i]
                                        for i, a in enumerate(call.args)],
                              call.attrs, call.ty_args)
        return self._returning_bf16(var, call, args)

    def _returning_bf16(self, var: relax.Var, call: relax.Call, args) -> relax.Expr:
        """``call`` on ``args`` returning bfloat16, bound to a new variable; ``var`` becomes
        its float32 value (its twin)."""
        new_args = [args.get(i, a) for i, a in enumerate(call.args)]
        result = self.builder_.emit(
            relax.Call(call.op, new_args, call.attrs, [_as_dtype(call.ty, _BF16)]))
        self.twin[var] = result
        return relax.op.astype(result, _F32)


def bfloat16_activations(func: relax.Function) -> relax.Function:
    """Vendor kernels of a bfloat16 CPU program take and return bfloat16 tensors where the
    value is bfloat16 already, rounding where torch.autocast rounds (see the module
    docstring)."""
    return _Bf16Flow().visit_expr(func)


__all__ = ["bfloat16_activations"]
