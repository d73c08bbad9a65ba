"""Tuning: MetaSchedule over the kernels TVM generates (the ones not offloaded to vendor kernels).

The tuning log is a MetaSchedule JSON database: ``tuning_log_file`` holds the tuning records
and ``tuning_log_file + ".workloads"`` the workloads they refer to. A later compile with the
same log applies the best records, and tunes again only kernels that have no record yet.
Candidates are built by local processes (``tuning_builders`` of them) and measured here or,
with ``tuning_rpc``, on the RPC servers of a TVM tracker (:mod:`.tuning_rpc`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import tvm
from tqdm.auto import tqdm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from . import tuning_rpc
from .options import TuningRPC
from .tuning_progress import ProgressCallback, TaskTuning, TuningSummary

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


def _kernels_to_tune(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse, as the build does, so that the tuned kernels are the built ones."""
    generic = relax.backend.cpu_generic.pipeline
    with target:
        return tvm.transform.Sequential(generic.legalize_passes(target))(mod)


def untuned_tasks(mod: tvm.IRModule, target: tvm.target.Target, database) -> List:
    """The tuning tasks of ``mod`` that ``database`` holds no record for."""
    return _tasks(mod, target, database)[0]


def _tasks(mod: tvm.IRModule, target: tvm.target.Target, database) -> Tuple[List, int]:
    """The tuning tasks ``database`` holds no record for, and the number of those it does."""
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
    return missing, len(tasks) - len(missing)


