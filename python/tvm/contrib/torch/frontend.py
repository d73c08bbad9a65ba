"""Frontend: from a PyTorch model (TorchScript, ``nn.Module`` or ``ExportedProgram``) to Relax.

TorchScript goes through torch's TorchScript-to-ExportedProgram converter, re-traced with the
shapes we ask for (static, or the user's named dims); an ``nn.Module`` goes through
``torch.export``. The ``ExportedProgram`` is decomposed to core ATen (with our decompositions
of the fused transformer fast-path ops) and imported with TVM's
``from_exported_program``. Unsupported operators are reported by name, with where in the model
they come from, before TVM's importer is reached.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import tvm
from torch._export.converter import TS2EPConverter
from torch.export.passes import move_to_device_pass
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from . import fx_passes
from .converters import CUSTOM_CONVERTERS
from .decompositions import decomposition_table
from .errors import ConversionError
from .script_rebuild import rebuild_eager

logger = logging.getLogger(__name__)

#: Said with every error about operators: partitioning keeps them in TorchScript instead.
PARTITION_HINT = ("tvm.contrib.torch.partition(model, example_inputs) (or compile(..., "
                  "{'partition': True})) compiles the rest with TVM and keeps these in "
                  "TorchScript.")


class _ShapedTS2EPConverter(TS2EPConverter):
    """TS2EPConverter that re-traces with the dynamic shapes we choose (static by default)."""

    def __init__(self, ts_model, sample_args, dynamic_shapes=None):
        super().__init__(ts_model, sample_args)
        self._dynamic_shapes = dynamic_shapes
        unwrap_scalar_constants(self.ts_graph)

    def retrace_as_exported_program(self, gm, name_to_constant):
        ep = torch.export._trace._export(  # pylint: disable=protected-access
            gm, self.sample_args, dynamic_shapes=self._dynamic_shapes, strict=False,
            pre_dispatch=True)
        # As torch's own retrace: tensor constants were traced as buffers; they are constants.
        ep._constants.update(  # pylint: disable=protected-access
            {k: v for k, v in name_to_constant.items()
             if isinstance(v, (torch.Tensor, torch.ScriptObject))})
        for name in name_to_constant:
            ep.state_dict.pop(name, None)
        for spec in ep.graph_signature.input_specs:
            if spec.kind == torch.export.graph_signature.InputKind.BUFFER and \
                    isinstance(name_to_constant.get(spec.target), torch.Tensor):
                spec.kind = torch.export.graph_signature.InputKind.CONSTANT_TENSOR
                spec.persistent = None
        return ep


#: TorchScript operators with a ``Scalar`` overload for their second operand.
_SCALAR_OPERAND_KINDS = frozenset(f"aten::{name}" for name in (
    "add", "sub", "mul", "div", "rsub", "remainder", "fmod", "pow", "floor_divide", "eq",
    "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__",
    "__or__", "__xor__"))

#: The dtypes the tracer gives Python numbers it records as tensors ("wrapped numbers").
_WRAPPED_NUMBER_DTYPES = (torch.float64, torch.int64, torch.bool)


def unwrap_scalar_constants(graph: torch._C.Graph) -> None:
    """Turn the tracer's wrapped numbers back into Python numbers, in place.

    ``torch.jit.trace`` records ``x + 0.5`` with ``0.5`` as a 0-dim float64 tensor constant
    flagged as a wrapped number, which promotes like a Python scalar (``uint8 + 0.5`` is
    float32). The TorchScript-to-ExportedProgram converter loses the flag, and the constant
    then promotes like a float64 tensor (float64 results). Where such a constant is the second
    operand of an operator with a ``Scalar`` overload it becomes a number constant again.
    """
    def visit(block):
        for node in block.nodes():
            for sub in node.blocks():
                visit(sub)
            inputs = list(node.inputs())
            if node.kind() not in _SCALAR_OPERAND_KINDS or len(inputs) < 2:
                continue
            producer = inputs[1].node()
            if producer.kind() != "prim::Constant" or producer.kindOf("value") != "t":
                continue
            value = producer.t("value")
            if value.dim() != 0 or value.dtype not in _WRAPPED_NUMBER_DTYPES:
                continue
            number = value.item()
            constant = graph.insertConstant(number)
            constant.node().moveBefore(node)
            node.replaceInput(1, constant)

    visit(graph.block())


@contextlib.contextmanager
def _inference_mode_for_export():
    """Disable the MHA fast path while torch.export traces a plain nn.Module."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _dynamic_shapes_spec(num_inputs: int, dims: Optional[Sequence[Dict[int, Any]]]):
    if dims is None:
        return None
    return tuple(dims[i] if dims[i] else None for i in range(num_inputs))


