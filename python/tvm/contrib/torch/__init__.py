"""tvm.contrib.torch (PyTorchTVM): compile PyTorch models with TVM, run them in TorchScript.

The pipeline, one module per step: :mod:`.options` (the option table, parsed once),
:mod:`.frontend` (model -> Relax), :mod:`.passes` (Relax optimisations),
:mod:`.vendor_kernels` (oneDNN/MKL/cuDNN/cuBLAS/ATen offload), :mod:`.tuning` (MetaSchedule),
:mod:`.vendor_choice` (a tuned TVM kernel or oneDNN's, per CPU convolution, measured),
:mod:`.build` (targets, schedules, compilation), :mod:`.export` (files), :mod:`.module`
(``nn.Module`` wrappers of the ``torch.classes.tvm_class`` runtime classes),
:mod:`.pipeline` (``PyTorchTVMModule`` and ``compile_program``: the steps in order) and
:mod:`.compiler` (``compile``); :mod:`.dynamo_backend` is the ``torch.compile`` backend
``"tvm_contrib_torch"``. Partial offload: the :mod:`.partitioning` package
(``partition``: compile what TVM supports, keep the rest in TorchScript). Where the time goes:
:mod:`.profiler` (``profile``: per-kernel time of the compiled programs). TVM 0.19's other
entry points: :mod:`.optimize_torch` (``optimize_torch``), :mod:`.as_torch` (``as_torch``,
TVMScript as an ``nn.Module``), :mod:`.trace_module` (``TraceTvmModule``) and
:mod:`.pytorch_tvm` (the old module path of ``compile``).
"""
from __future__ import annotations

from ._library import load_runtime_library, runtime_library_path

load_runtime_library()

# pylint: disable=wrong-import-position
# TVM 0.19's layout: the submodules as_torch / optimize_torch are shadowed by the functions of
# the same name (``from tvm.contrib.torch.as_torch import OperatorModuleWrapper`` still works).
from . import pytorch_tvm  # noqa: E402
from .as_torch import TVMScriptIRModule, as_torch  # noqa: E402
from .compiler import PyTorchTVMModule, compile  # noqa: E402  pylint: disable=redefined-builtin
from .dynamo_backend import BACKEND_NAME as TORCH_COMPILE_BACKEND  # noqa: E402
from .dynamo_backend import register as _register_dynamo_backend  # noqa: E402
from .torch_export import register as _register_export_support  # noqa: E402
from .frontend import ConversionError  # noqa: E402
from .errors import TuningError  # noqa: E402
from .module import GraphModule, VMModule  # noqa: E402
from .optimize_torch import GraphExecutorFactoryWrapper, optimize_torch  # noqa: E402
from .partitioning import PartitionReport, partition, partition_report  # noqa: E402
from .profiler import ProfileReport, profile  # noqa: E402
from .trace_module import TraceTvmModule  # noqa: E402

# torch.compile(m, backend="tvm_contrib_torch") works once this package is imported, and
# torch.export traces, saves and loads models holding compiled modules.
_register_dynamo_backend()
_register_export_support()

__all__ = [
    "ConversionError",
    "GraphExecutorFactoryWrapper",
    "GraphModule",
    "PartitionReport",
    "ProfileReport",
    "PyTorchTVMModule",
    "TORCH_COMPILE_BACKEND",
    "TVMScriptIRModule",
    "TraceTvmModule",
    "TuningError",
    "VMModule",
    "as_torch",
    "compile",
    "load_runtime_library",
    "optimize_torch",
    "partition",
    "partition_report",
    "profile",
    "runtime_library_path",
]
