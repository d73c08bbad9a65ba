"""``as_torch``: a TVMScript ``PrimFunc`` / ``IRModule`` as a ``torch.nn.Module``.

The decorated function is TVM 0.27 TVMScript (``from tvm.script import tirx as T``; blocks
are ``T.sblock`` inside ``@T.prim_func(s_tir=True)``). The module builds it with
``tvm.compile`` the first time it is called, for the device its tensors are on, and calls it
destination-passing style: ``module(a, b, c)`` writes the outputs into the tensors given,
through DLPack (no copies; bool tensors included). ``tune()`` schedules it with MetaSchedule
first. The module pickles (``torch.save``) as its TVMScript and rebuilds after loading.
"""
from __future__ import annotations

import logging
import tempfile
from typing import Any, Callable, Dict, Optional, Union

import torch
import tvm
from tvm.s_tir import meta_schedule as ms

from . import build as build_mod
from . import tuning
from .options import device_name

logger = logging.getLogger(__name__)

IRModuleOrPrimFunc = Union[tvm.IRModule, tvm.tirx.PrimFunc]

#: Data alignment (bytes) TVM's DLPack import requires.
_TVM_ALIGNMENT = 64


def _entry_name(module: IRModuleOrPrimFunc) -> str:
    """The function ``forward`` calls: the PrimFunc itself, or the module's ``main`` / only
    PrimFunc."""
    if isinstance(module, tvm.tirx.PrimFunc):
        return "main"
    names = [gv.name_hint for gv, func in module.functions.items()
             if isinstance(func, tvm.tirx.PrimFunc)]
    if "main" in names:
        return "main"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"as_torch: the IRModule must have a 'main' PrimFunc or exactly one "
                     f"PrimFunc, got {sorted(names)}")


def _entry_func(module: IRModuleOrPrimFunc, name: str) -> tvm.tirx.PrimFunc:
    return module if isinstance(module, tvm.tirx.PrimFunc) else module[name]


