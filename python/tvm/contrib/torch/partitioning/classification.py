"""Step 2 of partitioning: which nodes of a frozen graph TVM may take.

:func:`classify` sorts nodes into *compute* (an ATen operator TVM's importer converts, pure,
deterministic, whose tensors were computed with one rank and dtype each; sizes that vary make
the segment dynamic), *structural* (list / tuple / size plumbing that TorchScript needs around
compute nodes; never counted) and *kept* (with the reason). :func:`is_pure` says which nodes a
run of TVM operators may be moved across.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Set

import torch
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ..decompositions import decomposition_table
from ..dtypes import SUPPORTED_DTYPES
from .graph_utils import is_tensor, is_tensor_list, walk_nodes
from .recording import TensorType

#: Nodes that route values between operators; they join segments but are not counted.
STRUCTURAL_KINDS = frozenset({
    "prim::ListConstruct", "prim::ListUnpack", "prim::TupleConstruct", "prim::TupleUnpack",
    "aten::size", "aten::Int", "prim::NumToTensor", "aten::__getitem__",
})

#: Nodes that are neither operators nor structure: never in a segment, never counted.
IGNORED_KINDS = frozenset({"prim::Constant", "prim::GetAttr"})

#: Integer arithmetic on sizes (``dim // heads``) a run may copy along with them.
_INT_ARITHMETIC_KINDS = frozenset({"aten::add", "aten::sub", "aten::mul", "aten::floordiv",
                                   "aten::neg"})


def is_int_arithmetic(node: torch._C.Node) -> bool:
    """Whether a node is integer arithmetic (on sizes): structure, not an operator."""
    int_type = torch._C.IntType.get()
    return node.kind() in _INT_ARITHMETIC_KINDS and \
        all(v.type() == int_type for v in list(node.inputs()) + list(node.outputs()))


@dataclasses.dataclass
class Classification:
    """What each node of a graph is, and why the kept ones stay in TorchScript."""

    compute: Set[torch._C.Node]
    structural: Set[torch._C.Node]
    #: kept node -> reason
    reasons: Dict[torch._C.Node, str]
    #: tensor value -> the types it took, in order
    types: Dict[torch._C.Value, List[TensorType]]

    def eligible(self, node: torch._C.Node) -> bool:
        """Whether a node may be part of a segment."""
        return node in self.compute or node in self.structural

    def known(self, value: torch._C.Value) -> bool:
        """Whether a tensor value was computed, always with one rank, dtype and device
        (its sizes may vary: such a value makes its segment dynamic)."""
        types = self.types.get(value)
        return bool(types) and len({(len(t[0]),) + t[1:] for t in types}) == 1


def is_operator(node: torch._C.Node) -> bool:
    """Whether a node counts as an operator in reports (not a constant or plumbing)."""
    return node.kind() not in IGNORED_KINDS and node.kind() not in STRUCTURAL_KINDS and \
        not is_int_arithmetic(node)


class _ConverterTable:
    """Which ATen overloads the TorchScript -> ExportedProgram -> Relax path converts."""

    def __init__(self):
        self.converters = set(ExportedProgramImporter().convert_map)
        self.decomposed = set(decomposition_table())
        self.cache: Dict[str, bool] = {}

    #: Operators torch's TorchScript converter rewrites before export (kind -> converted to).
    RENAMED = {"aten::_convolution": "convolution.default"}

    def supports(self, schema: torch._C.FunctionSchema) -> bool:
        """Whether the ATen overload with this schema converts (directly or decomposed)."""
        key = f"{schema.name}.{schema.overload_name}"
        if key not in self.cache:
            self.cache[key] = self._supports(schema)
        return self.cache[key]

    def _supports(self, schema) -> bool:
        short = schema.name.split("::", 1)[1]
        overload = schema.overload_name or "default"
        if self.RENAMED.get(schema.name) in self.converters:
            return True
        if f"{short}.{overload}" in self.converters:
            return True
        packet = getattr(torch.ops.aten, short, None)
        op = getattr(packet, overload, None) if packet is not None else None
        if op is None:
            return False
        if op in self.decomposed:
            return True
        # CompositeImplicitAutograd overloads (linear, flatten, ...) decompose while tracing.
        return torch._C._dispatch_has_kernel_for_dispatch_key(  # pylint: disable=protected-access
            op.name(), "CompositeImplicitAutograd")


def node_schema(node: torch._C.Node) -> Optional[torch._C.FunctionSchema]:
    """A node's operator schema, or None (``prim`` nodes and others without one)."""
    try:
        text = node.schema()
    except RuntimeError:
        return None
    if text == "(no schema)":
        return None
    return torch._C.parse_schema(text)


