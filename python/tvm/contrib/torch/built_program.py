"""What ``PyTorchTVMModule.build_tvm`` returns: the exported files and a runnable module.

TVM 0.19's ``build_tvm`` returned a graph executor (``set_input`` / ``run`` /
``get_output``). :class:`BuiltProgram` keeps that calling style over this project's runtime
module (a :class:`~tvm.contrib.torch.GraphModule` or :class:`~tvm.contrib.torch.VMModule`,
loaded on first use so that building for a device this machine lacks still works), and is
also the list of :class:`~tvm.contrib.torch.export.ExportedFiles` that ``build_tvm`` returned
before.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .export import ExportedFiles


def _as_torch_tensor(value: Any) -> torch.Tensor:
    """A torch tensor from a torch tensor, a NumPy array or a DLPack-capable tensor
    (``tvm.runtime.Tensor``)."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return torch.from_dlpack(value)
        except (RuntimeError, TypeError, BufferError):
            pass  # e.g. a read-only NumPy array: copied below
    if hasattr(value, "__array__"):
        return torch.as_tensor(value.__array__())
    raise TypeError(f"set_input: expected a torch tensor, a NumPy array or a TVM tensor, got "
                    f"{type(value).__name__}")


class BuiltProgram(Sequence):
    """The result of :meth:`PyTorchTVMModule.build_tvm`.

    As a sequence it is the exported files (one :class:`ExportedFiles` per input-shape set);
    :attr:`module` is the runnable ``nn.Module``; :meth:`set_input`, :meth:`run` and
    :meth:`get_output` run it one call at a time, as TVM 0.19's graph executor did.

    Parameters
    ----------
    files : list of ExportedFiles
        What the build exported.
    input_names : list of str
        The inputs' names, in order (``set_input`` takes a name or a position).
    load : callable
        Returns the runtime module (called once, on first use).
    """

    def __init__(self, files: List[ExportedFiles], input_names: List[str],
                 load: Callable[[], torch.nn.Module]):
        self.files = list(files)
        self.input_names = list(input_names)
        self._load = load
        self._module: Optional[torch.nn.Module] = None
        self._inputs: Dict[int, torch.Tensor] = {}
        self._outputs: Optional[List[torch.Tensor]] = None

    def __getitem__(self, index):
        return self.files[index]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def module(self) -> torch.nn.Module:
        """The runtime module (``forward(List[Tensor]) -> List[Tensor]``), loaded once."""
        if self._module is None:
            self._module = self._load()
        return self._module

    def __call__(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Run the program: ``module(inputs)``."""
        return self.module(list(inputs))

    def get_num_inputs(self) -> int:
        """Number of inputs the program takes."""
        return len(self.input_names)

    def get_num_outputs(self) -> int:
        """Number of outputs the program returns."""
        return int(self.module.engine.num_outputs())

    def _position(self, key: Union[int, str]) -> int:
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(self.input_names):
                raise IndexError(f"set_input: input index {key} out of range; the program "
                                 f"takes {len(self.input_names)} inputs")
            return key
        if isinstance(key, str) and key in self.input_names:
            return self.input_names.index(key)
        raise KeyError(f"set_input: no input named {key!r}; the inputs are "
                       f"{self.input_names}")

    def set_input(self, key: Union[int, str, None] = None, value: Any = None,
                  **inputs: Any) -> None:
        """Set inputs by name or position (``set_input("x", x)`` or ``set_input(x=x)``)."""
        if key is not None:
            inputs = {**inputs, key: value}
        for name, tensor in inputs.items():
            self._inputs[self._position(name)] = _as_torch_tensor(tensor)

    def run(self, **inputs: Any) -> None:
        """Run the program on the inputs set (plus any given here by name)."""
        self.set_input(**inputs)
        missing = [n for i, n in enumerate(self.input_names) if i not in self._inputs]
        if missing:
            raise ValueError(f"run: inputs {missing} are not set (set_input first)")
        self._outputs = self.module([self._inputs[i] for i in range(len(self.input_names))])

    def get_output(self, index: int) -> torch.Tensor:
        """Output ``index`` of the last :meth:`run`, as a torch tensor."""
        if self._outputs is None:
            raise RuntimeError("get_output: call run() first")
        if not 0 <= index < len(self._outputs):
            raise IndexError(f"get_output: output index {index} out of range; the program "
                             f"returns {len(self._outputs)} outputs")
        return self._outputs[index]


__all__ = ["BuiltProgram"]
