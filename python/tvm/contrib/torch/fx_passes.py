"""Rewrites of a decomposed ``ExportedProgram`` that make real models import exactly into Relax.

TVM's importer takes an FX graph node by node and trusts that each node's arguments already
have the dtypes the operator computes in. PyTorch's graphs do not promise that: ``uint8 + 0.5``
is one ``aten.add`` whose result is float32, a traced ``position_ids[:, :x.size(1)]`` leaves
a chain of scalar tensors, ``_local_scalar_dense`` and runtime assertions on sizes. These
passes run between :func:`tvm.contrib.torch.frontend.decompose` and the import:

* :func:`fold_static_scalars`: sizes, scalar arithmetic and scalar tensors that depend only
  on constants and static shapes are computed here; assertions that hold are removed, one
  that fails raises :class:`ConversionError` with its message; assertions on symbolic sizes
  are dropped (the runtime class checks input shapes against the compiled dim ranges).
* :func:`make_promotion_explicit`: every elementwise operator whose tensor arguments differ
  from the dtype it computes in (``torch.result_type``) gets explicit casts; bitwise operators
  on ``bool`` become logical ones; sums of bool/int accumulate in the result dtype;
  Python-number divisors become typed scalar tensors.
* :func:`small_powers_as_products`: ``x ** 2`` / ``x ** 3`` as products, as PyTorch computes
  them (TVM would call ``powf`` per element).
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Any, Dict, Optional

import torch
from torch import fx

from .errors import ConversionError

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: Python operators on sizes that torch.export leaves in graphs (``operator.or_`` & co.).
_PYTHON_SCALAR_OPS = frozenset({
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.xor,
    operator.not_, operator.invert, math.ceil, math.floor, math.trunc, min, max, abs,
    torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not,
})

#: ATen operators on scalars whose value may be computed here when their inputs are known.
_ATEN_SCALAR_OPS = frozenset({
    aten.scalar_tensor.default, aten._local_scalar_dense.default, aten._to_copy.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.div.Scalar_mode,
    aten.rsub.Scalar, aten.floor_divide.Scalar,
    aten.floor_divide.default, aten.remainder.Scalar, aten.remainder.Tensor, aten.neg.default,
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.clone.default,
    aten.lift_fresh_copy.default, aten.ge.Scalar, aten.le.Scalar, aten.eq.Scalar,
    aten.gt.Scalar, aten.lt.Scalar, aten.ne.Scalar, aten.ceil.default, aten.floor.default,
})

_ASSERTIONS = frozenset({aten._assert_scalar.default, aten.sym_constrain_range.default,
                         aten.sym_constrain_range_for_size.default})

_UNKNOWN = object()


def _static_value(node: fx.Node) -> Any:
    """A node's value when its ``meta['val']`` is a plain Python number (a static size)."""
    val = node.meta.get("val")
    if isinstance(val, (bool, int, float)):
        return val
    return _UNKNOWN


def _is_small_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) or \
        (isinstance(value, torch.Tensor) and value.numel() <= 1)


