"""Relax pass: NaN propagates through max/min-based operators as it does in PyTorch.

TVM lowers ``relu``, ``clip``, ``maximum``/``minimum``, max/min reductions and max pooling to
``max``/``min`` (or compare-and-select) expressions that return the other operand when one is
NaN: a NaN in a model's input comes out as 0 or a finite number, where PyTorch returns NaN.
This pass wraps each such operator on a floating tensor in a select on ``isnan`` of its
input, which fusion folds into the operator's own kernel (one more compare per element).
It runs after the vendor-kernel offload, so operators ATen now computes (and propagates NaN
through) are left alone. Not covered yet: ``topk`` (which ``x.max(dim)`` imports as).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _floating(expr: relax.Expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) in _FLOATS


def _nan(dtype) -> relax.Expr:
    return relax.const(float("nan"), str(dtype))


def _isnan(x: relax.Expr) -> relax.Expr:
    # TIR's isnan takes no bfloat16; widening to float32 keeps every NaN.
    return relax.op.isnan(relax.op.astype(x, "float32") if str(x.ty.dtype) == "bfloat16" else x)


@mutator
class _NanPropagation(PyExprMutator):
    """Rewrites every max/min-based operator call of a function (see the module docstring)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not _floating(call):
            return call
        name = call.op.name
        dtype = call.ty.dtype
        if name in ("relax.nn.relu", "relax.clip"):
            x = call.args[0]
            return relax.op.where(_isnan(x), x, call)
        if name in ("relax.maximum", "relax.minimum"):
            a, b = call.args
            either = relax.op.logical_or(_isnan(a), _isnan(b))
            return relax.op.where(either, relax.op.add(a, b), call)
        if name in ("relax.max", "relax.min"):
            flags = relax.op.astype(_isnan(call.args[0]), dtype)
            seen = relax.op.max(flags, call.attrs.axis, call.attrs.keepdims)
            return relax.op.where(relax.op.greater(seen, relax.const(0, str(dtype))),
                                  _nan(dtype), call)
        if name == "relax.nn.max_pool2d":
            flags = relax.op.astype(_isnan(call.args[0]), dtype)
            seen = relax.Call(call.op, [flags], call.attrs)
            return relax.op.where(relax.op.greater(seen, relax.const(0, str(dtype))),
                                  _nan(dtype), call)
        return call


def propagate_nan(mod: tvm.IRModule) -> tvm.IRModule:
    """:class:`_NanPropagation` over ``main``."""
    func = _NanPropagation(mod).visit_expr(mod["main"])
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    mod["main"] = func
    return mod


__all__ = ["propagate_nan"]