@contextlib.contextmanager
def quiet_torchscript_warnings():
    """Silence TorchScript's deprecation notices (TorchScript is this tool's input format) and
    the converter's per-buffer warnings about unused state (num_batches_tracked)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Manually populate .* into state_dict")
        warnings.filterwarnings("ignore", message="`torch.jit.*` is deprecated")
        yield


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A frozen copy of a TorchScript module, in eval mode: weights become constants, methods
    are inlined and attribute-dependent branches fold away. ``module`` keeps its own mode."""
    was_training = module.training
    try:
        return torch.jit.freeze(module.eval())
    finally:
        module.train(was_training)


def to_exported_program(
    model: Any,
    example_inputs: Sequence[torch.Tensor],
    dynamic_dims: Optional[Sequence[Dict[int, Any]]] = None,
) -> torch.export.ExportedProgram:
    """Turn a model into an ``ExportedProgram`` traced at the example inputs.

    Parameters
    ----------
    model : torch.jit.ScriptModule, torch.nn.Module or torch.export.ExportedProgram
        The model. TorchScript modules (traced or scripted) are converted with torch's
        TorchScript-to-ExportedProgram converter.
    example_inputs : sequence of torch.Tensor
        One tensor per model input.
    dynamic_dims : sequence of dict, optional
        Per input, ``{dim_index: torch.export.Dim}`` for dims that stay symbolic.

    Returns
    -------
    torch.export.ExportedProgram
    """
    args = tuple(example_inputs)
    dynamic_shapes = _dynamic_shapes_spec(len(args), dynamic_dims)
    if isinstance(model, torch.export.ExportedProgram):
        return _on_host(model, owned=False)
    return _on_host(_export(model, args, dynamic_shapes), owned=True)


def _off_host(ep: torch.export.ExportedProgram) -> bool:
    """Whether a program holds or makes tensors anywhere but the host."""
    tensors = list(ep.state_dict.values()) + [
        v for v in ep.constants.values() if isinstance(v, torch.Tensor)]
    for node in ep.graph.nodes:
        tensors += [v for v in torch.utils._pytree.tree_leaves(node.meta.get("val"))
                    if isinstance(v, torch.Tensor)]
    return any(t.device.type != "cpu" for t in tensors)


def _on_host(ep: torch.export.ExportedProgram, owned: bool) -> torch.export.ExportedProgram:
    """``ep`` with its weights, constants and device arguments on the host, where conversion
    reads them (the compiled program's device is the target's). A caller's program is copied
    before it is moved (``owned=False``)."""
    if not _off_host(ep):
        return ep
    if not owned:
        ep = copy.deepcopy(ep)
    return move_to_device_pass(ep, "cpu")