def fold_static_scalars(graph_module: fx.GraphModule) -> None:
    """Compute scalar values that depend only on constants and static sizes (in place).

    Raises
    ------
    ConversionError
        When a runtime assertion of the model fails at the shapes it is compiled for.
    """
    graph = graph_module.graph
    known: Dict[fx.Node, Any] = {}

    def value_of(arg):
        if isinstance(arg, fx.Node):
            return known.get(arg, _UNKNOWN)
        if isinstance(arg, (list, tuple)):
            items = [value_of(a) for a in arg]
            return _UNKNOWN if any(i is _UNKNOWN for i in items) else type(arg)(items)
        if isinstance(arg, dict):
            items = {k: value_of(v) for k, v in arg.items()}
            return _UNKNOWN if any(v is _UNKNOWN for v in items.values()) else items
        return arg

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in _ASSERTIONS:
            condition = value_of(node.args[0]) if node.args else _UNKNOWN
            if target is aten._assert_scalar.default and condition is not _UNKNOWN:
                if not bool(condition):
                    message = node.args[1] if len(node.args) > 1 else "an assertion"
                    raise ConversionError(
                        f"tvm.contrib.torch: the model's runtime check fails at the compiled "
                        f"shapes: {message}")
            # Holds, or is about symbolic sizes the runtime class bounds by dim_ranges.
            graph.erase_node(node)
            continue
        if target is aten.sym_size.int or target is aten.sym_numel.default:
            value = _static_value(node)
            if value is not _UNKNOWN:
                known[node] = value
            continue
        if target not in _PYTHON_SCALAR_OPS and target not in _ATEN_SCALAR_OPS:
            continue
        args, kwargs = value_of(list(node.args)), value_of(dict(node.kwargs))
        if args is _UNKNOWN or kwargs is _UNKNOWN:
            value = _static_value(node)  # e.g. a comparison of static sizes
            if value is not _UNKNOWN:
                known[node] = value
            continue
        try:
            value = target(*args, **kwargs)
        except Exception:  # pylint: disable=broad-except
            continue  # leave it to the importer
        if _is_small_scalar(value):
            known[node] = value

    # Python numbers replace the nodes that computed them in their users' arguments; scalar
    # tensors stay nodes (they are tensors to the operators reading them).
    numbers = {n: v for n, v in known.items() if isinstance(v, (bool, int, float))}
    for node in list(graph.nodes):
        if node in numbers or node.op != "call_function":
            continue
        if any(isinstance(a, fx.Node) and a in numbers for a in node.all_input_nodes):
            node.args = fx.map_arg(node.args, lambda a: numbers.get(a, a))
            node.kwargs = fx.map_arg(node.kwargs, lambda a: numbers.get(a, a))
    graph.eliminate_dead_code()
    graph_module.recompile()


#: Elementwise operators whose tensor arguments compute in the result dtype.
_ARITHMETIC = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
    aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode,
    aten.div.Scalar_mode, aten.rsub.Tensor, aten.rsub.Scalar, aten.pow.Tensor_Tensor,
    aten.pow.Tensor_Scalar, aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor,
    aten.fmod.Scalar, aten.floor_divide.default, aten.maximum.default, aten.minimum.default,
    aten.atan2.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.bitwise_xor.Tensor, aten.bitwise_and.Scalar, aten.bitwise_or.Scalar,
    aten.bitwise_xor.Scalar,
})

#: Comparisons: the result is bool; the arguments compute in their common dtype.
_COMPARISONS = frozenset({
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
    aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    aten.ge.Tensor, aten.ge.Scalar,
})

#: Reductions that accumulate bool and small integers in int64 (``mask.cumsum(-1)``): the input
#: is cast to the result dtype (TVM's converters keep the input dtype).
_ACCUMULATIONS = frozenset({
    aten.cumsum.default, aten.cumprod.default, aten.sum.default, aten.sum.dim_IntList,
    aten.prod.default, aten.prod.dim_int,
})

#: Bitwise and arithmetic operators on bool are logical ones (TVM's bitwise ops take
#: integers only; its code generator has no bool addition or multiplication).
_LOGICAL_OF_BITWISE = {
    aten.bitwise_and.Tensor: aten.logical_and.default,
    aten.bitwise_or.Tensor: aten.logical_or.default,
    aten.bitwise_xor.Tensor: aten.logical_xor.default,
    aten.bitwise_not.default: aten.logical_not.default,
    aten.mul.Tensor: aten.logical_and.default,
    aten.add.Tensor: aten.logical_or.default,
    aten.maximum.default: aten.logical_or.default,
    aten.minimum.default: aten.logical_and.default,
}

#: Divisions whose Python-number operand TVM's importer types as int32/float32 regardless of
#: the tensor's dtype: the operand becomes a scalar tensor of the compute dtype.
_DIVISIONS = {
    aten.div.Tensor: aten.div.Tensor,
    aten.div.Scalar: aten.div.Tensor,
    aten.div.Tensor_mode: aten.div.Tensor_mode,
    aten.div.Scalar_mode: aten.div.Tensor_mode,
    aten.floor_divide.default: aten.floor_divide.default,
}


