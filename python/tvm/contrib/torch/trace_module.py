"""``TraceTvmModule``: a ``forward(*inputs)`` face for the ``List[Tensor]`` runtime modules.

:class:`~tvm.contrib.torch.GraphModule` and :class:`~tvm.contrib.torch.VMModule` take and
return ``List[Tensor]``, which ``torch.jit.trace`` cannot feed; wrapping one (scripted or not)
in :class:`TraceTvmModule` gives it positional tensor inputs, as in TVM 0.19.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch


class TraceTvmModule(torch.nn.Module):
    """Wrap a ``forward(List[Tensor]) -> List[Tensor]`` module so it can be traced.

    Parameters
    ----------
    tvm_module : torch.nn.Module or torch.jit.ScriptModule
        A :class:`~tvm.contrib.torch.GraphModule` / :class:`~tvm.contrib.torch.VMModule`, as
        ``compile`` returns it or scripted.

    Examples
    --------
    >>> scripted = torch.jit.script(tvm.contrib.torch.compile(model, option))
    >>> traced = torch.jit.trace(TraceTvmModule(scripted), (x, y))
    """

    def __init__(self, tvm_module: torch.nn.Module):
        super().__init__()
        if not isinstance(tvm_module, torch.nn.Module):
            raise TypeError(f"TraceTvmModule: tvm_module must be a torch.nn.Module taking "
                            f"List[Tensor] (GraphModule/VMModule), got "
                            f"{type(tvm_module).__name__}")
        self.tvm_module = tvm_module

    def forward(self, *inputs: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """Run the wrapped module on the inputs; one output comes back bare, several as a
        tuple (TVM 0.19's behaviour)."""
        outputs = self.tvm_module(list(inputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


__all__ = ["TraceTvmModule"]