def _export(model: Any, args: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """:func:`to_exported_program` for a model that is not an ExportedProgram yet."""
    if isinstance(model, torch.jit.ScriptModule):
        eager = rebuild_eager(model)
        if eager is not None:  # a scripted torch.nn transformer module: export its eager twin
            logger.info("exporting the eager %s rebuilt from the scripted module",
                        model.original_name)
            model = eager
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        try:
            with torch.no_grad(), quiet_torchscript_warnings():
                return _ShapedTS2EPConverter(model, args, dynamic_shapes).convert()
        except Exception as first_error:  # pylint: disable=broad-except
            if not isinstance(model, torch.jit.ScriptModule):
                raise _ts_conversion_error(model, args, first_error) from first_error
            # Scripted modules keep every branch of their Python source (training flags,
            # fast-path checks); freezing folds the attribute-dependent ones. Retry on that.
            try:
                frozen = freeze(model)
                with torch.no_grad(), quiet_torchscript_warnings():
                    return _ShapedTS2EPConverter(frozen, args, dynamic_shapes).convert()
            except Exception:  # pylint: disable=broad-except
                raise _ts_conversion_error(model, args, first_error) from first_error
    if isinstance(model, torch.nn.Module):
        with torch.no_grad(), _inference_mode_for_export():
            return torch.export.export(model.eval(), args, dynamic_shapes=dynamic_shapes,
                                       strict=False)
    raise TypeError(
        "tvm.contrib.torch: expected a torch.jit.ScriptModule (traced or scripted), a "
        f"torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")


def _ts_conversion_error(model, args, error: Exception) -> ConversionError:
    detail = ""
    try:
        with quiet_torchscript_warnings():
            detail = TS2EPConverter(model, args).explain(print_output=False)
    except Exception:  # pylint: disable=broad-except
        pass
    hint = f"\n{detail}" if detail and detail != "Success!" else ""
    return ConversionError(
        f"tvm.contrib.torch: torch could not convert the TorchScript module to an "
        f"ExportedProgram: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        f"{hint}\nTracing the model (torch.jit.trace) or passing the nn.Module itself avoids "
        "most TorchScript-only constructs.")


def _node_origin(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return f"{path or '<root>'} ({kind_name.split('.')[-1]})"
    trace = node.meta.get("stack_trace")
    if trace:
        return trace.strip().splitlines()[-1].strip()
    return "<unknown location>"


def unsupported_operators(ep: torch.export.ExportedProgram) -> Dict[str, List[str]]:
    """Operators of a decomposed program that TVM's importer has no converter for.

    Returns
    -------
    dict of str to list of str
        Operator name to the places in the model where it occurs.
    """
    supported = set(ExportedProgramImporter().convert_map) | set(CUSTOM_CONVERTERS)
    missing: Dict[str, List[str]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in supported:
            missing.setdefault(name, []).append(_node_origin(node))
    return missing


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Decompose to core ATen (fused transformer fast-path ops included), then make static
    scalars and dtype promotion explicit (:mod:`.fx_passes`)."""
    try:
        ep = ep.run_decompositions(decomposition_table())
    except Exception as err:  # pylint: disable=broad-except
        raise ConversionError(f"tvm.contrib.torch: torch could not decompose the exported "
                              f"program: {type(err).__name__}: {_first_line(err)}") from err
    return fx_passes.run(ep)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _NodeConversionError(Exception):
    """Carries the FX node a converter failed on out of TVM's importer."""

    def __init__(self, node: torch.fx.Node, error: BaseException):
        super().__init__(str(error))
        self.node = node
        self.error = error


def _converting(converter, importer: ExportedProgramImporter):
    """``converter`` reporting the node it fails on, and giving its result the static shape
    PyTorch recorded when TVM's converter left it unknown (``expand(x, [1, -1, 16, 16])``)."""
    def convert(node):
        try:
            result = converter(node)
        except _NodeConversionError:
            raise
        except Exception as err:  # pylint: disable=broad-except
            raise _NodeConversionError(node, err) from err
        val = node.meta.get("val")
        if isinstance(result, relax.Expr) and isinstance(getattr(result, "ty", None),
                                                         relax.TensorType) \
                and result.ty.shape is None and isinstance(val, torch.Tensor) \
                and all(isinstance(d, int) for d in val.shape):
            result = importer.block_builder.match_cast(
                result, relax.TensorType(list(val.shape), result.ty.dtype))
        return result
    return convert


def _importer() -> ExportedProgramImporter:
    """TVM's importer with our converters (:mod:`.converters`), every converter reporting the
    node it fails on."""
    importer = ExportedProgramImporter()
    for name, converter in CUSTOM_CONVERTERS.items():
        importer.convert_map[name] = (lambda node, f=converter: f(node, importer))
    importer.convert_map = {name: _converting(f, importer)
                            for name, f in importer.convert_map.items()}
    return importer


def to_relax(ep: torch.export.ExportedProgram) -> Tuple[tvm.IRModule, List[tvm.runtime.Tensor]]:
    """Import a decomposed ``ExportedProgram`` into Relax.

    Returns
    -------
    mod : tvm.IRModule
        ``main(*inputs, *params)`` with ``num_input`` set.
    params : list of tvm.runtime.Tensor
        The values of the params, in order.
    """
    _check_outputs(ep)
    _check_input_mutations(ep)
    missing = unsupported_operators(ep)
    if missing:
        lines = [f"  {op}: used at {', '.join(sorted(set(places))[:3])}"
                 for op, places in sorted(missing.items())]
        raise ConversionError(
            "tvm.contrib.torch: TVM cannot convert these operators yet:\n" + "\n".join(lines)
            + f"\n{PARTITION_HINT}")
    _drop_unused_constants(ep)
    try:
        mod = _importer().from_exported_program(ep, True, False, False, None)
    except _NodeConversionError as err:
        node = err.node
        name = getattr(node.target, "__name__", str(node.target))
        raise ConversionError(
            f"tvm.contrib.torch: TVM could not convert {name} at {_node_origin(node)}: "
            f"{type(err.error).__name__}: {_first_line(err.error)}\n{PARTITION_HINT}") \
            from err.error
    except ConversionError:
        raise
    except Exception as err:  # pylint: disable=broad-except
        raise ConversionError(f"tvm.contrib.torch: TVM's importer failed: "
                              f"{type(err).__name__}: {_first_line(err)}") from err
    mod, params = detach_params(mod)
    return mod, list(params.get("main", []))


def _check_outputs(ep: torch.export.ExportedProgram) -> None:
    """Compiled programs return tensors: refuse ``None`` and other non-tensor outputs here
    (TVM's importer would build a program that crashes)."""
    kinds = torch.export.graph_signature
    user = [spec for spec in ep.graph_signature.output_specs
            if spec.kind == kinds.OutputKind.USER_OUTPUT]
    if not user:
        raise ConversionError("tvm.contrib.torch: the model returns no tensor; a compiled "
                              "module returns one or more tensors")
    for index, spec in enumerate(user):
        if not isinstance(spec.arg, kinds.TensorArgument):
            value = getattr(spec.arg, "value", spec.arg)
            raise ConversionError(
                f"tvm.contrib.torch: output {index} of the model is {value!r}, not a tensor; a "
                "compiled module returns tensors only (return just the tensors, e.g. through a "
                "wrapper module)")


def _mutating_op(node: torch.fx.Node) -> str:
    """The in-place operator a functionalised node came from (``aten.add_.Tensor``)."""
    sources = [str(getattr(source, "target", "")) for source in node.meta.get("from_node") or []]
    for name in sources:
        if name.split(".")[1:2] and name.split(".")[1].endswith("_"):
            return name
    return sources[0] if sources and sources[0] else str(node.target)


def _check_input_mutations(ep: torch.export.ExportedProgram) -> None:
    """Refuse a model that writes into its inputs (``x.add_(1)``, ``x[0] = 5``): in eager mode
    the caller's tensor changes, a compiled program's inputs never do (the functionalised
    graph lists such writes as ``user_inputs_to_mutate``)."""
    mutated = ep.graph_signature.user_inputs_to_mutate
    if not mutated:
        return
    nodes = {node.name: node for node in ep.graph.nodes}
    user = list(ep.graph_signature.user_inputs)
    lines = []
    for output, name in mutated.items():
        node = nodes.get(output)
        where = f" at {_node_origin(node)}" if node is not None else ""
        op = _mutating_op(node) if node is not None else "an in-place operator"
        position = f"input {user.index(name)} " if name in user else "input "
        lines.append(f"  {position}'{name}' is changed in place by {op}{where}")
    raise ConversionError(
        "tvm.contrib.torch: the model writes into its inputs, which a compiled module cannot "
        "do (the caller's tensors would silently keep their old values):\n" + "\n".join(lines)
        + "\nUse the out-of-place operator (x = x.add(1)) or clone the input first "
        "(x = x.clone()), and return the result if the caller needs it.")


def _drop_unused_constants(ep: torch.export.ExportedProgram) -> None:
    """Remove constants no graph input refers to (TVM's importer assumes every one is used)."""
    targets = {spec.target for spec in ep.graph_signature.input_specs}
    for name in [k for k in ep.constants if k not in targets]:
        del ep._constants[name]  # pylint: disable=protected-access


def relax_input_count(mod: tvm.IRModule) -> int:
    """Number of user inputs of ``main`` (the rest are params)."""
    return int(mod["main"].attrs["num_input"])


__all__ = [
    "ConversionError",
    "decompose",
    "freeze",
    "quiet_torchscript_warnings",
    "relax_input_count",
    "to_exported_program",
    "to_relax",
    "unsupported_operators",
]