def _tensor_val(arg) -> Optional[torch.Tensor]:
    if isinstance(arg, fx.Node):
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _example(value):
    """A stand-in with the dtype category and dimensionality ``torch.result_type`` reads."""
    val = _tensor_val(value)
    if val is not None:
        return torch.empty((0,) * val.dim(), dtype=val.dtype)
    return value


def _cast(graph: fx.Graph, before: fx.Node, arg: fx.Node, dtype: torch.dtype) -> fx.Node:
    with graph.inserting_before(before):
        cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
    val = _tensor_val(arg)
    if val is not None:
        cast.meta["val"] = val.to(dtype)
    return cast


def _scalar_tensor(graph: fx.Graph, before: fx.Node, value, dtype: torch.dtype) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(aten.scalar_tensor.default, (value,), {"dtype": dtype})
    out = before.meta.get("val")
    if isinstance(out, torch.Tensor):
        node.meta["val"] = torch.empty((), dtype=dtype, device=out.device)
    return node


def make_promotion_explicit(graph_module: fx.GraphModule) -> None:
    """Cast the arguments of elementwise operators to the dtype PyTorch computes in (in place)."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        if target in _LOGICAL_OF_BITWISE and out.dtype == torch.bool and all(
                isinstance(a, fx.Node) for a in node.args):
            node.target = _LOGICAL_OF_BITWISE[target]
            node.args = tuple(node.args)[:2 if target is not aten.bitwise_not.default else 1]
            node.kwargs = {}
            continue
        if target in _ARITHMETIC:
            compute = out.dtype
            positions = range(len(node.args))
        elif target in _COMPARISONS:
            compute = torch.result_type(_example(node.args[0]), _example(node.args[1]))
            if compute == torch.bool:
                compute = torch.uint8  # TVM's code generator cannot order bools
            positions = range(2)
        elif target is aten.where.self:
            compute = out.dtype
            positions = (1, 2)
        elif target in _ACCUMULATIONS:
            compute = out.dtype
            positions = (0,)
        else:
            continue
        args = list(node.args)
        for position in positions:
            if position >= len(args):
                continue
            arg = args[position]
            val = _tensor_val(arg)
            if val is not None and val.dtype != compute:
                args[position] = _cast(graph, node, arg, compute)
            elif target in _DIVISIONS and position == 1 and \
                    isinstance(arg, (int, float)) and not isinstance(arg, bool):
                args[position] = _scalar_tensor(graph, node, arg, compute)
                node.target = _DIVISIONS[target]
        node.args = tuple(args)
    graph.lint()
    graph_module.recompile()


def small_powers_as_products(graph_module: fx.GraphModule) -> None:
    """``x ** 2`` and ``x ** 3`` on floating tensors as products, in place.

    PyTorch's CPU kernel computes these as products; TVM's code calls scalar ``powf`` per
    element (GPT-2's GELU spends 100x its time there).
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.pow.Tensor_Scalar:
            continue
        base, exponent = node.args[0], node.args[1]
        val = _tensor_val(base)
        if val is None or not val.is_floating_point() or isinstance(exponent, bool) or \
                exponent not in (2, 3):
            continue
        with graph.inserting_before(node):
            square = graph.call_function(aten.mul.Tensor, (base, base))
            square.meta["val"] = node.meta.get("val")
            result = square if exponent == 2 else \
                graph.call_function(aten.mul.Tensor, (square, base))
            result.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    graph_module.recompile()


_MULS = frozenset({aten.mul.Tensor, aten.mul.Scalar})
_ADDS = frozenset({aten.add.Tensor, aten.add.Scalar})


def _with_scalar(node: Any, targets: frozenset, value: float) -> Optional[fx.Node]:
    """The tensor operand of ``node`` when it is ``op(t, value)`` or ``op(value, t)`` for an
    op in ``targets`` (a Python number within float32 rounding of ``value``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or \
            node.target not in targets or len(node.args) != 2 or node.kwargs:
        return None
    for tensor, scalar in (node.args, reversed(node.args)):
        if isinstance(tensor, fx.Node) and isinstance(scalar, (int, float)) and \
                not isinstance(scalar, bool) and abs(scalar - value) <= 1e-6 * abs(value):
            return tensor
    return None


def _is_cube_of(node: Any, x: fx.Node) -> bool:
    """Whether ``node`` is ``x ** 3``, ``(x * x) * x`` or ``x * (x * x)``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[0] is x and node.args[1] == 3
    if node.target is not aten.mul.Tensor:
        return False
    a, b = node.args
    square = lambda n: isinstance(n, fx.Node) and n.target is aten.mul.Tensor and \
        n.args[0] is x and n.args[1] is x  # noqa: E731
    return (square(a) and b is x) or (a is x and square(b))


def tanh_gelu_as_gelu(graph_module: fx.GraphModule) -> None:
    """The tanh approximation of GELU written out (Hugging Face's ``gelu_new``, GPT-2's
    activation: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))``) as
    ``aten.gelu(x, approximate="tanh")``, in place.

    ATen's kernel computes the same formula; as one operator it runs in the epilogue of the
    linear layer before it instead of as eight elementwise kernels.
    """
    graph = graph_module.graph
    for tanh in list(graph.nodes):
        if tanh.op != "call_function" or tanh.target is not aten.tanh.default:
            continue
        inner = _with_scalar(tanh.args[0], _MULS, math.sqrt(2.0 / math.pi))
        if inner is None or inner.target is not aten.add.Tensor:
            continue
        found = None
        for x, cubic in (inner.args, reversed(inner.args)):
            cube = _with_scalar(cubic, _MULS, 0.044715)
            if isinstance(x, fx.Node) and cube is not None and _is_cube_of(cube, x):
                found = x
        val = _tensor_val(found) if found is not None else None
        if val is None or not val.is_floating_point() or len(tanh.users) != 1:
            continue
        one_plus = next(iter(tanh.users))
        if _with_scalar(one_plus, _ADDS, 1.0) is not tanh or len(one_plus.users) != 1:
            continue
        out = next(iter(one_plus.users))
        if out.target is not aten.mul.Tensor or len(out.args) != 2:
            continue
        half = out.args[1] if out.args[0] is one_plus else out.args[0]
        if _with_scalar(half, _MULS, 0.5) is not found:
            continue
        with graph.inserting_before(out):
            gelu = graph.call_function(aten.gelu.default, (found,), {"approximate": "tanh"})
            gelu.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(gelu)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()


def sigmoid_products_as_silu(graph_module: fx.GraphModule) -> None:
    """``x * sigmoid(x)`` on floating tensors as ``aten.silu(x)``, in place.

    Models and decompositions write SiLU (swish) this way; as one operator it runs in the
    epilogue of the convolution or linear layer before it.
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.mul.Tensor or \
                len(node.args) != 2 or node.kwargs:
            continue
        for x, gate in (node.args, tuple(reversed(node.args))):
            if isinstance(gate, fx.Node) and gate.op == "call_function" and \
                    gate.target is aten.sigmoid.default and gate.args[0] is x:
                val = _tensor_val(x)
                if val is None or not val.is_floating_point():
                    continue
                with graph.inserting_before(node):
                    silu = graph.call_function(aten.silu.default, (x,))
                    silu.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(silu)
                break
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()


def run(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """All rewrites, in place on ``ep``'s graph; returns ``ep``."""
    fold_static_scalars(ep.graph_module)
    make_promotion_explicit(ep.graph_module)
    tanh_gelu_as_gelu(ep.graph_module)
    sigmoid_products_as_silu(ep.graph_module)
    small_powers_as_products(ep.graph_module)
    return ep


__all__ = ["fold_static_scalars", "make_promotion_explicit", "run",
           "sigmoid_products_as_silu", "small_powers_as_products", "tanh_gelu_as_gelu"]
