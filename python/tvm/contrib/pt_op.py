"""The seed's import path: ``from tvm.contrib.pt_op import compile, PyTorchTVMModule``."""
from __future__ import annotations

from tvm.contrib.torch import (  # noqa: F401  pylint: disable=redefined-builtin
    GraphModule,
    PyTorchTVMModule,
    VMModule,
    compile,
)

__all__ = ["GraphModule", "PyTorchTVMModule", "VMModule", "compile"]
