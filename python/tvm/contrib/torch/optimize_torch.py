"""``optimize_torch``: TVM 0.19's one-call "trace, tune with MetaSchedule, build" entry point.

It runs this project's pipeline (:func:`tvm.contrib.torch.pipeline.compile_program`: the
vendor kernels, MetaSchedule tuning through :mod:`.tuning`, the build and the check against
the model) and wraps the resulting :class:`~tvm.contrib.torch.GraphModule` in
:class:`GraphExecutorFactoryWrapper`, whose ``forward`` takes the inputs positionally, as the
function did. The result pickles with ``torch.save`` / ``torch.load`` (the compiled programs
travel inside it) and scripts with ``torch.jit.script``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import tvm

from . import build as build_mod
from . import tuning
from .options import parse_options
from .pipeline import compile_program

logger = logging.getLogger(__name__)

#: Positional inputs :class:`GraphExecutorFactoryWrapper` takes (TorchScript has no
#: ``*args``, so its ``forward`` spells them out).
MAX_INPUTS = 8


def _gather(x0: torch.Tensor, x1: Optional[torch.Tensor], x2: Optional[torch.Tensor],
            x3: Optional[torch.Tensor], x4: Optional[torch.Tensor], x5: Optional[torch.Tensor],
            x6: Optional[torch.Tensor], x7: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """The inputs given, in order (the runtime module checks their count)."""
    inputs = [x0]
    for tensor in [x1, x2, x3, x4, x5, x6, x7]:
        if tensor is not None:
            inputs.append(tensor)
    return inputs


class GraphExecutorFactoryWrapper(torch.nn.Module):
    """What :func:`optimize_torch` returns for a single-output function: ``forward(*inputs)``
    returns the tensor (TVM 0.19's class name).

    Parameters
    ----------
    module : torch.nn.Module
        The compiled :class:`~tvm.contrib.torch.GraphModule` (``forward(List[Tensor])``), kept
        as :attr:`inner_module`.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner_module = module

    def forward(self, x0: torch.Tensor, x1: Optional[torch.Tensor] = None,
                x2: Optional[torch.Tensor] = None, x3: Optional[torch.Tensor] = None,
                x4: Optional[torch.Tensor] = None, x5: Optional[torch.Tensor] = None,
                x6: Optional[torch.Tensor] = None,
                x7: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the compiled program on the inputs, given positionally."""
        return self.inner_module(_gather(x0, x1, x2, x3, x4, x5, x6, x7))[0]


class MultiOutputGraphExecutorWrapper(GraphExecutorFactoryWrapper):
    """What :func:`optimize_torch` returns for a function with several outputs: ``forward``
    returns them as a list (as TVM 0.19's wrapper did)."""

    def forward(self, x0: torch.Tensor, x1: Optional[torch.Tensor] = None,  # type: ignore[override]
                x2: Optional[torch.Tensor] = None, x3: Optional[torch.Tensor] = None,
                x4: Optional[torch.Tensor] = None, x5: Optional[torch.Tensor] = None,
                x6: Optional[torch.Tensor] = None,
                x7: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Run the compiled program on the inputs, given positionally."""
        return self.inner_module(_gather(x0, x1, x2, x3, x4, x5, x6, x7))


class _FunctionModule(torch.nn.Module):
    """A plain function as a module, for the pipeline's ``torch.export`` front end."""

    def __init__(self, func: Callable):
        super().__init__()
        self.func = func

    def forward(self, *inputs):
        return self.func(*inputs)


def _example_tuple(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (list, tuple)) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError(f"optimize_torch: example_inputs must be a tensor or a non-empty tuple "
                        f"of tensors, got {type(example_inputs).__name__}")
    if len(example_inputs) > MAX_INPUTS:
        raise ValueError(f"optimize_torch: the result takes at most {MAX_INPUTS} positional "
                         f"inputs, got {len(example_inputs)} example inputs; use "
                         "tvm.contrib.torch.compile (forward(List[Tensor])) instead")
    return tuple(example_inputs)


def _target_and_device(target: Any, examples: Sequence[torch.Tensor]) -> Tuple[Any, str]:
    """``"cpu"`` is this machine's CPU (the pipeline's host target); the device is where the
    example inputs are, or CUDA for a CUDA target."""
    kinds = sorted({t.device.type for t in examples})
    if not set(kinds) <= {"cpu", "cuda"}:
        raise ValueError(f"optimize_torch: the example inputs must be on the CPU or a CUDA "
                         f"GPU, got {kinds}")
    on_cuda = [t.device for t in examples if t.device.type == "cuda"]
    if isinstance(target, str) and target == "cpu":
        if on_cuda:
            raise ValueError(f"optimize_torch: target 'cpu' but the example inputs are on "
                             f"{on_cuda[0]}")
        return None, "cpu"
    if not isinstance(target, (str, dict, tvm.target.Target)):
        raise TypeError(f"optimize_torch: target must be 'cpu', a target string, dict or "
                        f"tvm.target.Target, got {type(target).__name__}")
    resolved = build_mod.resolve_target(target, "cpu")  # "llvm": this CPU, with its features
    if build_mod.is_cuda(resolved):
        return resolved, str(on_cuda[0]) if on_cuda else "cuda"
    if on_cuda:
        raise ValueError(f"optimize_torch: target {resolved.kind.name!r} but the example "
                         f"inputs are on {on_cuda[0]}")
    return resolved, "cpu"


def _directories(work_dir: Optional[str]):
    """``work_dir`` itself (kept), or a temporary one removed when the build is loaded."""
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
        return contextlib.nullcontext(os.path.abspath(work_dir))
    return tempfile.TemporaryDirectory(prefix="tvm_torch_optimize_")


def optimize_torch(
    func: Union[Callable, torch.nn.Module],
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    max_trials_global: int,
    work_dir: Optional[str] = None,
    target: Union[str, dict, tvm.target.Target] = "cpu",
    max_trials_per_task: Optional[int] = None,
    num_trials_per_iter: int = 64,
    builder: Any = "local",
    runner: Any = "local",
    database: str = "json",
    cost_model: Any = "xgb",
    measure_callbacks: Any = "default",
    task_scheduler: Any = "gradient",
    space: Any = "post-order-apply",
    strategy: Any = "evolutionary",
    seed: Optional[int] = None,
    tuning_rpc: Any = None,
    tuning_builders: Optional[int] = None,
) -> GraphExecutorFactoryWrapper:
    """Compile a function or module at its example inputs, tuning it with MetaSchedule.

    Parameters
    ----------
    func : callable or torch.nn.Module
        A function of tensors or a module (eager, traced or scripted).
    example_inputs : torch.Tensor or tuple of torch.Tensor
        The inputs to compile for (their shapes and dtypes; bool included). The compiled
        program is checked against ``func`` on them.
    max_trials_global : int
        MetaSchedule's global trial budget; ``0`` builds with the default schedules.
    work_dir : str, optional
        Keeps the tuning log (``tuning.log`` and ``tuning.log.workloads``, re-used by a later
        call with the same ``work_dir``) and the compiled files (``compiled/``). Default: a
        temporary directory.
    target : str, dict or tvm.target.Target
        ``"cpu"`` (default: this machine's CPU, its features and cores), or any TVM target
        (``"cuda"``, ``"nvidia/nvidia-a100"``, ...).
    max_trials_per_task, num_trials_per_iter, builder, runner, cost_model, measure_callbacks,
    task_scheduler, space, strategy, seed
        MetaSchedule's own, as in ``tvm.s_tir.meta_schedule.tune_tasks``. ``"local"``
        builder/runner are local ones with generous timeouts.
    database : str
        ``"json"`` (the log in ``work_dir``) or ``"memory"`` (discarded after the build).
    tuning_rpc : dict, optional
        Measure on the RPC servers of a TVM tracker instead of ``runner``: ``{"tracker":
        "host:port", "key": KEY[, "workers": N][, "timeout_s": S]}``, as the compile option.
    tuning_builders : int, optional
        Local processes building candidates (instead of ``builder``), as the compile option.

    Returns
    -------
    GraphExecutorFactoryWrapper
        ``forward(*inputs)`` returning the output tensor (a list for several outputs); the
        compiled :class:`~tvm.contrib.torch.GraphModule` is ``inner_module``.

    Raises
    ------
    ConversionError
        When ``func`` cannot be converted or built, or its compiled outputs differ from it.
    TuningError
        With ``tuning_rpc``: the tracker is unreachable, has no free server for the key, or
        was lost during tuning.
    """
    examples = _example_tuple(example_inputs)
    if not isinstance(max_trials_global, int) or isinstance(max_trials_global, bool) or \
            max_trials_global < 0:
        raise ValueError(f"optimize_torch: max_trials_global must be an int >= 0, got "
                         f"{max_trials_global!r}")
    if database not in ("json", "memory"):
        raise ValueError(f"optimize_torch: database must be 'json' (kept in work_dir) or "
                         f"'memory', got {database!r}")
    resolved_target, device = _target_and_device(target, examples)
    if not callable(func):
        raise TypeError(f"optimize_torch: func must be a callable or torch.nn.Module, got "
                        f"{type(func).__name__}")
    module = func if isinstance(func, (torch.nn.Module, torch.jit.ScriptFunction)) \
        else _FunctionModule(func)
    with _directories(work_dir) as directory, \
            tempfile.TemporaryDirectory(prefix="tvm_torch_memory_db_") as scratch:
        log_dir = directory if database == "json" else scratch
        infos = [(f"inp_{i}", tuple(t.shape), str(t.dtype).replace("torch.", ""))
                 for i, t in enumerate(examples)]
        tuning_keys = {k: v for k, v in (("tuning_rpc", tuning_rpc),
                                         ("tuning_builders", tuning_builders)) if v is not None}
        options = parse_options({
            "input_infos": infos,
            "target": resolved_target,
            "device": device,
            "tuning_n_trials": max_trials_global,
            "tuning_log_file": os.path.join(log_dir, "tuning.log"),
            "export_dir": os.path.join(directory, "compiled"),
            "example_inputs": examples,
            **tuning_keys,
        })
        settings = tuning.TuneSettings(
            max_trials_per_task=max_trials_per_task, num_trials_per_iter=num_trials_per_iter,
            builder=builder, runner=runner, cost_model=cost_model,
            measure_callbacks=measure_callbacks, task_scheduler=task_scheduler, space=space,
            strategy=strategy, seed=seed, rpc=options.tuning_rpc,
            builders=options.tuning_builders)
        compiled = compile_program(module, options.buckets, options, options.export_dir,
                                   settings)
    if int(compiled.engine.num_outputs()) == 1:
        return GraphExecutorFactoryWrapper(compiled)
    return MultiOutputGraphExecutorWrapper(compiled)


__all__ = ["GraphExecutorFactoryWrapper", "MultiOutputGraphExecutorWrapper", "optimize_torch"]
