"""``tvm.contrib.torch.pytorch_tvm``: TVM 0.19's module path of ``PyTorchTVMModule`` and
``compile``.

Its AutoTVM helpers (``tune_tasks``, ``get_tuning_opt``) and ``TVM_ASSETS`` went with
AutoTVM and Relay; see docs/coming_from_tvm019.md.
"""
from __future__ import annotations

from .compiler import PyTorchTVMModule, compile  # noqa: F401  pylint: disable=redefined-builtin

__all__ = ["PyTorchTVMModule", "compile"]
