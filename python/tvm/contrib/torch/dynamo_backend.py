"""The ``torch.compile`` backend ``"tvm_contrib_torch"``: Dynamo's FX graphs through partitioning.

``import tvm.contrib.torch`` registers :func:`tvm_contrib_torch_backend` with Dynamo under
:data:`BACKEND_NAME` (torch's own ``"tvm"`` backend is left alone). For each FX graph Dynamo
hands over, the backend

1. sorts the graph's inputs (:class:`_GraphInputs`): the module's parameters and buffers
   (inputs of the graph since Dynamo inlines ``nn.Module`` calls) become constants of the
   program, sizes Dynamo passes as ``SymInt`` inputs are read from the tensors they measure,
   and the remaining tensors are the program's inputs;
2. traces the graph into TorchScript (it is straight-line code, so the trace is exact) and
   hands it to :func:`~tvm.contrib.torch.partitioning.partition_with_options`, which compiles
   the runs of operators TVM supports and keeps the rest in PyTorch. Dims Dynamo made
   dynamic (``torch._dynamo.mark_dynamic``, or its automatic dynamic shapes after a
   recompile) are recorded at two sizes, so the programs get symbolic dims
   (``TvmVMModule``); sizes outside their range run that piece in PyTorch, without a
   recompile;
3. caches the result in-process by graph, input signature, weights and options and, with
   the ``cache_dir`` option, as a TorchScript file that a later process loads instead of
   building.

Options come through ``torch.compile(m, backend="tvm_contrib_torch", options={...})`` and are
parsed by :func:`~tvm.contrib.torch.options.parse_options` (the keys of ``compile``, less
``input_infos`` and the keys that do not apply to a model computing in its own dtype).
The backend is for inference: a graph traced with grad mode on whose parameters or inputs
require grad runs eagerly (with a warning), and the weights are read once, when a graph is
compiled (a changed weight makes that graph run eagerly, with a warning).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import frontend
from .options import CompileOptions, parse_options
from .partitioning import partition_with_options

logger = logging.getLogger(__name__)

#: The name ``torch.compile(backend=...)`` takes.
BACKEND_NAME = "tvm_contrib_torch"

#: Bumped when what a cache file holds or how the key is made changes.
_CACHE_FORMAT = 1

_lock = threading.Lock()
_memory: Dict[str, torch.jit.ScriptModule] = {}
_stats = {"builds": 0, "memory_hits": 0, "disk_hits": 0, "eager_graphs": 0}


def cache_info() -> Dict[str, int]:
    """Counters of this process: graphs built, found in memory, loaded from ``cache_dir``, and
    left to run eagerly (the backend could not take them)."""
    with _lock:
        return dict(_stats)


def clear_cache() -> None:
    """Forget the compiled graphs held in this process and zero :func:`cache_info`'s
    counters (files in ``cache_dir`` stay)."""
    with _lock:
        _memory.clear()
        for name in _stats:
            _stats[name] = 0


def _parse(options: Optional[Dict[str, Any]]) -> CompileOptions:
    opts = parse_options(options, require_input_infos=False)
    misplaced = sorted(opts.given & {"input_infos", "default_dtype", "dim_ranges",
                                     "bucket_padding", "num_outputs", "example_inputs",
                                     "partition"})
    if misplaced:
        raise ValueError(f"tvm.contrib.torch torch.compile backend: {misplaced} do not apply "
                         "(shapes and dtypes come from the graph Dynamo traced; convert the "
                         "model with .half() for float16)")
    return opts


def _symbol(value: Any) -> Optional[str]:
    """The symbol a ``SymInt`` is (``"s0"``), or None for an int or an expression."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return str(expr) if getattr(expr, "is_Symbol", False) else None
    return None


def _dim_text(value: Any) -> str:
    return str(value.node.expr) if isinstance(value, torch.SymInt) else str(int(value))