def _constant(value: torch._C.Value):
    node = value.node()
    return value.toIValue() if node.kind() == "prim::Constant" else None


def _without_randomness(node: torch._C.Node, schema: torch._C.FunctionSchema) -> bool:
    """Whether a dropout-style operator is called with probability 0 or outside training."""
    for arg, value in zip(schema.arguments, node.inputs()):
        if arg.name in ("dropout_p", "p") and _constant(value) == 0.0:
            return True
        if arg.name in ("train", "training") and _constant(value) is False:
            return True
    return False


def classify(graph: torch._C.Graph, types: Dict[torch._C.Value, List[TensorType]],
             torch_executed_ops: Sequence[str] = (), dynamic_shapes: bool = True) -> Classification:
    """Sort the nodes of ``graph`` into compute, structural and kept (with a reason).

    Parameters
    ----------
    graph : torch._C.Graph
        A frozen, inlined graph.
    types : dict
        :func:`~.recording.record_tensor_types`'s result.
    torch_executed_ops : sequence of str
        Operator kinds (``"aten::relu"``) that stay in TorchScript whatever TVM supports.
    dynamic_shapes : bool
        Whether tensors whose sizes varied between calls (same rank and dtype) may be in a
        segment (compiled with symbolic dims) instead of staying in TorchScript.
    """
    table = _ConverterTable()
    forced = set(torch_executed_ops)
    result = Classification(set(), set(), {}, types)

    def tensor_types_ok(values) -> Optional[str]:
        for value in values:
            if not is_tensor(value):
                continue
            seen = types.get(value)
            if not seen:
                return "not executed with the example inputs"
            distinct = set(seen)
            if len(distinct) > 1 and not (dynamic_shapes and result.known(value)):
                return f"shapes vary between calls ({len(distinct)} seen)"
            _, dtype, _ = seen[0]
            if dtype not in SUPPORTED_DTYPES:
                return f"dtype {dtype} is not supported"
        return None

    for node in walk_nodes(graph.block()):
        kind = node.kind()
        if kind in IGNORED_KINDS:
            continue
        reason = None
        if kind in forced:
            reason = "listed in torch_executed_ops"
        elif list(node.blocks()):
            reason = "control flow stays in TorchScript (its blocks are partitioned)"
        elif kind in STRUCTURAL_KINDS or is_int_arithmetic(node):
            reason = tensor_types_ok(list(node.inputs()) + list(node.outputs()))
            if reason is None:
                result.structural.add(node)
                continue
        elif not kind.startswith("aten::"):
            reason = "no TVM converter (not an ATen operator)"
        else:
            schema = node_schema(node)
            outputs = list(node.outputs())
            if schema is None:
                reason = "no operator schema"
            elif schema.is_mutable:
                reason = "mutates its inputs"
            elif node.isNondeterministic() and not _without_randomness(node, schema):
                reason = "nondeterministic"
            elif not outputs or not all(is_tensor(v) or is_tensor_list(v) for v in outputs):
                reason = "returns non-tensor values"
            elif not table.supports(schema):
                reason = "no TVM converter"
            else:
                reason = tensor_types_ok(list(node.inputs()) + outputs)
                if reason is None:
                    result.compute.add(node)
                    continue
        result.reasons[node] = reason
    return result


#: ``prim`` nodes without a schema that neither mutate nor have effects a reordering shows.
_PURE_PRIMS = frozenset({
    "prim::Constant", "prim::GetAttr", "prim::RaiseException", "prim::Uninitialized",
    "prim::unchecked_cast", "prim::dtype", "prim::device", "prim::TupleIndex", "prim::If",
    "prim::Loop", "prim::min", "prim::max", "prim::layout", "prim::is_cuda",
})


def is_pure(node: torch._C.Node) -> bool:
    """Whether a node (with its blocks) mutates nothing and has no ordered side effect.

    A run of TVM operators may be moved before pure nodes it does not depend on: a shape
    assertion (``if ...: raise``) between two convolutions does not split them.
    """
    kind = node.kind()
    if kind in STRUCTURAL_KINDS or kind in _PURE_PRIMS:
        pure = True
    else:
        schema = node_schema(node)
        pure = schema is not None and not schema.is_mutable
    return pure and all(is_pure(inner) for sub in node.blocks() for inner in sub.nodes())


__all__ = ["Classification", "IGNORED_KINDS", "STRUCTURAL_KINDS", "classify",
           "is_int_arithmetic", "is_operator", "is_pure", "node_schema"]
