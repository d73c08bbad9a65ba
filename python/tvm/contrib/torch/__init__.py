"""tvm.contrib.torch (PyTorchTVM): compile PyTorch models with TVM, run them in TorchScript."""
from __future__ import annotations

from ._library import load_runtime_library, runtime_library_path
from .module import GraphModule, VMModule

load_runtime_library()

__all__ = ["GraphModule", "VMModule", "load_runtime_library", "runtime_library_path"]