@dataclasses.dataclass
class _GraphInputs:
    """What each input of a Dynamo graph is.

    ``slots[i]`` is ``("tensor", k)`` (the program's input ``k``), ``("weight", k)`` (the
    constant ``weights[k]``) or ``("size", (k, axis))`` (the size of program input ``k``
    along ``axis``).
    """

    slots: List[Tuple[str, Any]]
    weights: List[torch.Tensor]
    shapes: List[Tuple[Any, ...]]  # per program input: ints and SymInts (Dynamo's view)
    signature: List[str]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> "_GraphInputs":
        """Sort the inputs; raises ``NotImplementedError`` for inputs it cannot place."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise NotImplementedError("graph inputs and example inputs differ in number")
        slots: List[Tuple[str, Any]] = []
        weights: List[torch.Tensor] = []
        shapes: List[Tuple[Any, ...]] = []
        signature = []
        sizes = []
        for node, value in zip(placeholders, example_inputs):
            fake = node.meta.get("example_value")
            grapharg = node.meta.get("grapharg")
            source = getattr(grapharg, "source", None)
            if isinstance(value, torch.Tensor) and _is_weight(source):
                slots.append(("weight", len(weights)))
                weights.append(value)
                signature.append(f"w{tuple(value.shape)}{value.dtype}")
            elif isinstance(value, torch.Tensor):
                shape = tuple(fake.shape) if isinstance(fake, torch.Tensor) else tuple(value.shape)
                slots.append(("tensor", len(shapes)))
                shapes.append(shape)
                signature.append(f"t({','.join(_dim_text(d) for d in shape)}){value.dtype}"
                                 f"{value.device.type}")
            elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
                slots.append(("size", None))
                sizes.append((len(slots) - 1, _symbol(fake if fake is not None else value)))
                signature.append(f"s{_dim_text(fake if fake is not None else value)}")
            else:
                raise NotImplementedError(f"a graph input of type {type(value).__name__}")
        for slot, symbol in sizes:
            where = [(k, axis) for k, shape in enumerate(shapes)
                     for axis, dim in enumerate(shape) if symbol is not None
                     and _symbol(dim) == symbol]
            if not where:
                raise NotImplementedError("a size input that no input tensor's dim is")
            slots[slot] = ("size", where[0])
        return cls(slots, weights, shapes, signature)

    def symbols(self) -> List[str]:
        """The symbols of the program inputs' dims, in order of first appearance."""
        seen: List[str] = []
        for shape in self.shapes:
            for dim in shape:
                name = _symbol(dim)
                if name is not None and name not in seen:
                    seen.append(name)
        return seen

    def tensors_of(self, args: Sequence[Any]) -> List[torch.Tensor]:
        """The program's inputs among a call's arguments."""
        return [args[i] for i, (kind, _) in enumerate(self.slots) if kind == "tensor"]


def _is_weight(source: Any) -> bool:
    """Whether a graph input is a parameter or buffer of the compiled module."""
    if source is None:
        return False
    from torch._dynamo import source as sources  # pylint: disable=import-outside-toplevel
    if sources.is_from_unspecialized_param_buffer_source(source):
        return True
    name = source.name if isinstance(source.name, str) else source.name()
    return "._parameters[" in name or "._buffers[" in name


