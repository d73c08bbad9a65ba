"""The seed's import path: ``from tvm.contrib.pt_op import compile, PyTorchTVMModule``."""
from __future__ import annotations

from tvm.contrib.torch import (  # noqa: F401  pylint: disable=redefined-builtin
    GraphModule,
    PyTorchTVMModule,
    TraceTvmModule,
    VMModule,
    as_torch,
    compile,
    optimize_torch,
)

__all__ = ["GraphModule", "PyTorchTVMModule", "TraceTvmModule", "VMModule", "as_torch",
           "compile", "optimize_torch"]
