"""The last pipeline step: run the compiled program and the source model on the same inputs.

A compiled module that differs from its model is the worst result this tool can give, and
some differences (a dropped attention scale, an integer kept where PyTorch promotes to float)
come from converters that raise nothing. :func:`check` runs both on one set of inputs per
compiled input signature and raises :class:`ConversionError` naming the first output that
differs beyond a tolerance fitted to the coarser of the two dtypes.

Inputs are the user's ``example_inputs`` when given, otherwise made from ``input_infos``:
floating inputs are standard normal, integer inputs that index an embedding table are ids in
that table's range, other integer and bool inputs (masks) are all ones.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import ConversionError
from .options import InputInfo

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: Ops an id tensor may pass through on its way to an embedding lookup.
_PASS_THROUGH = frozenset({
    aten.view.default, aten.reshape.default, aten._to_copy.default, aten.to.dtype,
    aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default, aten.clone.default,
    aten.contiguous.default, aten.flatten.using_ints, aten.select.int, aten.alias.default,
})

#: (rtol, atol as a fraction of the reference's largest magnitude) per dtype.
_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


def _embedding_rows(node, depth: int = 4) -> Optional[int]:
    rows = None
    for user in node.users:
        found = None
        if user.target is aten.embedding.default and len(user.args) > 1 and \
                user.args[1] is node:
            weight = user.args[0].meta.get("val")
            found = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
        elif user.target in _PASS_THROUGH and depth > 0:
            found = _embedding_rows(user, depth - 1)
        if found is not None:
            rows = found if rows is None else min(rows, found)
    return rows


def index_bounds(ep: torch.export.ExportedProgram) -> Dict[int, int]:
    """For each user input that indexes an embedding table: the table's row count.

    Returns
    -------
    dict of int to int
        User-input position to the number of rows of the smallest table it indexes.
    """
    user_inputs = [spec.arg.name for spec in ep.graph_signature.input_specs
                   if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    bounds = {}
    for position, name in enumerate(user_inputs):
        node = placeholders.get(name)
        rows = _embedding_rows(node) if node is not None else None
        if rows:
            bounds[position] = rows
    return bounds


def make_inputs(infos: Sequence[InputInfo], dim_values: Dict[str, int],
                bounds: Dict[int, int], seed: int = 0) -> List[torch.Tensor]:
    """Inputs for one verification run (on the CPU, in the compiled program's dtypes)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for position, info in enumerate(infos):
        shape = [d if isinstance(d, int) else dim_values[d] for d in info.shape]
        dtype = getattr(torch, info.dtype)
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif position in bounds:
            tensor = torch.randint(0, bounds[position], shape, generator=generator, dtype=dtype)
        else:
            tensor = torch.ones(shape, dtype=dtype)
        out.append(tensor)
    return out


def flatten_outputs(value: Any) -> List[torch.Tensor]:
    """The tensors of a model's result, in the order ``torch.export`` flattens them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None:
        return []
    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item)]
    return []


def model_float_dtype(module: Any) -> Optional[torch.dtype]:
    """The dtype of a model's floating parameters (``None`` when it has none)."""
    if isinstance(module, torch.export.ExportedProgram):
        tensors = list(module.state_dict.values())
    elif isinstance(module, torch.nn.Module):
        tensors = list(module.parameters()) + list(module.buffers())
    else:
        return None
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.dtype
    return None


def _run_source(module: Any, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    with torch.no_grad():
        if isinstance(module, torch.export.ExportedProgram):
            result = module.module()(*inputs)
        else:
            result = module(*inputs)
    return flatten_outputs(result)


def _tolerance(actual: torch.dtype, expected: torch.dtype):
    worst = (0.0, 0.0)
    for dtype in (actual, expected):
        tol = _TOLERANCES.get(dtype)
        if tol is not None and tol[0] > worst[0]:
            worst = tol
    return worst


def _compare(index: int, actual: torch.Tensor, expected: torch.Tensor,
             lowered_to: Optional[torch.dtype] = None) -> Optional[str]:
    """Why output ``index`` differs, or None when it matches.

    ``lowered_to``: the dtype a float32 model was compiled for (``default_dtype``): its
    float32 outputs may come back in it.
    """
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if tuple(actual.shape) != tuple(expected.shape):
        return f"output {index} has shape {tuple(actual.shape)}, the model's has " \
               f"{tuple(expected.shape)}"
    lowered = lowered_to is not None and expected.dtype == torch.float32 and \
        actual.dtype == lowered_to
    if actual.dtype != expected.dtype and not lowered:
        return f"output {index} has dtype {actual.dtype}, the model's has {expected.dtype}"
    if not actual.is_floating_point():
        if torch.equal(actual, expected):
            return None
        wrong = int((actual != expected).sum())
        return f"output {index} ({actual.dtype}) differs in {wrong} of {actual.numel()} elements"
    rtol, atol_fraction = _tolerance(actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    finite = e[torch.isfinite(e)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    atol = atol_fraction * scale
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None
    diff = (a - e).abs()
    diff[~torch.isfinite(diff)] = float("inf")
    return (f"output {index} ({actual.dtype}) differs from the model's ({expected.dtype}) in "
            f"{int((~close).sum())} of {close.numel()} elements: max abs difference "
            f"{float(diff.max()):.3g}, tolerance {atol:.3g} + {rtol:g} * |expected|")


@dataclasses.dataclass
class VerificationRun:
    """One compiled input signature's run: the inputs and, per side, the flat outputs."""

    inputs: List[torch.Tensor]
    expected: List[torch.Tensor]
    actual: List[torch.Tensor]


def check(source: Any, compiled: torch.nn.Module, input_sets: Sequence[Sequence[torch.Tensor]],
          source_device: str = "cpu",
          lowered_to: Optional[torch.dtype] = None) -> List[VerificationRun]:
    """Run ``source`` and ``compiled`` on each input set and compare every output.

    Parameters
    ----------
    source : torch.jit.ScriptModule, torch.nn.Module, torch.jit.ScriptFunction or
            torch.export.ExportedProgram
        The model as the user gave it.
    compiled : torch.nn.Module
        ``forward(List[Tensor]) -> List[Tensor]``.
    input_sets : sequence of sequence of torch.Tensor
        Inputs in the compiled program's dtypes; the source gets them cast to its own
        floating dtype and moved to ``source_device``.
    source_device : str
        Where the source model's parameters are.
    lowered_to : torch.dtype, optional
        The dtype a float32 model was compiled for, which its float32 outputs come back in.

    Raises
    ------
    ConversionError
        Naming the first output that differs, its error and the tolerance.
    """
    source_dtype = model_float_dtype(source) or torch.float32
    runs = []
    for inputs in input_sets:
        source_inputs = [t.to(source_device, source_dtype) if t.is_floating_point()
                         else t.to(source_device) for t in inputs]
        try:
            expected = _run_source(source, source_inputs)
        except Exception as err:  # pylint: disable=broad-except
            logger.warning("not verified: the model itself failed on the verification inputs "
                           "(%s: %s); pass 'example_inputs' to verify with inputs it takes",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            continue
        device = compiled.device if hasattr(compiled, "device") else torch.device("cpu")
        actual = list(compiled([t.to(device) for t in inputs]))
        compare_outputs(actual, expected, inputs, lowered_to)
        runs.append(VerificationRun(list(inputs), expected, actual))
    return runs


def compare_outputs(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                    inputs: Sequence[Any] = (), lowered_to: Optional[torch.dtype] = None) -> None:
    """Raise :class:`ConversionError` unless ``actual`` matches ``expected`` output by output.

    ``inputs`` only serve the message (their shapes are named); ``lowered_to`` is as in
    :func:`check`.
    """
    shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    if len(actual) != len(expected):
        raise ConversionError(
            f"tvm.contrib.torch: the compiled program returns {len(actual)} tensor(s), the "
            f"model {len(expected)}, for inputs of shapes {shapes}")
    for index, (a, e) in enumerate(zip(actual, expected)):
        problem = _compare(index, a, e, lowered_to)
        if problem is not None:
            raise ConversionError(
                f"tvm.contrib.torch: the compiled program is wrong: {problem} (inputs of "
                f"shapes {shapes}). Please report it; 'verify': False skips this check for "
                "models that are not deterministic.")


__all__ = ["VerificationRun", "check", "compare_outputs", "flatten_outputs", "index_bounds", "make_inputs",
           "model_float_dtype"]