@dataclasses.dataclass
class TuneSettings:
    """MetaSchedule's knobs beyond the trial budget (``optimize_torch`` / ``as_torch`` take
    them under TVM 0.19's names); ``None`` keeps this module's defaults.

    ``builder`` / ``runner`` default to local ones with generous timeouts (see
    :data:`BUILD_TIMEOUT_S`); ``measure_callbacks`` gets the progress bar appended. ``rpc``
    (the ``tuning_rpc`` option) measures on a tracker's servers instead of ``runner``;
    ``builders`` (``tuning_builders``) sets the local builder's processes.
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
    rpc: Optional[TuningRPC] = None
    builders: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rpc is not None and not _is_local(self.runner):
            raise ValueError("tvm.contrib.torch tuning: give either a runner or tuning_rpc "
                             f"(which makes an RPC runner), not both; got runner={self.runner!r}")
        if self.builders is not None and not _is_local(self.builder):
            raise ValueError("tvm.contrib.torch tuning: give either a builder or "
                             f"tuning_builders, not both; got builder={self.builder!r}")


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


def local_builder(given: Any = None, workers: Optional[int] = None) -> Any:
    """``given``, or for ``None`` / ``"local"`` (MetaSchedule's default spelling) the shared
    local builder with ``workers`` processes (default: one per physical core):
    :func:`build_candidate` and a timeout that suits slow worker start-ups
    (:data:`BUILD_TIMEOUT_S`)."""
    if _is_local(given):
        return _shared(f"builder/{workers}", lambda: ms.builder.LocalBuilder(
            max_workers=workers, timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate))
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


def _callbacks(given: Any, progress: ProgressCallback) -> List:
    if isinstance(given, str):
        given = ms.measure_callback.MeasureCallback.create(given)
    elif not isinstance(given, (list, tuple)):
        given = [given]
    # Last: the database has the batch's records when the progress check stops a run.
    return list(given) + [progress]


@contextlib.contextmanager
def _runner(settings: TuneSettings):
    """The runner for ``settings`` and where it measures (an RPC runner's pool is shut down
    after the run; the shared local one is kept)."""
    if settings.rpc is None:
        yield local_runner(settings.runner), "this machine"
        return
    status = tuning_rpc.check_tracker(settings.rpc)
    workers = settings.rpc.workers or status.servers
    logger.info("measuring on %s: %d server(s), %d free; %d measurement(s) at once",
                tuning_rpc.describe(settings.rpc), status.servers, status.free, workers)
    runner = tuning_rpc.rpc_runner(settings.rpc, workers)
    try:
        yield runner, tuning_rpc.describe(settings.rpc)
    finally:
        runner.pool.shutdown(wait=False)


#: ``tuning_kernels="heavy"`` tunes the heaviest TVM kernels that together take this share of
#: the profiled TVM-kernel time.
HEAVY_SHARE = 0.9


def heavy_kernels(kernel_ms: Dict[str, float], share: float = HEAVY_SHARE) -> List[str]:
    """The heaviest kernels of a profile (name -> ms per call) that together take ``share``
    of its total, heaviest first."""
    total = sum(kernel_ms.values())
    chosen, covered = [], 0.0
    for name, ms_ in sorted(kernel_ms.items(), key=lambda kv: -kv[1]):
        if covered >= share * total:
            break
        chosen.append(name)
        covered += ms_
    return chosen


def tune(mod: tvm.IRModule, target: tvm.target.Target, n_trials: int, log_file: str,
         settings: Optional[TuneSettings] = None,
         kernel_ms: Optional[Dict[str, float]] = None) -> TuningSummary:
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
        MetaSchedule's other knobs, ``tuning_rpc`` and ``tuning_builders``.
    kernel_ms : dict of str to float, optional
        A profile of the program (TVM kernel name -> ms per call): only the
        :func:`heavy_kernels` among the kernels to tune are tuned (``tuning_kernels="heavy"``).

    Returns
    -------
    TuningSummary
        Kernels tuned and taken from the log, trials (0 when the log already covered every
        kernel), time and estimated speed-up; also logged at INFO level.

    Raises
    ------
    TuningError
        Measuring over RPC: before tuning, when the tracker is unreachable or has no free
        server for the key; during tuning, when the tracker became unreachable or a whole
        batch of measurements failed. The records measured before stay in ``log_file``.
    """
    settings = settings or TuneSettings()
    started = time.perf_counter()
    database = open_database(log_file)
    missing, reused = _tasks(mod, target, database)
    light = 0
    if kernel_ms is not None:
        heavy = set(heavy_kernels(kernel_ms))
        light = sum(1 for task in missing if str(task.task_name) not in heavy)
        missing = [task for task in missing if str(task.task_name) in heavy]
    if not missing:
        summary = TuningSummary([], reused, time.perf_counter() - started, light=light)
        logger.info("%s (the log %s covers every kernel)", summary.text(), log_file)
        return summary
    logger.info("tuning %d kernel(s) with %d trials", len(missing), n_trials)
    per_task = max(1, n_trials // max(1, len(missing)))
    with _runner(settings) as (runner, measured_on), \
            tqdm(total=n_trials, desc="MetaSchedule", unit="trial") as bar, \
            meta_schedule_logging(), \
            tempfile.TemporaryDirectory(prefix="tvm_torch_tune_") as work_dir:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            missing, work_dir=work_dir, space=settings.space, strategy=settings.strategy,
            num_threads=settings.num_tuning_cores, seed=settings.seed)
        tasks = [TaskTuning(str(ctx.task_name), float(weight))
                 for ctx, weight in zip(contexts, weights)]
        progress = ProgressCallback(bar, tasks, settings.rpc, log_file)
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work_dir,
                max_trials_global=n_trials,
                max_trials_per_task=settings.max_trials_per_task or per_task,
                num_trials_per_iter=settings.num_trials_per_iter or min(64, per_task),
                database=database,
                cost_model=settings.cost_model,
                measure_callbacks=_callbacks(settings.measure_callbacks, progress),
                task_scheduler=settings.task_scheduler,
                # Workers start a fresh interpreter (importing TVM takes seconds on small
                # machines): generous timeouts keep slow starts from counting as failures.
                builder=local_builder(settings.builder, settings.builders),
                runner=runner,
            )
        except Exception as err:  # pylint: disable=broad-except
            # The progress check's error may come back through MetaSchedule's C++ side
            # re-raised as another type: the original is the one to raise.
            if progress.error is not None and err is not progress.error:
                raise progress.error from err
            raise
    summary = TuningSummary(tasks, reused, time.perf_counter() - started, measured_on, light)
    logger.info("%s", summary.text())
    return summary
