"""Partition analysis of a frozen TorchScript graph: which nodes TVM can take, in which groups.

Three steps, all on ``torch._C.Graph`` objects (no TVM involved):

1. :func:`record_tensor_types`: run a copy of the graph once on example inputs with a recording
   operator after every tensor value, so each value gets the ``(shape, dtype, device)`` it
   took. Values in loop bodies may take several; values in branches not taken take none.
2. :func:`classify`: a node is *compute* (an ATen operator TVM's importer converts, pure,
   deterministic, whose tensors were computed with one rank and dtype each; sizes that vary
   make the segment dynamic), *structural* (list / tuple / size plumbing that TorchScript
   needs around compute nodes; never counted) or *kept*.
3. :func:`find_runs`: in every block (top level, ``prim::If`` branches, ``prim::Loop``
   bodies), runs of compute/structural nodes whose non-tensor inputs are constants, come from
   the run, or are shape plumbing the run can copy (``x.shape``, ``dim // heads``). A pure
   node that cannot join is deferred (the run is computed before it); a node with side
   effects, control flow included, ends the run; blocks are searched on their own.
   :func:`segment_of` gives a run's program inputs and outputs.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

#: ``(shape, dtype, device type)`` of one recorded tensor.
TensorType = Tuple[Tuple[int, ...], str, str]

#: Nodes that route values between operators; they join segments but are not counted.
STRUCTURAL_KINDS = frozenset({
    "prim::ListConstruct", "prim::ListUnpack", "prim::TupleConstruct", "prim::TupleUnpack",
    "aten::size", "aten::Int", "prim::NumToTensor", "aten::__getitem__",
})

#: Fused operators (decomposed by :mod:`.decompositions`) worth a program on their own: a run
#: holding one meets any ``min_block_size``.
FUSED_KINDS = frozenset({"aten::_transformer_encoder_layer_fwd",
                         "aten::_native_multi_head_attention"})

#: Nodes that are neither operators nor structure: never in a segment, never counted.
_IGNORED_KINDS = frozenset({"prim::Constant", "prim::GetAttr"})

#: Integer arithmetic on sizes (``dim // heads``) a run may copy along with them.
_INT_ARITHMETIC_KINDS = frozenset({"aten::add", "aten::sub", "aten::mul", "aten::floordiv",
                                   "aten::neg"})


def _is_int_arithmetic(node: torch._C.Node) -> bool:
    """Whether a node is integer arithmetic (on sizes): structure, not an operator."""
    int_type = torch._C.IntType.get()
    return node.kind() in _INT_ARITHMETIC_KINDS and \
        all(v.type() == int_type for v in list(node.inputs()) + list(node.outputs()))


#: Dtypes TVM compiles.
_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int8", "int16", "int32",
                     "int64", "uint8", "bool"})

_RECORD_OP = "tvm_torch_partition::record"
_library: Optional[torch.library.Library] = None
_recording = threading.local()


def _record(tensor: torch.Tensor, key: int) -> None:
    store = getattr(_recording, "store", None)
    if store is not None:
        dtype = str(tensor.dtype).replace("torch.", "")
        store[key].append((tuple(tensor.shape), dtype, tensor.device.type))


def _define_record_op() -> None:
    global _library  # pylint: disable=global-statement
    if _library is None:
        _library = torch.library.Library("tvm_torch_partition", "DEF")
        _library.define("record(Tensor x, int key) -> ()")
        _library.impl("record", _record, "CompositeExplicitAutograd")


def walk_nodes(block) -> Iterator[torch._C.Node]:
    """Every node of a block, nested blocks included, in program order."""
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from walk_nodes(sub)


def _defined_values(graph: torch._C.Graph) -> List[Tuple[torch._C.Value, object, object]]:
    """Every value in definition order with where it is defined: ``(value, block, node)``.

    ``node`` is the defining node, or ``None`` for graph and block inputs. The order is the
    same for a graph and its ``copy()``, which maps values between the two.
    """
    out = [(v, graph.block(), None) for v in graph.inputs()]

    def visit(block):
        for node in block.nodes():
            out.extend((v, block, node) for v in node.outputs())
            for sub in node.blocks():
                out.extend((v, sub, None) for v in sub.inputs())
                visit(sub)

    visit(graph.block())
    return out


def is_tensor(value: torch._C.Value) -> bool:
    """Whether a value is typed ``Tensor``."""
    return isinstance(value.type(), torch._C.TensorType)


def is_tensor_list(value: torch._C.Value) -> bool:
    """Whether a value is typed ``List[Tensor]``."""
    kind = value.type()
    return isinstance(kind, torch._C.ListType) and \
        isinstance(kind.getElementType(), torch._C.TensorType)


def _first_position(block):
    return next(iter(block.nodes()), None) or block.returnNode()


def record_tensor_types(graph: torch._C.Graph, module: torch.jit.ScriptModule,
                        example_inputs: Sequence[torch.Tensor]) -> Dict[torch._C.Value, List[TensorType]]:
    """Run ``graph`` (a method graph of ``module``) once and record every tensor value's type.

    Returns
    -------
    dict
        For each tensor value of ``graph`` that was computed, the types it took, in the order
        it took them (several for values in loop bodies).
    """
    _define_record_op()
    original = _defined_values(graph)
    copy = graph.copy()
    copied = _defined_values(copy)
    int_type = torch._C.IntType.get()
    for key, (value, block, node) in enumerate(copied):
        if not is_tensor(value):
            continue
        if node is None and block is not copy.block():
            continue  # a loop-carried value, maybe uninitialised on entry: derived below
        if node is not None and node.kind() == "prim::Uninitialized":
            continue
        constant = copy.create("prim::Constant")
        constant.i_("value", key)
        constant.output().setType(int_type)
        record = copy.create(_RECORD_OP, [value, constant.output()], 0)
        if node is None:
            constant.insertBefore(_first_position(block))
        else:
            constant.insertAfter(node)
        record.insertAfter(constant)
    function = torch._C._create_function_from_graph(  # pylint: disable=protected-access
        "tvm_torch_record_types", copy)
    _recording.store = collections.defaultdict(list)
    try:
        with torch.no_grad(), torch.jit.optimized_execution(False):
            try:
                function(module._c, *example_inputs)  # pylint: disable=protected-access
            except RuntimeError as err:
                lines = [line for line in str(err).splitlines() if line.strip()]
                raise RuntimeError("tvm.contrib.torch.partition: running the model on "
                                   f"example_inputs failed: {lines[-1] if lines else err}") \
                    from err
        store = _recording.store
    finally:
        _recording.store = None
    types = {original[key][0]: seen for key, seen in store.items()}
    _derive_loop_carried(graph, types)
    return types


def _derive_loop_carried(graph: torch._C.Graph, types: Dict[torch._C.Value, List[TensorType]]):
    """Types of loop-carried tensors: those of their initial and their next values."""
    for node in walk_nodes(graph.block()):
        if node.kind() != "prim::Loop":
            continue
        body = next(iter(node.blocks()))
        for carried, initial, following in zip(list(body.inputs())[1:],
                                               list(node.inputs())[2:],
                                               list(body.outputs())[1:]):
            seen = types.get(initial, []) + types.get(following, [])
            if is_tensor(carried) and seen:
                types[carried] = seen


# ---------------------------------------------------------------------------------------------
# classification


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

    def static_type(self, value: torch._C.Value) -> Optional[TensorType]:
        """The one type a tensor value took, or ``None`` (never computed, or several)."""
        types = set(self.types.get(value, []))
        return next(iter(types)) if len(types) == 1 else None

    def known(self, value: torch._C.Value) -> bool:
        """Whether a tensor value was computed, always with one rank, dtype and device
        (its sizes may vary: such a value makes its segment dynamic)."""
        types = self.types.get(value)
        return bool(types) and len({(len(t[0]),) + t[1:] for t in types}) == 1


def is_operator(node: torch._C.Node) -> bool:
    """Whether a node counts as an operator in reports (not a constant or plumbing)."""
    return node.kind() not in _IGNORED_KINDS and node.kind() not in STRUCTURAL_KINDS and \
        not _is_int_arithmetic(node)


class _ConverterTable:
    """Which ATen overloads the TorchScript -> ExportedProgram -> Relax path converts."""

    def __init__(self):
        from tvm.relax.frontend.torch.exported_program_translator import (  # pylint: disable=import-outside-toplevel
            ExportedProgramImporter,
        )

        from .decompositions import decomposition_table  # pylint: disable=import-outside-toplevel

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


def _schema(node: torch._C.Node) -> Optional[torch._C.FunctionSchema]:
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
        :func:`record_tensor_types`'s result.
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
            if dtype not in _DTYPES:
                return f"dtype {dtype} is not supported"
        return None

    for node in walk_nodes(graph.block()):
        kind = node.kind()
        if kind in _IGNORED_KINDS:
            continue
        reason = None
        if kind in forced:
            reason = "listed in torch_executed_ops"
        elif list(node.blocks()):
            reason = "control flow stays in TorchScript (its blocks are partitioned)"
        elif kind in STRUCTURAL_KINDS or _is_int_arithmetic(node):
            reason = tensor_types_ok(list(node.inputs()) + list(node.outputs()))
            if reason is None:
                result.structural.add(node)
                continue
        elif not kind.startswith("aten::"):
            reason = "no TVM converter (not an ATen operator)"
        else:
            schema = _schema(node)
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


# ---------------------------------------------------------------------------------------------
# segments


@dataclasses.dataclass
class Segment:
    """A run of consecutive nodes of one block that becomes one TVM program."""

    nodes: List[torch._C.Node]
    #: Tensor values the run reads from outside (the program's inputs, in order).
    inputs: List[torch._C.Value]
    #: Tensor values of the run read outside it (the program's outputs, in order).
    outputs: List[torch._C.Value]
    #: Members whose non-tensor results are read outside: they also stay in TorchScript.
    kept: List[torch._C.Node]
    #: Counted operators: kind -> count.
    operators: Dict[str, int]
    #: Shape plumbing before the run (``aten::size`` of an input, its unpacking) that the run
    #: reads: copied into the program, left where it is in TorchScript.
    pulled: List[torch._C.Node] = dataclasses.field(default_factory=list)

    @property
    def num_operators(self) -> int:
        """Number of counted operators in the run."""
        return sum(self.operators.values())

    def meets(self, min_block_size: int) -> bool:
        """Whether the run is big enough for a program of its own."""
        return self.num_operators >= min_block_size or \
            any(kind in FUSED_KINDS for kind in self.operators)


#: Structural kinds with non-tensor results that a run may copy from before its start.
_PULLABLE_KINDS = frozenset({"aten::size", "prim::ListUnpack", "prim::ListConstruct",
                             "prim::TupleUnpack", "prim::TupleConstruct", "aten::Int",
                             "aten::__getitem__"})


def _pull_chain(value: torch._C.Value, inside: Set[torch._C.Node], classes: Classification,
                tainted: Set[torch._C.Value] = frozenset()) -> Optional[List[torch._C.Node]]:
    """Nodes to copy so a run can compute ``value`` itself, or None when it cannot.

    ``[]`` when the value is a constant, comes from the run, or is a recorded tensor (an input
    of the program); otherwise the chain of shape plumbing (``aten::size`` of a recorded
    tensor, list/tuple unpacking, ``aten::Int``) producing it, dependencies first.
    """
    producer = value.node()
    if producer in inside or producer.kind() == "prim::Constant":
        return []
    if value in tainted:
        return None
    if is_tensor(value):
        return [] if classes.known(value) else None
    if any(is_tensor(v) for v in producer.outputs()):
        return None
    if producer.kind() not in _PULLABLE_KINDS and not _is_int_arithmetic(producer):
        return None
    chain: List[torch._C.Node] = []
    for source in producer.inputs():
        sub = _pull_chain(source, inside, classes, tainted)
        if sub is None:
            return None
        chain.extend(n for n in sub if n not in chain)
    chain.append(producer)
    return chain


def segment_of(nodes: Sequence[torch._C.Node], classes: Classification) -> Segment:
    """Inputs, outputs, kept members and pulled shape plumbing of a run of nodes."""
    members = set(nodes)
    pulled: List[torch._C.Node] = []
    for node in nodes:
        for value in node.inputs():
            chain = _pull_chain(value, members, classes) if not is_tensor(value) else []
            pulled.extend(n for n in chain or [] if n not in pulled)
    readers = set(members) | set(pulled)
    inputs: List[torch._C.Value] = []
    seen_inputs: Set[torch._C.Value] = set()
    for node in pulled + list(nodes):
        for value in node.inputs():
            producer = value.node()
            if producer in readers or producer.kind() == "prim::Constant":
                continue
            if value not in seen_inputs:
                seen_inputs.add(value)
                inputs.append(value)

    # Members whose non-tensor outputs are read outside stay in TorchScript as well; the
    # tensors they read from the run then become outputs of the run.
    kept_set: Set[torch._C.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node in kept_set:
                continue
            users = [use.user for v in node.outputs() if not is_tensor(v) for use in v.uses()]
            if any(r not in members or r in kept_set for r in users):
                kept_set.add(node)
                changed = True
    kept = [n for n in nodes if n in kept_set]
    inside = members - kept_set
    outputs: List[torch._C.Value] = []
    for node in nodes:
        if node in kept_set:
            continue
        for value in node.outputs():
            if is_tensor(value) and any(use.user not in inside for use in value.uses()):
                outputs.append(value)
    operators = collections.Counter(n.kind() for n in nodes if n in classes.compute)
    return Segment(list(nodes), inputs, outputs, kept, dict(operators), pulled)


def _joinable(node: torch._C.Node, run: Set[torch._C.Node], classes: Classification,
              tainted: Set[torch._C.Value]) -> bool:
    """Whether every input of ``node`` is a constant, from ``run``, a recorded tensor, or
    shape plumbing the run can copy; none of them computed by a deferred node."""
    return all(_pull_chain(v, run, classes, tainted) is not None for v in node.inputs())


def _trim(run: List[torch._C.Node], classes: Classification) -> List[torch._C.Node]:
    """Drop structural nodes at the end of a run (they feed nothing inside it)."""
    while run and run[-1] in classes.structural:
        run = run[:-1]
    return run


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
        schema = _schema(node)
        pure = schema is not None and not schema.is_mutable
    return pure and all(is_pure(inner) for sub in node.blocks() for inner in sub.nodes())


def find_runs(graph: torch._C.Graph, classes: Classification) -> List[List[torch._C.Node]]:
    """Runs of eligible nodes, per block, nested blocks included.

    A run grows over the block's nodes in order. A node that cannot join it is *deferred*
    when it is pure (the run is then computed before it; what it computes cannot feed the
    run) and ends the run otherwise. Deferred nodes are looked at again for the next run.
    """
    runs: List[List[torch._C.Node]] = []

    def stays_in_torch(node):
        if classes.eligible(node):
            classes.reasons.setdefault(node, "reads a non-tensor value computed in TorchScript")
        for sub in node.blocks():
            visit(sub)

    def visit(block):
        remaining = [n for n in block.nodes() if n.kind() != "prim::Constant"]
        while remaining:
            run: List[torch._C.Node] = []
            run_set: Set[torch._C.Node] = set()
            tainted: Set[torch._C.Value] = set()
            deferred: List[torch._C.Node] = []
            stop = len(remaining)
            for index, node in enumerate(remaining):
                if classes.eligible(node) and _joinable(node, run_set, classes, tainted):
                    run.append(node)
                    run_set.add(node)
                elif not run:
                    stays_in_torch(node)
                elif is_pure(node):
                    deferred.append(node)
                    tainted.update(node.outputs())
                else:
                    stop = index
                    break
            trimmed = _trim(run, classes)
            if trimmed:
                runs.append(list(trimmed))
            # Trailing structural nodes and deferred nodes are looked at again; a run of
            # structural nodes only (nothing to compute) stays in TorchScript.
            again = set(deferred) | (set(run) - set(trimmed) if trimmed else set())
            remaining = [n for n in remaining[:stop] if n in again] + remaining[stop:]

    visit(graph.block())
    return runs


__all__ = [
    "Classification",
    "FUSED_KINDS",
    "STRUCTURAL_KINDS",
    "Segment",
    "classify",
    "find_runs",
    "is_operator",
    "is_pure",
    "is_tensor",
    "is_tensor_list",
    "record_tensor_types",
    "segment_of",
    "walk_nodes",
]
