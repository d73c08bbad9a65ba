"""Relax passes between the frontend and the build.

``prepare_for_build`` is the pipeline: bind shapes and params, fold batch norm into
convolutions, simplify, convert to float16 when asked, and finally lift the (folded,
converted) weights back out as params so that the exported library holds code and the
params file holds weights.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from .nan_semantics import propagate_nan

logger = logging.getLogger(__name__)

#: Constants with at least this many elements become params; smaller ones stay in the code.
LIFT_MIN_ELEMENTS = 16

#: Relax ops that only change how a tensor's elements are indexed: torch views when applied to
#: a contiguous tensor (a reshape when ``view`` accepts it), exact in any dtype.
VIEW_OPS = ("relax.permute_dims", "relax.reshape", "relax.squeeze", "relax.strided_slice")


def bind_input_shapes(mod: tvm.IRModule, shapes: Sequence[Sequence[object]]) -> tvm.IRModule:
    """Bind the symbolic dims of ``main``'s inputs to the given shapes.

    Parameters
    ----------
    mod : tvm.IRModule
        The imported module.
    shapes : sequence of sequence of int or str
        Per input, each dim is an int (static) or a str (a symbolic dim of that name).
    """
    func = mod["main"]
    binding: Dict[tirx.Var, object] = {}
    named: Dict[str, tirx.Var] = {}
    for param, shape in zip(func.params, shapes):
        ty = param.ty
        dims = list(ty.shape.values) if ty.shape is not None else []
        if len(dims) != len(shape):
            raise ValueError(f"input '{param.name}' has rank {len(dims)} in the model but "
                             f"{len(shape)} in input_infos ({list(shape)})")
        for dim, want in zip(dims, shape):
            if isinstance(want, str):
                named.setdefault(want, tirx.Var(want, "int64"))
                target = named[want]
            else:
                target = tirx.IntImm("int64", int(want))
            if isinstance(dim, tirx.Var):
                if dim in binding and not _same(binding[dim], target):
                    raise ValueError(
                        f"input_infos gives dim '{dim.name}' of the model two values: "
                        f"{binding[dim]} and {target}")
                binding[dim] = target
            elif isinstance(dim, tirx.IntImm) and not isinstance(want, str):
                if int(dim) != int(want):
                    raise ValueError(f"input '{param.name}' has a fixed dim {int(dim)} in "
                                     f"the model but input_infos asks for {want}")
    if binding:
        mod = relax.transform.BindSymbolicVars(binding, "main")(mod)
    return mod


def _same(a, b) -> bool:
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return int(a) == int(b)
    return a.same_as(b)


def bind_params(mod: tvm.IRModule, params: Sequence[tvm.runtime.Tensor]) -> tvm.IRModule:
    """Make the params of ``main`` (after its ``num_input`` inputs) constants."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    names = {p.name: value for p, value in zip(func.params[num_input:], params)}
    mod = relax.transform.BindParams("main", names)(mod)
    return mod


