"""tvm.contrib.torch (PyTorchTVM): compile PyTorch models with TVM, run them in TorchScript.

The pipeline, one module per step: :mod:`.options` (the option table, parsed once),
:mod:`.frontend` (model -> Relax), :mod:`.passes` (Relax optimisations),
:mod:`.vendor_kernels` (oneDNN/MKL/cuDNN/cuBLAS/ATen offload), :mod:`.tuning` (MetaSchedule),
:mod:`.build` (targets, schedules, compilation), :mod:`.export` (files), :mod:`.module`
(``nn.Module`` wrappers of the ``torch.classes.tvm_class`` runtime classes),
:mod:`.pipeline` (``PyTorchTVMModule`` and ``compile_program``: the steps in order) and
:mod:`.compiler` (``compile``). Partial offload: the :mod:`.partitioning` package
(``partition``: compile what TVM supports, keep the rest in TorchScript). Where the time goes:
:mod:`.profiler` (``profile``: per-kernel time of the compiled programs).
"""
from __future__ import annotations

from ._library import load_runtime_library, runtime_library_path

load_runtime_library()

# pylint: disable=wrong-import-position
from .compiler import PyTorchTVMModule, compile  # noqa: E402  pylint: disable=redefined-builtin
from .frontend import ConversionError  # noqa: E402
from .module import GraphModule, VMModule  # noqa: E402
from .partitioning import PartitionReport, partition, partition_report  # noqa: E402
from .profiler import ProfileReport, profile  # noqa: E402

__all__ = [
    "ConversionError",
    "GraphModule",
    "PartitionReport",
    "ProfileReport",
    "PyTorchTVMModule",
    "VMModule",
    "compile",
    "load_runtime_library",
    "partition",
    "partition_report",
    "profile",
    "runtime_library_path",
]
