"""Tuning: MetaSchedule over the kernels TVM generates (the ones not offloaded to vendor kernels).

The tuning log is a MetaSchedule JSON database: ``tuning_log_file`` holds the tuning records
and ``tuning_log_file + ".workloads"`` the workloads they refer to. A later compile with the
same log applies the best records, and tunes again only kernels that have no record yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Union

import tvm
from tqdm.auto import tqdm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

logger = logging.getLogger(__name__)

#: Seconds a candidate may take to build (including a builder worker's start-up).
BUILD_TIMEOUT_S = 300
#: Seconds a candidate may take to run its measurements.
RUN_TIMEOUT_S = 120


def open_database(log_file: str) -> ms.database.JSONDatabase:
    """The JSON database behind a tuning log (created if missing)."""
    log_file = os.path.abspath(log_file)
    directory = os.path.dirname(log_file)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=log_file + ".workloads",
                                    path_tuning_record=log_file, allow_missing=True)


@derived_object
class _ProgressBar(ms.measure_callback.PyMeasureCallback):
    """Advances a tqdm bar by the number of candidates measured."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        self.bar.update(len(runner_results))


def _kernels_to_tune(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse, as the build does, so that the tuned kernels are the built ones."""
    generic = relax.backend.cpu_generic.pipeline
    with target:
        return tvm.transform.Sequential(generic.legalize_passes(target))(mod)


def untuned_tasks(mod: tvm.IRModule, target: tvm.target.Target, database) -> List:
    """The tuning tasks of ``mod`` that ``database`` holds no record for."""
    tasks = ms.relax_integration.extract_tasks(_kernels_to_tune(mod, target), target)
    missing = []
    for task in tasks:
        mod_task = task.dispatched[0]
        if not database.has_workload(mod_task):
            missing.append(task)
            continue
        workload = database.commit_workload(mod_task)
        if not database.get_top_k(workload, 1):
            missing.append(task)
    return missing


@dataclasses.dataclass
class TuneSettings:
    """MetaSchedule's knobs beyond the trial budget (``optimize_torch`` / ``as_torch`` take
    them under TVM 0.19's names); ``None`` keeps this module's defaults.

    ``builder`` / ``runner`` default to local ones with generous timeouts (see
    :data:`BUILD_TIMEOUT_S`); ``measure_callbacks`` gets the progress bar appended.
    """

    max_trials_per_task: Optional[int] = None
    num_trials_per_iter: Optional[int] = None
    builder: Any = None
    runner: Any = None
    cost_model: Any = "xgb"
    measure_callbacks: Any = "default"
    task_scheduler: Any = "gradient"
    space: Any = "post-order-apply"
    strategy: Any = "evolutionary"
    num_tuning_cores: Union[str, int] = "physical"
    seed: Optional[int] = None


#: The process's local builder and runner, made on first use and shared by every tuning
#: call: the runner's worker starts once per process instead of once per call (the builder
#: starts fresh workers for every batch by MetaSchedule's design; :func:`build_candidate`
#: keeps their start-up cheap).
_SHARED: Dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(kind: str, make: Callable[[], Any]) -> Any:
    with _SHARED_LOCK:
        if kind not in _SHARED:
            _SHARED[kind] = make()
        return _SHARED[kind]


def _is_local(given: Any) -> bool:
    return given is None or (isinstance(given, str) and given == "local")


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's ``default_build`` without its import of ``tvm.s_tir.tensor_intrin``.

    That import only registers tensor intrinsics, which scheduling (``tensorize``, in this
    process) looks up; a candidate arrives already scheduled, and lowering it consults no
    registry. Builder workers start afresh for every batch, and the import costs each of them
    about a minute of CPU (it parses every intrinsic's TVMScript).
    """
    # pylint: disable=import-outside-toplevel
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def local_builder(given: Any = None) -> Any:
    """``given``, or for ``None`` / ``"local"`` (MetaSchedule's default spelling) the shared
    local builder: :func:`build_candidate` and a timeout that suits slow worker start-ups
    (:data:`BUILD_TIMEOUT_S`)."""
    if _is_local(given):
        return _shared("builder", lambda: ms.builder.LocalBuilder(
            timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate))
    return given


def local_runner(given: Any = None) -> Any:
    """``given``, or for ``None`` / ``"local"`` the shared local runner
    (:data:`RUN_TIMEOUT_S`)."""
    if _is_local(given):
        return _shared("runner", lambda: ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S))
    return given


#: The logger MetaSchedule configures (with ``logging.config.dictConfig``) on every tuning call.
_MS_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def meta_schedule_logging():
    """Let MetaSchedule configure its logger while handlers it did not make are on it.

    TVM 0.27 rebuilds that logger's configuration from the names of the handlers on it and
    fails (``'NoneType' object has no attribute 'format'``) on any it did not create, such as
    pytest's log capture or an application's own: those are detached for the call and put
    back after.
    """
    log = logging.getLogger(_MS_LOGGER)
    foreign = [h for h in log.handlers if not (h.get_name() or "").startswith(_MS_LOGGER)]
    for handler in foreign:
        log.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            if handler not in log.handlers:
                log.addHandler(handler)


def _callbacks(given: Any, bar) -> List:
    if isinstance(given, str):
        given = ms.measure_callback.MeasureCallback.create(given)
    elif not isinstance(given, (list, tuple)):
        given = [given]
    return list(given) + [_ProgressBar(bar)]


def tune(mod: tvm.IRModule, target: tvm.target.Target, n_trials: int, log_file: str,
         settings: Optional[TuneSettings] = None) -> int:
    """Tune the kernels of a prepared Relax module, recording into ``log_file``.

    Parameters
    ----------
    mod : tvm.IRModule
        From :func:`tvm.contrib.torch.passes.prepare_for_build`.
    target : tvm.target.Target
        The build target.
    n_trials : int
        MetaSchedule's global trial budget.
    log_file : str
        The tuning log (see the module docstring).
    settings : TuneSettings, optional
        MetaSchedule's other knobs.

    Returns
    -------
    int
        The number of candidates measured (0 when the log already covered every kernel).
    """
    settings = settings or TuneSettings()
    database = open_database(log_file)
    missing = untuned_tasks(mod, target, database)
    if not missing:
        logger.info("tuning log %s covers every kernel; nothing to measure", log_file)
        return 0
    logger.info("tuning %d kernel(s) with %d trials", len(missing), n_trials)
    per_task = max(1, n_trials // max(1, len(missing)))
    with tqdm(total=n_trials, desc="MetaSchedule", unit="trial") as bar, \
            meta_schedule_logging():
        with tempfile.TemporaryDirectory(prefix="tvm_torch_tune_") as work_dir:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                missing, work_dir=work_dir, space=settings.space, strategy=settings.strategy,
                num_threads=settings.num_tuning_cores, seed=settings.seed)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work_dir,
                max_trials_global=n_trials,
                max_trials_per_task=settings.max_trials_per_task or per_task,
                num_trials_per_iter=settings.num_trials_per_iter or min(64, per_task),
                database=database,
                cost_model=settings.cost_model,
                measure_callbacks=_callbacks(settings.measure_callbacks, bar),
                task_scheduler=settings.task_scheduler,
                # Workers start a fresh interpreter (importing TVM takes seconds on small
                # machines): generous timeouts keep slow starts from counting as failures.
                builder=local_builder(settings.builder),
                runner=local_runner(settings.runner),
            )
        return bar.n
