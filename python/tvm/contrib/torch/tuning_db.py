"""Tuning databases: list what a tuning log holds, and merge logs into one.

A tuning log (``tuning_log_file``, see :mod:`.tuning`) is a MetaSchedule JSON database: a
kernel tuned for one model is reused by every model that has the same kernel on the same
target. Merging the logs of several runs or machines into one shares those records, so that no
kernel is tuned twice. ``python -m tvm.contrib.torch tuning-db list LOG`` and
``python -m tvm.contrib.torch tuning-db merge LOG... -o MERGED`` are the command-line forms.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Dict, List, Sequence

from tvm.s_tir import meta_schedule as ms
from tvm_ffi import structural_hash

from .tuning import open_database


@dataclasses.dataclass
class WorkloadSummary:
    """The records a tuning log holds for one kernel (workload).

    Attributes
    ----------
    kernel : str
        The kernel's function name (``main`` when the workload does not name it).
    target : str
        The target of its best record.
    records : int
        Measured candidates recorded.
    best_us : float
        The best candidate's mean run time, in microseconds (``inf`` if none ran).
    """

    kernel: str
    target: str
    records: int
    best_us: float


def _existing(log_file: str) -> str:
    path = os.path.abspath(log_file)
    if not os.path.isfile(path) or not os.path.isfile(path + ".workloads"):
        raise FileNotFoundError(f"no tuning log at {log_file} (expected {log_file} and "
                                f"{log_file}.workloads)")
    return path


def _mean_us(record: ms.database.TuningRecord) -> float:
    secs = [float(s) for s in record.run_secs or []]
    return statistics.mean(secs) * 1e6 if secs else float("inf")


def _target_name(target) -> str:
    """``llvm -mcpu=znver4`` rather than the target's whole JSON."""
    mcpu = target.attrs.get("mcpu") if hasattr(target, "attrs") else None
    return f"{target.kind.name} -mcpu={mcpu}" if mcpu else str(target.kind.name)


def _kernel_name(workload: ms.database.Workload) -> str:
    names = [gv.name_hint for gv in workload.mod.get_global_vars()]
    if len(names) == 1 and names[0] == "main":
        func = workload.mod["main"]
        symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
        return str(symbol) if symbol else "main"
    return ",".join(names)


def summarize(log_file: str) -> List[WorkloadSummary]:
    """What a tuning log holds, one row per kernel, heaviest-tuned first.

    Raises
    ------
    FileNotFoundError
        If ``log_file`` (or its ``.workloads`` file) does not exist.
    """
    database = open_database(_existing(log_file))
    rows: Dict[int, WorkloadSummary] = {}
    for record in database.get_all_tuning_records():
        key = structural_hash(record.workload.mod)
        row = rows.setdefault(key, WorkloadSummary(_kernel_name(record.workload),
                                                   _target_name(record.target), 0,
                                                   float("inf")))
        row.records += 1
        mean = _mean_us(record)
        if mean < row.best_us:
            row.best_us, row.target = mean, _target_name(record.target)
    return sorted(rows.values(), key=lambda r: (-r.records, r.kernel))


def merge(sources: Sequence[str], destination: str) -> int:
    """Add every record of ``sources`` to ``destination`` (created if missing).

    Records ``destination`` already holds (the same schedule for the same kernel and target)
    are not added again.

    Returns
    -------
    int
        The number of records added.

    Raises
    ------
    FileNotFoundError
        If a source log does not exist.
    """
    paths = [_existing(s) for s in sources]
    target_db = open_database(destination)
    # A record's JSON names its schedule, target and timings but not its kernel.
    seen = {f"{structural_hash(r.workload.mod)}|{r.as_json()}"
            for r in target_db.get_all_tuning_records()}
    added = 0
    for path in paths:
        if os.path.abspath(path) == os.path.abspath(destination):
            continue
        for record in open_database(path).get_all_tuning_records():
            workload = target_db.commit_workload(record.workload.mod)
            merged = ms.database.TuningRecord(record.trace, workload, record.run_secs,
                                              record.target, record.args_info)
            text = f"{structural_hash(workload.mod)}|{merged.as_json()}"
            if text in seen:
                continue
            target_db.commit_tuning_record(merged)
            seen.add(text)
            added += 1
    return added


def table(rows: Sequence[WorkloadSummary]) -> str:
    """``summarize``'s rows as text."""
    lines = [f"{len(rows)} kernel(s), {sum(r.records for r in rows)} record(s)",
             f"{'records':>8} {'best us':>10}  kernel (target)"]
    for row in rows:
        lines.append(f"{row.records:>8} {row.best_us:>10.1f}  {row.kernel} ({row.target})")
    return "\n".join(lines)
