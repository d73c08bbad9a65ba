"""Relax pass: NaN propagates through max/min-based operators as it does in PyTorch.

TVM lowers ``relu``, ``clip``, ``maximum``/``minimum``, max/min reductions and max pooling to
``max``/``min`` (or compare-and-select) expressions that return the other operand when one is
NaN: a NaN in a model's input comes out as 0 or a finite number, where PyTorch returns NaN.
This pass replaces each such operator on a floating tensor by one that selects on ``isnan``
of its input (one more compare per element, in the operator's own kernel after fusion). It
runs after the vendor-kernel offload, so operators ATen now computes (and propagates NaN
through) are left alone. Not covered yet: ``topk`` (which ``x.max(dim)`` imports as).

The elementwise ones (relu, clip, maximum, minimum) become one TIR function each that reads
every input element once into a ``Let``: written as ``where(isnan(x), x, op(x))`` in Relax,
each would read ``x`` three times, and once fusion inlines a chain of them into one kernel
(hardswish, relu6 and clamps after each other, split into maximum and minimum for float16)
the expression grows as 3^depth: a float16 model with such a chain took minutes to build
for CUDA, in TVM's simplifier.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Sequence

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _floating(expr: relax.Expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) in _FLOATS


def _nan(dtype) -> relax.Expr:
    return relax.const(float("nan"), str(dtype))


def _is_one(dim) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and dim.value == 1


def _broadcast_index(tensor: te.Tensor, out_shape: Sequence, index: Sequence) -> List:
    """``tensor``'s element for output element ``index`` under numpy broadcasting."""
    offset = len(out_shape) - len(tensor.shape)
    return [0 if _is_one(dim) and not _is_one(out_shape[k + offset]) else index[k + offset]
            for k, dim in enumerate(tensor.shape)]


def _wide(dtype: str) -> str:
    """The dtype the TIR functions below compute in: bfloat16 as float32 (TIR's isnan takes no
    bfloat16); max, min and select of bfloat16 values in float32 round back exactly."""
    return "float32" if dtype == "bfloat16" else dtype


def _let(tensor: te.Tensor, index: Sequence, body: Callable[[tvm.ir.Expr], tvm.ir.Expr]):
    """``body(v)`` with ``v`` bound to ``tensor[index]``: read once however often it is used."""
    wide = _wide(tensor.dtype)
    if wide != tensor.dtype:
        # No Let for bfloat16: TVM's bfloat16 legalization miscompiles a load inside one (it
        # converts the raw bits as an integer). Chains of these on bfloat16 grow as 3**depth.
        return body(tirx.Cast(wide, tensor(*index)))
    var = tirx.Var(tensor.op.name, wide)
    return tirx.Let(var, tensor(*index), body(var))


def _narrow(value: tvm.ir.Expr, dtype: str) -> tvm.ir.Expr:
    return value if _wide(dtype) == dtype else tirx.Cast(dtype, value)


def _te_clip(x: te.Tensor, low, high) -> te.Tensor:
    """relu (``low`` 0, ``high`` None) or clip, NaN kept."""
    wide = _wide(x.dtype)

    def bound(value):
        return tirx.Cast(wide, tirx.const(value, "float64")
                         if isinstance(value, (int, float)) else value)

    def clipped(v):
        value = tirx.max(v, bound(low))
        value = value if high is None else tirx.min(value, bound(high))
        return tirx.Select(tirx.isnan(v), v, value)

    return te.compute(x.shape, lambda *index: _narrow(_let(x, index, clipped), x.dtype),
                      name="nan_clip")


def _te_max_min(a: te.Tensor, b: te.Tensor, out_shape, combine) -> te.Tensor:
    """maximum/minimum with broadcasting; NaN if either operand is (their sum is then NaN)."""
    def element(*index):
        return _narrow(_let(a, _broadcast_index(a, out_shape, index), lambda va: _let(
            b, _broadcast_index(b, out_shape, index), lambda vb: tirx.Select(
                tirx.Or(tirx.isnan(va), tirx.isnan(vb)), va + vb, combine(va, vb)))), a.dtype)
    return te.compute(out_shape, element, name="nan_max_min")


@mutator
class _NanPropagation(PyExprMutator):
    """Rewrites every max/min-based operator call of a function (see the module docstring)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not _floating(call):
            return call
        name = call.op.name
        dtype = call.ty.dtype
        if name == "relax.nn.relu":
            return self.builder_.call_te(functools.partial(_te_clip, low=0, high=None),
                                         call.args[0], primfunc_name_hint="relu_nan")
        if name == "relax.clip":
            low, high = (arg.value for arg in call.args[1:])
            return self.builder_.call_te(functools.partial(_te_clip, low=low, high=high),
                                         call.args[0], primfunc_name_hint="clip_nan")
        if name in ("relax.maximum", "relax.minimum"):
            combine = tirx.max if name == "relax.maximum" else tirx.min
            compute = functools.partial(_te_max_min, out_shape=list(call.ty.shape.values),
                                        combine=combine)
            return self.builder_.call_te(compute, call.args[0], call.args[1],
                                         primfunc_name_hint=name[len("relax."):] + "_nan")
        if name in ("relax.max", "relax.min"):
            flags = relax.op.astype(relax.op.isnan(call.args[0]), dtype)
            seen = relax.op.max(flags, call.attrs.axis, call.attrs.keepdims)
            return relax.op.where(relax.op.greater(seen, relax.const(0, str(dtype))),
                                  _nan(dtype), call)
        if name == "relax.nn.max_pool2d":
            flags = relax.op.astype(relax.op.isnan(call.args[0]), dtype)
            seen = relax.Call(call.op, [flags], call.attrs)
            return relax.op.where(relax.op.greater(seen, relax.const(0, str(dtype))),
                                  _nan(dtype), call)
        return call


def propagate_nan(mod: tvm.IRModule) -> tvm.IRModule:
    """:class:`_NanPropagation` over ``main``; the TIR functions it adds join the module."""
    mutator_ = _NanPropagation(mod)
    func = mutator_.visit_expr(mod["main"])
    mod = mutator_.builder_.get()
    mod["main"] = func
    return mod


__all__ = ["propagate_nan"]