class OperatorModuleWrapper(torch.nn.Module):
    """A TVMScript function as an ``nn.Module`` (TVM 0.19's class; alias ``TVMScriptIRModule``).

    Parameters
    ----------
    module : tvm.IRModule or tvm.tirx.PrimFunc
        The TVMScript code (kept as :attr:`ir_module`).
    """

    def __init__(self, module: IRModuleOrPrimFunc):
        super().__init__()
        if not isinstance(module, (tvm.IRModule, tvm.tirx.PrimFunc)):
            raise TypeError(f"as_torch: expected a TVMScript PrimFunc or IRModule, got "
                            f"{type(module).__name__}")
        self._entry = _entry_name(module)
        self.ir_module = module
        #: The built program and the device kind (``"cpu"`` / ``"cuda"``) it was built for.
        self.rt_module: Optional[tvm.runtime.Executable] = None
        self._rt_device: Optional[str] = None

    def tune(
        self,
        target: Union[str, tvm.target.Target] = "cpu",
        max_trials_global: int = 32,
        *,
        num_trials_per_iter: int = 32,
        builder: Any = "local",
        runner: Any = "local",
        database: Any = "json",
        cost_model: Any = "xgb",
        measure_callbacks: Any = "default",
        task_scheduler: Any = "round-robin",
        space: Any = "post-order-apply",
        strategy: Any = "replay-trace",
        num_tuning_cores: Union[str, int] = "physical",
        seed: Optional[int] = None,
    ) -> None:
        """Schedule the function with MetaSchedule, then build it for ``target``.

        Parameters
        ----------
        target : str or tvm.target.Target
            ``"cpu"`` (this machine's CPU), ``"cuda"`` or any TVM target.
        max_trials_global : int
            The trial budget.
        num_trials_per_iter, builder, runner, database, cost_model, measure_callbacks,
        task_scheduler, space, strategy, num_tuning_cores, seed
            MetaSchedule's own (``tvm.s_tir.meta_schedule.tune_tir``); ``"local"``
            builder/runner are local ones with generous timeouts.
        """
        resolved = self._target(target)
        with tempfile.TemporaryDirectory(prefix="tvm_torch_as_torch_") as work_dir, \
                tuning.meta_schedule_logging():
            tuned = ms.tir_integration.tune_tir(
                mod=self.ir_module, target=resolved, work_dir=work_dir,
                max_trials_global=max_trials_global, num_trials_per_iter=num_trials_per_iter,
                builder=tuning.local_builder(builder), runner=tuning.local_runner(runner),
                database=database, cost_model=cost_model, measure_callbacks=measure_callbacks,
                task_scheduler=task_scheduler, space=space, strategy=strategy,
                num_tuning_cores=num_tuning_cores, seed=seed)
            schedule = ms.tir_integration.compile_tir(tuned, self.ir_module, resolved)
        if schedule is None:
            logger.warning("as_torch.tune: MetaSchedule found no valid schedule in %d trials; "
                           "keeping the function as written", max_trials_global)
        else:
            self.ir_module = schedule.mod
            self._entry = _entry_name(self.ir_module)
        self.build(resolved)

    def script(self) -> str:
        """The TVMScript of the function (scheduled, after :meth:`tune`)."""
        return self.ir_module.script()

    @staticmethod
    def _target(target: Union[None, str, dict, tvm.target.Target]) -> tvm.target.Target:
        if isinstance(target, str) and target == "cpu":
            target = None
        return build_mod.resolve_target(target, "cpu")

    def build(self, target: Union[None, str, dict, tvm.target.Target] = None) -> None:
        """Compile for ``target`` (default: this machine's CPU; ``"cuda"``: the current GPU)."""
        resolved = self._target(target)
        self.rt_module = tvm.compile(self.ir_module, target=resolved)
        # A CUDA build runs on whichever GPU its tensors are on: the kind is what matters.
        self._rt_device = "cuda" if build_mod.is_cuda(resolved) else "cpu"

    def forward(self, *torch_inputs: torch.Tensor) -> None:
        """Call the function on the tensors, in its parameter order (outputs included: they
        are written in place). Builds for the tensors' device when not built for it yet."""
        params = _entry_func(self.ir_module, self._entry).params
        if len(torch_inputs) != len(params):
            raise ValueError(f"as_torch: the function takes {len(params)} tensors "
                             f"({[p.name for p in params]}), got {len(torch_inputs)}")
        devices = set()
        for index, tensor in enumerate(torch_inputs):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"as_torch: argument {index} must be a torch.Tensor, got "
                                f"{type(tensor).__name__}")
            if not tensor.is_contiguous():
                # Outputs are written in place: a copy would lose them.
                raise ValueError(f"as_torch: argument {index} must be contiguous (TVMScript "
                                 "buffers are dense); call .contiguous() first")
            devices.add(device_name(tensor.device, f"argument {index}"))
        if len(devices) != 1:
            raise ValueError(f"as_torch: the tensors are on different devices {sorted(devices)}")
        kind = devices.pop().split(":")[0]
        if self.rt_module is None or self._rt_device != kind:
            self.build("cuda" if kind == "cuda" else None)
        func = self.rt_module[self._entry]
        # TVM takes tensors aligned to 64 bytes; others (torch.from_numpy's) run on an aligned
        # copy that is copied back, so that outputs still land in the caller's tensor.
        staged = [t if t.data_ptr() % _TVM_ALIGNMENT == 0 else t.clone() for t in torch_inputs]
        func(*[tvm.runtime.from_dlpack(t) for t in staged])
        for original, used in zip(torch_inputs, staged):
            if used is not original:
                original.copy_(used)

    def __getstate__(self) -> Dict[str, Any]:
        # The built program is not picklable; the TVMScript is, and rebuilds on first use.
        state = dict(self.__dict__)
        state["ir_module"] = tvm.ir.save_json(self.ir_module)
        state["rt_module"] = None
        state["_rt_device"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        state["ir_module"] = tvm.ir.load_json(state["ir_module"])
        self.__dict__.update(state)


def as_torch(func: Union[IRModuleOrPrimFunc, Callable[..., IRModuleOrPrimFunc]]):
    """Turn TVMScript into a ``torch.nn.Module`` (a decorator).

    Parameters
    ----------
    func : tvm.IRModule, tvm.tirx.PrimFunc or callable
        The TVMScript, or a function returning it (a parametrised template).

    Returns
    -------
    OperatorModuleWrapper or callable
        The module, or for a template a function taking the template's arguments and
        returning the module.
    """
    if isinstance(func, (tvm.IRModule, tvm.tirx.PrimFunc)):
        return OperatorModuleWrapper(func)
    if callable(func):

        def func_get_param(*args, **kwargs) -> OperatorModuleWrapper:
            return OperatorModuleWrapper(func(*args, **kwargs))

        return func_get_param
    raise TypeError(f"as_torch: expected a TVMScript PrimFunc, IRModule or a function "
                    f"returning one, got {type(func).__name__}")


#: TVM 0.19's exported name of the module class.
TVMScriptIRModule = OperatorModuleWrapper

__all__ = ["OperatorModuleWrapper", "TVMScriptIRModule", "as_torch"]
