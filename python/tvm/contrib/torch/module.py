"""``nn.Module`` wrappers around the ``torch.classes.tvm_class`` custom classes."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ._library import load_runtime_library
from .options import device_name
from .torch_export import register as _register_export_support
from .torch_export import run_engine


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    raise ValueError(f"tvm.contrib.torch: unsupported device {device}; expected cpu or cuda")


class _TvmModuleBase(torch.nn.Module):
    """Shared behaviour of :class:`GraphModule` and :class:`VMModule`."""

    _class_name = ""
    __jit_unused_properties__ = ["device"]

    def __init__(self, num_inputs: int, num_outputs: int, device=None):
        super().__init__()
        load_runtime_library()
        _register_export_support()
        if not isinstance(num_inputs, int) or num_inputs <= 0:
            raise ValueError(f"num_inputs must be a positive int, got {num_inputs!r}")
        if not isinstance(num_outputs, int) or num_outputs <= 0:
            raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
        # str, torch.device or tvm.Device (what TVM 0.19's examples passed), checked here.
        device = torch.device(device_name(device, "device") if device is not None else "cpu")
        # An empty buffer that nn.Module moves on .to()/.cuda()/.cpu(); _apply reads it to
        # move the engine along.
        self.register_buffer("_device_anchor", torch.empty(0, device=device), persistent=False)
        cls = getattr(torch.classes.tvm_class, self._class_name)
        self.engine = cls(num_inputs, num_outputs, _device_name(device))

    def init(self, input_shapes: Sequence[Sequence[int]], lib_path: str, graph_path: str,
             params_path: str) -> None:
        """Load one compiled program from its exported files (the seed's API).

        Parameters
        ----------
        input_shapes : list of list of int
            The shape of each input the program was compiled for (checked against the graph).
        lib_path, graph_path, params_path : str
            The files written by :func:`tvm.contrib.torch.export.export_program`.
        """
        shapes = [[int(d) for d in shape] for shape in input_shapes]
        self.engine.load_tvm_module(shapes, str(lib_path), str(graph_path), str(params_path))

    def load_bytes(self, lib: bytes, graph: str, params: bytes) -> None:
        """Load one compiled program from in-memory bytes."""
        self.engine.load_tvm_module_from_bytes(
            torch.frombuffer(bytearray(lib), dtype=torch.uint8),
            graph,
            torch.frombuffer(bytearray(params), dtype=torch.uint8)
            if params else torch.empty(0, dtype=torch.uint8),
        )

    @classmethod
    def shape_repr(cls, input_shapes: Sequence[Sequence[int]]) -> str:
        """TVM 0.19's key for a list of input shapes: ``[[1, 3], [2]]`` -> ``"1_3___2___"``.

        Kept for code that built or compared these keys; this project's programs are keyed by
        dtype and shape together (see :meth:`signatures`).

        Parameters
        ----------
        input_shapes : list of list of int
            One shape per input.
        """
        if isinstance(input_shapes, (str, bytes)) or not isinstance(input_shapes, Sequence):
            raise TypeError(f"shape_repr: input_shapes must be a list of shapes (lists of "
                            f"ints), got {type(input_shapes).__name__}")
        out = []
        for shape in input_shapes:
            if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)) \
                    or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise TypeError(f"shape_repr: each shape must be a list of ints, got {shape!r}")
            out.append("".join(f"{d}_" for d in shape) + "__")
        return "".join(out)

    @property
    def device(self) -> torch.device:
        """The device the compiled programs run on."""
        return self._device_anchor.device

    def signatures(self) -> List[str]:
        """Input signatures of the loaded programs."""
        return list(self.engine.signatures())

    def call_counts(self) -> Dict[str, int]:
        """Calls served per compiled signature (for logs and metrics)."""
        return dict(self.engine.call_counts())

    def last_signature(self) -> str:
        """The signature of the program that served the calling thread's last call."""
        return self.engine.last_signature()

    def accepts(self, inputs: List[torch.Tensor]) -> bool:
        """Whether :meth:`forward` has a compiled program for these inputs."""
        return self.engine.accepts(inputs)

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Run the compiled program that matches the inputs' shapes and dtypes."""
        if torch.jit.is_scripting():
            return self.engine.forward(inputs)
        # In Python: through the operator that torch.export traces, when tracing (see
        # .torch_export.run_engine).
        return run_engine(self.engine, inputs)

    def _apply(self, fn, recurse=True):
        # The engine moves first: if it cannot (meta, a missing GPU, code for another device),
        # nothing has moved and the wrapper and the engine still agree.
        previous = self.engine.device()
        target = _device_name(fn(self._device_anchor).device)
        if previous != target:
            self.engine.to(target)
        try:
            return super()._apply(fn, recurse)
        except BaseException:
            if previous != target:
                self.engine.to(previous)
            raise


class GraphModule(_TvmModuleBase):
    """Static shapes: one compiled program per input signature (``TvmGraphModule``).

    Parameters
    ----------
    num_inputs : int
        Number of input tensors of ``forward``.
    num_outputs : int
        Number of output tensors ``forward`` returns.
    device : str, torch.device or tvm.Device, optional
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``tvm.cpu()`` or ``tvm.cuda(N)``.
    """

    _class_name = "TvmGraphModule"


class VMModule(_TvmModuleBase):
    """Dynamic shapes: one compiled program with symbolic dims (``TvmVMModule``).

    Parameters are those of :class:`GraphModule`.
    """

    _class_name = "TvmVMModule"


def takes_input_list(model: torch.nn.Module) -> bool:
    """Whether ``model``'s ``forward`` takes its inputs as one ``List[Tensor]`` (what
    ``compile()`` returns, scripted or not) rather than positionally."""
    if isinstance(model, _TvmModuleBase):
        return True
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if isinstance(model, torch.jit.ScriptModule) and schema is not None:
        args = schema.arguments[1:]
        return len(args) == 1 and str(args[0].type) == "List[Tensor]"
    return False