class _GraphCall(torch.nn.Module):
    """The Dynamo graph with its weights as buffers and its sizes read from its tensors."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: _GraphInputs):
        super().__init__()
        self.graph_module = gm
        self.slots = inputs.slots
        for index, weight in enumerate(inputs.weights):
            self.register_buffer(f"weight{index}", weight.detach())

    def forward(self, *tensors: torch.Tensor):  # pylint: disable=missing-function-docstring
        args = []
        for kind, ref in self.slots:
            if kind == "tensor":
                args.append(tensors[ref])
            elif kind == "weight":
                args.append(getattr(self, f"weight{ref}"))
            else:
                args.append(tensors[ref[0]].size(ref[1]))
        return tuple(self.graph_module(*args))


def _grown(inputs: _GraphInputs, tensors: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
    """The example tensors with the ``k``-th symbolic dim grown by ``k + 1`` (repeating its
    first slices, so index-valued inputs stay valid); None when a dim is an expression."""
    growth = {name: k + 1 for k, name in enumerate(inputs.symbols())}
    if not growth:
        return None
    grown = []
    for tensor, shape in zip(tensors, inputs.shapes):
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                continue
            name = _symbol(dim)
            if name is None:
                return None
            extra = tensor.narrow(axis, 0, 1).expand(
                *[growth[name] if a == axis else -1 for a in range(tensor.dim())])
            tensor = torch.cat([tensor, extra], axis)
        grown.append(tensor)
    return grown


def _cache_key(gm: torch.fx.GraphModule, inputs: _GraphInputs, opts: CompileOptions) -> str:
    import tvm  # pylint: disable=import-outside-toplevel
    digest = hashlib.sha256()
    for part in (str(_CACHE_FORMAT), torch.__version__, tvm.__version__, platform.machine(),
                 platform.processor(), gm.code, "|".join(inputs.signature)):
        digest.update(part.encode())
        digest.update(b"\0")
    given = sorted(k for k in opts.given if k not in ("cache_dir", "export_dir"))
    digest.update(repr([(k, getattr(opts, k)) for k in given]).encode())
    for weight in inputs.weights:
        data = weight.detach().cpu().contiguous()
        digest.update(str(data.dtype).encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _cache_file(opts: CompileOptions, key: str) -> Optional[str]:
    return os.path.join(opts.cache_dir, f"{key}.pt") if opts.cache_dir else None


def _load(path: Optional[str]) -> Optional[torch.jit.ScriptModule]:
    if path is None or not os.path.exists(path):
        return None
    try:
        with frontend.quiet_torchscript_warnings():
            return torch.jit.load(path)
    except (RuntimeError, OSError) as err:
        logger.warning("tvm_contrib_torch: ignoring unreadable cache file %s (%s); rebuilding",
                       path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _save(script: torch.jit.ScriptModule, path: Optional[str]) -> None:
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written aside then renamed: a reader never sees half a file.
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(handle)
    try:
        with frontend.quiet_torchscript_warnings():
            torch.jit.save(script, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _build(gm: torch.fx.GraphModule, inputs: _GraphInputs, tensors: List[torch.Tensor],
           opts: CompileOptions) -> torch.jit.ScriptModule:
    call = _GraphCall(gm, inputs).eval()
    more = []
    grown = _grown(inputs, tensors)
    if grown is not None and opts.dynamic_shapes:
        try:
            with torch.no_grad():
                call(*grown)
            more.append(grown)
        except Exception as err:  # pylint: disable=broad-except
            logger.info("tvm_contrib_torch: the graph does not run with its dynamic dims "
                        "grown (%s); compiling it for the example sizes", err)
    with torch.no_grad(), frontend.quiet_torchscript_warnings():
        traced = torch.jit.trace(call, tuple(tensors), check_trace=False)
    with tempfile.TemporaryDirectory(prefix="tvm_contrib_torch_") as scratch:
        if "export_dir" not in opts.given:
            opts = dataclasses.replace(opts, export_dir=scratch)
        return partition_with_options(traced, tensors, opts, more_inputs=more)


class _CompiledGraph:
    """What the backend returns for one graph: the partitioned program, or the graph itself
    when a weight changed after compiling."""

    def __init__(self, script: torch.jit.ScriptModule, inputs: _GraphInputs,
                 gm: torch.fx.GraphModule):
        self.script = script
        self.inputs = inputs
        self.graph_module = gm
        self._versions = [w._version for w in inputs.weights]  # pylint: disable=protected-access
        self._warned = False

    def _weights_changed(self, args: Sequence[Any]) -> bool:
        # pylint: disable=protected-access
        for (kind, ref), arg in zip(self.inputs.slots, args):
            if kind == "weight" and (arg is not self.inputs.weights[ref]
                                     or arg._version != self._versions[ref]):
                return True
        return False

    def __call__(self, *args: Any) -> Any:
        if self._weights_changed(args):
            if not self._warned:
                logger.warning("tvm_contrib_torch: a weight changed since this graph was "
                               "compiled; running it eagerly (torch._dynamo.reset() and call "
                               "again to recompile)")
                self._warned = True
            return self.graph_module(*args)
        with torch.no_grad():
            return self.script(*self.inputs.tensors_of(args))


def tvm_contrib_torch_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                              options: Optional[Dict[str, Any]] = None,
                              **kwargs: Any) -> Callable[..., Any]:
    """Compile one Dynamo FX graph with this project's pipeline (see the module's doc).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph Dynamo captured.
    example_inputs : sequence
        Its inputs (tensors, and ints or ``SymInt`` for dynamic sizes).
    options : dict, optional
        ``torch.compile``'s ``options``: see :data:`tvm.contrib.torch.options.OPTIONS`
        (``cache_dir``, ``vendor_kernels``, ``tuning_n_trials``, ``min_block_size``,
        ``torch_executed_ops``, ...).
    **kwargs
        Other ``torch.compile`` arguments (``mode``); none applies.

    Returns
    -------
    callable
        Runs the graph: the compiled pieces in TVM, the rest in PyTorch. A graph the
        backend cannot take (inputs other than tensors and sizes, outputs other than
        tensors) runs eagerly, with a warning.

    Raises
    ------
    ValueError, TypeError
        For bad options (on the first call of the compiled model).
    """
    opts = _parse(options)
    if kwargs.get("mode") not in (None, "default"):
        logger.info("tvm_contrib_torch: mode=%r has no effect", kwargs["mode"])
    try:
        inputs = _GraphInputs.of(gm, example_inputs)
    except NotImplementedError as err:
        logger.warning("tvm_contrib_torch: running a graph eagerly: %s", err)
        with _lock:
            _stats["eager_graphs"] += 1
        return gm.forward
    if torch.is_grad_enabled() and any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs):
        # Dynamo guards on grad mode: this graph is only called when gradients are wanted,
        # and TVM programs (with the weights as constants) have no backward.
        logger.warning("tvm_contrib_torch: running a graph eagerly, it needs autograd (grad "
                       "mode is on and parameters or inputs require grad); call the model "
                       "under torch.no_grad() or torch.inference_mode() to run it in TVM")
        with _lock:
            _stats["eager_graphs"] += 1
        return gm.forward
    key = _cache_key(gm, inputs, opts)
    path = _cache_file(opts, key)
    with _lock:
        script = _memory.get(key)
        if script is not None:
            _stats["memory_hits"] += 1
    if script is None:
        script = _load(path)
        if script is not None:
            logger.info("tvm_contrib_torch: loaded graph %s from %s", key, path)
            with _lock:
                _stats["disk_hits"] += 1
    if script is None:
        tensors = [t.detach() for t in inputs.tensors_of(example_inputs)]
        try:
            # The pipeline exports the pieces it compiles with torch.export; outside Dynamo's
            # tracing context, or their shape guards would land in the outer frame's guards.
            # pylint: disable-next=protected-access
            with torch._guards.tracing(None), torch._guards.compile_context(None):
                script = _build(gm, inputs, tensors, opts)
        except Exception as err:  # pylint: disable=broad-except
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger.warning("tvm_contrib_torch: running a graph eagerly, it could not be "
                           "compiled: %s", message)
            with _lock:
                _stats["eager_graphs"] += 1
            return gm.forward
        with _lock:
            _stats["builds"] += 1
        _save(script, path)
    with _lock:
        _memory[key] = script
    return _CompiledGraph(script, inputs, gm)


def register() -> None:
    """Register the backend with Dynamo under :data:`BACKEND_NAME` (once per process)."""
    from torch._dynamo.backends import registry  # pylint: disable=import-outside-toplevel
    if BACKEND_NAME not in registry.list_backends(exclude_tags=()):
        registry.register_backend(compiler_fn=tvm_contrib_torch_backend, name=BACKEND_NAME)


__all__ = ["BACKEND_NAME", "cache_info", "clear_cache", "register", "tvm_contrib_torch_backend"]
