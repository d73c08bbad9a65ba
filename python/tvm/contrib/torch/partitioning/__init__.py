"""Partial offload: compile the parts of a TorchScript model TVM supports, keep the rest.

One module per step, in the order :func:`partition` runs them: :mod:`.recording` (tensor types
of one run), :mod:`.classification` (which nodes TVM may take), :mod:`.segments` (runs of
them and their inputs/outputs), :mod:`.rewrite` (a run's subgraph, and the graph rewritten to
call its program), :mod:`.report` (what was offloaded) and :mod:`.driver` (the entry point).
"""
from __future__ import annotations

from .driver import partition, partition_with_options
from .report import PartitionReport, partition_report

__all__ = ["PartitionReport", "partition", "partition_report", "partition_with_options"]
