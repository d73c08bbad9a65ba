"""Tuning progress: the tqdm bar over trials (best latency so far per task), the end-of-run
summary, and stopping a run whose RPC measurements can no longer succeed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import tuning_rpc
from .errors import TuningError
from .options import TuningRPC


@dataclasses.dataclass
class TaskTuning:
    """One kernel's tuning.

    Attributes
    ----------
    name : str
        MetaSchedule's task name (the fused kernel's).
    weight : float
        How many times the model calls the kernel per run.
    trials : int
        Candidates measured (failed ones included).
    failed : int
        Candidates whose build or measurement failed.
    first_ms, best_ms : float or None
        The mean latency of the first candidate measured successfully, and of the best one.
    """

    name: str
    weight: float
    trials: int = 0
    failed: int = 0
    first_ms: Optional[float] = None
    best_ms: Optional[float] = None

    def record(self, latencies_ms: Sequence[Optional[float]]) -> None:
        """Count one batch's results (``None`` for a failed candidate)."""
        for latency in latencies_ms:
            self.trials += 1
            if latency is None:
                self.failed += 1
                continue
            if self.first_ms is None:
                self.first_ms = latency
            self.best_ms = latency if self.best_ms is None else min(self.best_ms, latency)


@dataclasses.dataclass
class TuningSummary:
    """What one tuning run did (:func:`tvm.contrib.torch.tuning.tune`'s result).

    Attributes
    ----------
    tasks : list of TaskTuning
        The kernels tuned (the ones the log had no record for).
    reused : int
        Kernels whose records the log already held (not measured again).
    wall_s : float
        Seconds the run took.
    measured_on : str
        ``"this machine"`` or the tracker's servers.
    light : int
        Kernels left untuned because the profile showed them light
        (``tuning_kernels="heavy"``).
    """

    tasks: List[TaskTuning]
    reused: int
    wall_s: float
    measured_on: str = "this machine"
    light: int = 0

    @property
    def trials(self) -> int:
        """Candidates measured, over all tasks."""
        return sum(t.trials for t in self.tasks)

    @property
    def failed(self) -> int:
        """Candidates whose build or measurement failed."""
        return sum(t.failed for t in self.tasks)

    @property
    def estimated_speedup(self) -> Optional[float]:
        """``sum(weight * first_ms) / sum(weight * best_ms)`` over the tasks with a successful
        measurement: how much faster the tuned kernels run than the first candidate
        MetaSchedule measured for each (a sample of its search space, not the build's default
        schedule), weighted by how often the model calls each. ``None`` without measurements.
        """
        measured = [t for t in self.tasks if t.best_ms is not None]
        best = sum(t.weight * t.best_ms for t in measured)
        if not measured or best <= 0:
            return None
        return sum(t.weight * t.first_ms for t in measured) / best

    def text(self) -> str:
        """One paragraph for the log."""
        light = f", {self.light} light one(s) left untuned" if self.light else ""
        if not self.tasks:
            return (f"tuning: 0 kernel(s) tuned ({self.reused} taken from the log{light}), 0 "
                    f"trial(s) in {self.wall_s:.1f} s: nothing to measure")
        speedup = self.estimated_speedup
        lines = [f"tuning: {len(self.tasks)} kernel(s) tuned ({self.reused} taken from the "
                 f"log{light}), {self.trials} trial(s) ({self.failed} failed) measured on "
                 f"{self.measured_on} in {self.wall_s:.1f} s"
                 + (f"; estimated speed-up {speedup:.2f}x over the first candidates"
                    if speedup is not None else "")]
        for task in self.tasks:
            if task.best_ms is None:
                lines.append(f"  {task.name} (x{task.weight:g}): {task.trials} trial(s), "
                             "none measured successfully")
            else:
                lines.append(f"  {task.name} (x{task.weight:g}): {task.trials} trial(s), "
                             f"first {task.first_ms:.4g} ms, best {task.best_ms:.4g} ms")
        return "\n".join(lines)


def _latency_ms(result: Any) -> Optional[float]:
    if result.error_msg or not result.run_secs:
        return None
    secs = [float(getattr(s, "value", s)) for s in result.run_secs]
    return 1e3 * sum(secs) / len(secs)


@derived_object
class ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Advances a tqdm bar by the candidates measured, shows the task's best latency so far,
    records each task's :class:`TaskTuning`, and (measuring over RPC) stops the run with a
    :class:`TuningError` when the tracker became unreachable or a whole batch failed.

    Parameters
    ----------
    bar : tqdm
        The bar over trials.
    tasks : list of TaskTuning
        One per tuning context, in the scheduler's order.
    rpc : TuningRPC, optional
        Where candidates are measured.
    log_file : str
        The tuning log (named in errors: its records stay).
    """

    def __init__(self, bar: Any, tasks: List[TaskTuning], rpc: Optional[TuningRPC],
                 log_file: str):
        super().__init__()
        self.bar = bar
        self.tasks = tasks
        self.rpc = rpc
        self.log_file = log_file
        #: The error that stopped the run (MetaSchedule's C++ side may re-raise it as its own).
        self.error: Optional[TuningError] = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        del task_scheduler, measure_candidates
        task = self.tasks[task_id]
        latencies = [_latency_ms(result) for result in runner_results]
        task.record(latencies)
        if task.best_ms is not None:
            self.bar.set_postfix_str(f"task {task_id + 1}/{len(self.tasks)} {task.name}: best "
                                     f"{task.best_ms:.4g} ms", refresh=False)
        self.bar.update(len(runner_results))
        # Candidates that failed to build here were never sent to the servers.
        sent = [(r, x) for b, r, x in zip(builder_results, runner_results, latencies)
                if not b.error_msg]
        if self.rpc is not None and any(x is None for _, x in sent):
            self._check_rpc(task, sent)

    def _check_rpc(self, task: TaskTuning, sent) -> None:
        done = sum(t.trials for t in self.tasks)
        measured = done - sum(t.failed for t in self.tasks)
        cause = tuning_rpc.unreachable(self.rpc)
        if cause is not None:
            message = (f"the RPC tracker at {self.rpc.tracker} became unreachable during "
                       f"tuning ({cause}) after {done} trial(s), {measured} measured")
        elif all(x is None for _, x in sent):
            first = next((r.error_msg for r, _ in sent if r.error_msg), "no result")
            message = (f"every measurement of the last batch of {task.name} ({len(sent)} "
                       f"candidate(s)) failed on {tuning_rpc.describe(self.rpc)}; the first "
                       f"error: {str(first).strip()[-600:]}")
        else:
            return
        self.error = TuningError(f"tvm.contrib.torch tuning: {message}. The records measured "
                                 f"before are in {self.log_file} (a later run with it tunes "
                                 "only the kernels it has no record for).")
        raise self.error


__all__ = ["ProgressCallback", "TaskTuning", "TuningSummary"]