@tvm.transform.module_pass(opt_level=0, name="TvmTorchBiasPastBatchNorm")
def _bias_past_batch_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``batch_norm(conv2d(x, w) + b)`` -> ``batch_norm(conv2d(x, w)) + b * gamma / sqrt(var +
    eps)``, so that FoldBatchnormToConv2D (which takes a batch norm right on a convolution)
    folds the batch norms of convolutions that have a bias too (``nn.Conv2d``'s default)."""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    bias = is_const()
    gamma, var = is_const(), is_const()
    norm = is_op("relax.nn.batch_norm")(is_op("relax.add")(conv, bias), gamma, is_const(),
                                         is_const(), var)
    root = is_tuple_get_item(norm, 0)

    def rewrite(call, matched):
        bn = matched[norm]
        attrs = bn.attrs
        channels = const_value(matched[var]).size
        b = const_value(matched[bias])
        # The bias must be per channel of the (NCHW) convolution: [1, C, 1, 1] or [C, 1, 1].
        per_channel = tuple(b.shape) in ((1, channels, 1, 1), (channels, 1, 1))
        if int(attrs.axis) != 1 or attrs.training or not per_channel:
            return call
        scale = 1.0 / np.sqrt(const_value(matched[var]).astype("float64") + float(attrs.epsilon))
        if attrs.scale:
            scale = scale * const_value(matched[gamma]).astype("float64")
        folded = relax.op.nn.batch_norm(matched[conv], *bn.args[1:], axis=1,
                                        epsilon=float(attrs.epsilon), center=bool(attrs.center),
                                        scale=bool(attrs.scale),
                                        momentum=float(attrs.momentum), training=False)
        shift = (b.reshape(-1) * scale).astype(b.dtype).reshape(b.shape)
        return relax.op.add(relax.TupleGetItem(folded, 0), relax.const(shift))

    return _rewrite_main(mod, root, rewrite)


@tvm.transform.module_pass(opt_level=0, name="TvmTorchMergeConstantAdds")
def _merge_constant_adds(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``(x + c1) + c2`` -> ``x + (c1 + c2)`` for constants of one shape (a convolution's bias
    and its folded batch norm's shift: one bias for the vendor kernel)."""
    source, first, second = wildcard(), is_const(), is_const()
    root = is_op("relax.add")(is_op("relax.add")(source, first), second)

    def rewrite(call, matched):
        a, b = const_value(matched[first]), const_value(matched[second])
        if a.shape != b.shape or a.dtype != b.dtype:
            return call
        return relax.op.add(matched[source], relax.const(a + b))

    return _rewrite_main(mod, root, rewrite)


def _rewrite_main(mod: tvm.IRModule, pattern, rewrite) -> tvm.IRModule:
    """``mod`` with ``rewrite_call(pattern, rewrite)`` applied to its ``main``."""
    func = rewrite_call(pattern, rewrite, mod["main"])
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    mod["main"] = func
    return mod


def const_value(expr: relax.Expr) -> np.ndarray:
    """The value of a ``relax.Constant``."""
    return expr.value.numpy()


def prim_number(expr: relax.Expr) -> Optional[float]:
    """The number a ``relax.PrimValue`` holds (``clip``'s bounds), or None if symbolic."""
    value = getattr(expr, "value", None)  # an IntImm/FloatImm (or a plain number)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


def simplify(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold batch norm into convolutions (with a bias too) and fold constants."""
    seq = tvm.transform.Sequential([
        relax.transform.FoldConstant(),  # a reshaped bias becomes a constant
        _bias_past_batch_norm,
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        _merge_constant_adds,
        relax.transform.EliminateCommonSubexpr(),
        relax.transform.DeadCodeElimination(["main"]),
    ])
    return seq(mod)


def to_float16(mod: tvm.IRModule) -> tvm.IRModule:
    """Compute in float16: weights are folded to float16 and float32 inputs/outputs become float16.

    ``ToMixedPrecision`` keeps float32 accumulation where it matters (softmax, norms); the
    program's floating inputs and outputs are float16 so that callers pass and get half tensors.
    """
    mod = relax.transform.ToMixedPrecision(out_dtype="float16")(_clips_as_max_min(mod))
    mod = _cast_float_io(mod, "float16")
    return _max_min_as_clips(relax.transform.FoldConstant()(mod))


def _clips_as_max_min(mod: tvm.IRModule) -> tvm.IRModule:
    """``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` with tensor constants (an infinite
    bound dropped), for ToMixedPrecision: it expects every argument of an operator to be a
    tensor, and clip's bounds (relu6, hardswish, clamp) are PrimValues."""
    x, low, high = wildcard(), wildcard(), wildcard()
    root = is_op("relax.clip")(x, low, high)

    def rewrite(call, matched):
        bounds = [prim_number(matched[low]), prim_number(matched[high])]
        if None in bounds:
            return call  # a symbolic bound
        value, dtype = matched[x], str(call.ty.dtype)
        for number, combine in zip(bounds, (relax.op.maximum, relax.op.minimum)):
            if not np.isinf(number):
                value = combine(value, relax.const(np.array(number, dtype)))
        return value

    return _rewrite_main(mod, root, rewrite)


def _max_min_as_clips(mod: tvm.IRModule) -> tvm.IRModule:
    """``minimum(maximum(x, lo), hi)`` with scalar constant bounds -> ``clip(x, lo, hi)``: undoes
    :func:`_clips_as_max_min` after ToMixedPrecision. Each of the three is made NaN-propagating
    (:mod:`.nan_semantics`) by a select that reads its input three times, so a clip split in two
    doubles the depth of a fused chain of them, whose inlined expression grows as 3^depth (a
    float16 model's chain of clamps took minutes to build for CUDA)."""
    def bound():  # ToMixedPrecision leaves a float32 bound cast to float16 unfolded
        const = is_const()
        return const | is_op("relax.astype")(const)

    x, low, high = wildcard(), bound(), bound()
    root = is_op("relax.minimum")(is_op("relax.maximum")(x, low), high)

    def scalar(expr: relax.Expr) -> Optional[float]:
        if isinstance(expr, relax.Call):
            value = const_value(expr.args[0]).astype(str(expr.ty.dtype))
        else:
            value = const_value(expr)
        return float(value) if value.ndim == 0 else None  # clip takes scalar bounds only

    def rewrite(call, matched):
        bounds = [scalar(matched[low]), scalar(matched[high])]
        if None in bounds or any(np.isnan(b) for b in bounds) or bounds[0] > bounds[1]:
            return call  # (with low > high the two orders of max and min differ)
        return relax.op.clip(matched[x], tirx.FloatImm("float64", bounds[0]),
                             tirx.FloatImm("float64", bounds[1]))

    return _rewrite_main(mod, root, rewrite)


def _cast_float_io(mod: tvm.IRModule, dtype: str) -> tvm.IRModule:
    """Rewrite ``main`` so that its float32 inputs and outputs are ``dtype``.

    The old ``main`` becomes a private function called by a new ``main`` that casts around
    it; inlining it leaves one function whose casts ``FoldConstant``/fusion handle.
    """
    func = mod["main"]
    others = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    builder = relax.BlockBuilder(tvm.IRModule(others, attrs=mod.attrs))
    inner_gv = builder.add_func(func.without_attr("global_symbol"), _PRIVATE_MAIN)
    params = []
    for param in func.params:
        ty = param.ty
        if isinstance(ty, relax.TensorType) and ty.dtype == "float32":
            ty = relax.TensorType(ty.shape, dtype)
        params.append(relax.Var(param.name, ty))
    attrs = {k: v for k, v in func.attrs.items() if k != "global_symbol"}
    with builder.function("main", params, attrs=attrs, pure=True):
        with builder.dataflow():
            args = [builder.emit(relax.op.astype(new, "float32"))
                    if new.ty.dtype != old.ty.dtype else new
                    for old, new in zip(func.params, params)]
            inner = builder.emit(relax.Call(inner_gv, args))
            out = builder.emit_output(_cast_tree(builder, inner, dtype))
        builder.emit_func_output(out)
    new_mod = relax.transform.InlinePrivateFunctions()(builder.get())
    return relax.transform.DeadCodeElimination(["main"])(new_mod)


_PRIVATE_MAIN = "_tvm_torch_inner_main"


def _cast_tree(builder: relax.BlockBuilder, value: relax.Expr, dtype: str) -> relax.Expr:
    ty = value.ty
    if isinstance(ty, relax.TupleType):
        items = [_cast_tree(builder, builder.emit(relax.TupleGetItem(value, i)), dtype)
                 for i in range(len(ty.fields))]
        return builder.emit(relax.Tuple(items))
    if isinstance(ty, relax.TensorType) and ty.dtype == "float32":
        return builder.emit(relax.op.astype(value, dtype))
    return value


@mutator
class _ConstantLifter(PyExprMutator):
    """Replace large constants by new function params."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.lifted: List[Tuple[relax.Var, tvm.runtime.Tensor]] = []
        self._seen: Dict[tvm.ir.GenericConst, relax.Var] = {}

    def visit_generic_const_(self, op: tvm.ir.GenericConst) -> relax.Expr:  # pylint: disable=arguments-renamed
        data = op.value
        if not isinstance(op.ty, relax.TensorType) or int(np.prod(data.shape)) < LIFT_MIN_ELEMENTS:
            return op
        if op not in self._seen:
            var = relax.Var(f"p{len(self.lifted)}", op.ty)
            self._seen[op] = var
            self.lifted.append((var, data))
        return self._seen[op]


def lift_params(mod: tvm.IRModule) -> Tuple[tvm.IRModule, Dict[str, tvm.runtime.Tensor],
                                            List[str]]:
    """Turn large constants of ``main`` into trailing params.

    Returns
    -------
    mod : tvm.IRModule
        ``main(*inputs, *params)``.
    params : dict of str to tvm.runtime.Tensor
        Param values by name.
    names : list of str
        Param names in argument order.
    """
    func = mod["main"]
    lifter = _ConstantLifter(mod)
    body = lifter.visit_expr(func.body)
    names = [var.name for var, _ in lifter.lifted]
    new_params = list(func.params) + [var for var, _ in lifter.lifted]
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs["num_input"] = len(func.params)
    new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure).with_attrs(attrs)
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    mod["main"] = new_func
    return mod, {var.name: value for var, value in lifter.lifted}, names


#: Name of the load-time function made by ``LiftTransformParams``.
TRANSFORM_PARAMS_FUNC = "main_transform_params"


def prepare_for_build(
    mod: tvm.IRModule,
    params: Sequence[tvm.runtime.Tensor],
    shapes: Sequence[Sequence[object]],
    dtype: str = "float32",
    extra_passes: Optional[Sequence[tvm.transform.Pass]] = None,
) -> Tuple[tvm.IRModule, Dict[str, tvm.runtime.Tensor], List[str], Optional[str]]:
    """The Relax pipeline from an imported module to one ready to build.

    Parameters
    ----------
    mod : tvm.IRModule
        From :func:`tvm.contrib.torch.frontend.to_relax`.
    params : sequence of tvm.runtime.Tensor
        Its param values.
    shapes : sequence of sequence of int or str
        Input shapes to bind (str dims stay symbolic).
    dtype : str
        ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    extra_passes : sequence of tvm.transform.Pass, optional
        Target-specific rewrites run after simplification (e.g. vendor-kernel offload).

    Returns
    -------
    mod : tvm.IRModule
        ``main(*inputs, *prepared_params)`` and the function that prepares the params once
        at the first call (weight prepacking, transposes).
    params : dict of str to tvm.runtime.Tensor
        Param values by name.
    names : list of str
        Param names in order.
    transform_params : str or None
        The name of the load-time function, if any.
    """
    mod = bind_input_shapes(mod, shapes)
    mod = bind_params(mod, params)
    mod = simplify(mod)
    if dtype == "float16":
        mod = to_float16(mod)
    elif dtype == "bfloat16":
        # ToMixedPrecision lowers to float16 only: bfloat16 programs compute in float32
        # between bfloat16 inputs and outputs; the vendor offload runs their convolutions,
        # linear layers and attention in bfloat16 where the CPU has bfloat16 instructions.
        mod = relax.transform.FoldConstant()(_cast_float_io(mod, "bfloat16"))
    for p in extra_passes or []:
        mod = p(mod)
    mod = propagate_nan(mod)
    mod, values, names = lift_params(mod)
    if names:
        # Everything that depends on params alone (weight prepacking, transposes and splits
        # of weights) runs once, at the first call, instead of on every call.
        mod = relax.transform.LiftTransformParams()(mod)
        return mod, values, names, TRANSFORM_PARAMS_FUNC
    return mod, values, names, None
