"""Step 3 of partitioning: the runs of nodes that become TVM programs.

:func:`find_runs` searches every block (top level, ``prim::If`` branches, ``prim::Loop``
bodies) for runs of compute/structural nodes whose non-tensor inputs are constants, come from
the run, or are shape plumbing the run can copy (``x.shape``, ``dim // heads``). A pure node
that cannot join is deferred (the run is computed before it); a node with side effects,
control flow included, ends the run; blocks are searched on their own. :func:`segment_of`
gives a run's program inputs and outputs, :func:`input_infos` its input shapes.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..options import InputInfo
from .classification import Classification, is_int_arithmetic, is_pure
from .graph_utils import is_tensor

#: Fused operators (decomposed by :mod:`..decompositions`) worth a program on their own: a run
#: holding one meets any ``min_block_size``.
FUSED_KINDS = frozenset({"aten::_transformer_encoder_layer_fwd",
                         "aten::_native_multi_head_attention"})


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
    if producer.kind() not in _PULLABLE_KINDS and not is_int_arithmetic(producer):
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


def split_points(nodes: Sequence[torch._C.Node]) -> List[int]:
    """Indices where a run can be cut: no non-tensor value crosses the cut."""
    points = []
    for cut in range(1, len(nodes)):
        later = set(nodes[cut:])
        crossing = any(use.user in later for node in nodes[:cut] for v in node.outputs()
                       if not is_tensor(v) for use in v.uses())
        if not crossing:
            points.append(cut)
    return points


def input_infos(segment: Segment,
                classes: Classification) -> Tuple[List[InputInfo], Dict[str, Tuple[int, int]]]:
    """The input infos and dim ranges of a segment's program, from the recorded types.

    A dim whose size varied between calls becomes symbolic; dims whose sizes varied the same
    way (the same sequence of sizes) share a symbol. Its range runs from the smallest size
    seen to eight times the largest; sizes outside it fall back to TorchScript.
    """
    symbols: Dict[tuple, str] = {}
    ranges: Dict[str, Tuple[int, int]] = {}
    infos = []
    for index, value in enumerate(segment.inputs):
        records = classes.types[value]
        dims = []
        for axis in range(len(records[0][0])):
            sizes = tuple(record[0][axis] for record in records)
            if len(set(sizes)) == 1:
                dims.append(sizes[0])
                continue
            name = symbols.setdefault(sizes, f"s{len(symbols)}")
            ranges[name] = (min(sizes), 8 * max(sizes))
            dims.append(name)
        infos.append(InputInfo(f"input{index}", tuple(dims), records[0][1]))
    return infos, ranges


__all__ = ["FUSED_KINDS", "Segment", "find_runs", "input_infos", "segment_of", "split_points"]
