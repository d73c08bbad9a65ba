"""Step 5 of partitioning: what was offloaded, as a report saved with the partitioned module."""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Dict, List

import torch

from ..frontend import ConversionError
from .classification import Classification, is_operator
from .graph_utils import walk_nodes

#: Name of the string attribute holding the report on the partitioned module.
REPORT_ATTRIBUTE = "tvm_partition_report"


@dataclasses.dataclass
class PartitionReport:
    """What :func:`partition` offloaded to TVM and what stayed in TorchScript.

    Attributes
    ----------
    num_operators : int
        Operators in the frozen model (constants and list/tuple/size plumbing not counted;
        ``prim::If`` / ``prim::Loop`` counted).
    offloaded_operators : int
        Operators now running in TVM programs.
    kept_operators : dict of str to int
        Operators still run by TorchScript, by kind.
    segments : list of dict
        One entry per TVM program: ``attribute``, ``operators`` (kind -> count),
        ``input_shapes``, ``input_dtypes``, ``num_outputs``.
    kept_reasons : dict of str to str
        For each kept kind, why (the first reason met).
    skipped : list of dict
        Runs of convertible operators left in TorchScript: ``operators`` and ``reason``.
    """

    num_operators: int
    offloaded_operators: int
    kept_operators: Dict[str, int]
    segments: List[Dict[str, Any]]
    kept_reasons: Dict[str, str]
    skipped: List[Dict[str, Any]]

    @property
    def num_subgraphs(self) -> int:
        """Number of TVM programs."""
        return len(self.segments)

    @property
    def num_kept_operators(self) -> int:
        """Operators still run by TorchScript."""
        return sum(self.kept_operators.values())

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PartitionReport":
        """Read a report written by :meth:`to_json`."""
        return cls(**json.loads(text))

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.offloaded_operators} of {self.num_operators} operators offloaded to "
                 f"TVM in {self.num_subgraphs} subgraph(s); {self.num_kept_operators} kept in "
                 "TorchScript"]
        for kind, count in sorted(self.kept_operators.items()):
            reason = self.kept_reasons.get(kind, "")
            lines.append(f"  kept {kind} x{count}" + (f": {reason}" if reason else ""))
        return "\n".join(lines)


def partition_report(module: torch.jit.ScriptModule) -> PartitionReport:
    """The report stored on a module returned by :func:`partition` (also after loading)."""
    if not hasattr(module, REPORT_ATTRIBUTE):
        raise ValueError("tvm.contrib.torch: this module was not made by partition(); it has no "
                         f"'{REPORT_ATTRIBUTE}' attribute")
    return PartitionReport.from_json(getattr(module, REPORT_ATTRIBUTE))


def count_operators(graph: torch._C.Graph, exclude=()) -> Dict[str, int]:
    """Operators by kind, not counting ``exclude`` nodes and what their blocks hold."""
    excluded = set(exclude)
    counts: Dict[str, int] = collections.Counter()

    def visit(block):
        for node in block.nodes():
            if node in excluded:
                continue
            if is_operator(node):
                counts[node.kind()] += 1
            for sub in node.blocks():
                visit(sub)

    visit(graph.block())
    return dict(counts)


def kept_reasons(classes: Classification, graph: torch._C.Graph) -> Dict[str, str]:
    """For each operator kind still in ``graph``, the first reason one of them was kept."""
    reasons: Dict[str, str] = {}
    for node in walk_nodes(graph.block()):
        if is_operator(node) and node in classes.reasons:
            reasons.setdefault(node.kind(), classes.reasons[node])
    return reasons


def full_compilation_error(kept: Dict[str, int], reasons: Dict[str, str]) -> ConversionError:
    """The error ``require_full_compilation`` raises, one line per kept kind."""
    lines = [f"  {kind} x{count}: {reasons.get(kind, 'kept')}"
             for kind, count in sorted(kept.items())]
    return ConversionError("tvm.contrib.torch.partition: require_full_compilation is set but "
                           "these operators would stay in TorchScript:\n" + "\n".join(lines))


__all__ = ["PartitionReport", "REPORT_ATTRIBUTE", "count_operators", "full_compilation_error",
           "kept_reasons", "partition_report"]
