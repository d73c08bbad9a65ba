"""Step 1 of partitioning: the tensor types every value of a graph takes on one run.

:func:`record_tensor_types` runs a copy of the graph once on example inputs with a recording
operator after every tensor value, so each value gets the ``(shape, dtype, device)`` it took.
Values in loop bodies may take several; values in branches not taken take none.
"""
from __future__ import annotations

import collections
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .graph_utils import is_tensor, walk_nodes

#: ``(shape, dtype, device type)`` of one recorded tensor.
TensorType = Tuple[Tuple[int, ...], str, str]

_RECORD_OP = "tvm_torch_partition::record"
_library: Optional[torch.library.Library] = None
_recording = threading.local()


#: What a wrapped number (a 0-dim tensor TorchScript made from a Python scalar, e.g. by
#: ``x + self.pos[:, 0:x.size(1)]``) is as a tensor; it reaches a Python operator unwrapped.
_WRAPPED_DTYPES = {bool: "bool", int: "int64", float: "float64"}


def _record(tensor: torch.Tensor, key: int) -> None:
    store = getattr(_recording, "store", None)
    if store is None:
        return
    if isinstance(tensor, torch.Tensor):
        dtype = str(tensor.dtype).replace("torch.", "")
        store[key].append((tuple(tensor.shape), dtype, tensor.device.type))
    elif type(tensor) in _WRAPPED_DTYPES:
        store[key].append(((), _WRAPPED_DTYPES[type(tensor)], "cpu"))


def _define_record_op() -> None:
    global _library  # pylint: disable=global-statement
    if _library is None:
        _library = torch.library.Library("tvm_torch_partition", "DEF")
        _library.define("record(Tensor x, int key) -> ()")
        _library.impl("record", _record, "CompositeExplicitAutograd")


def _defined_values(graph: torch._C.Graph) -> List[Tuple[torch._C.Value, object, object]]:
    """Every value in definition order with where it is defined: ``(value, block, node)``.

    ``node`` is the defining node, or ``None`` for graph and block inputs. The order is the
    same for a graph and its ``copy()``, which maps values between the two.
    """
    out = [(v, graph.block(), None) for v in graph.inputs()]

    def visit(block):
        for node in block.nodes():
            out.extend((v, block, node) for v in node.outputs())
            for sub in node.blocks():
                out.extend((v, sub, None) for v in sub.inputs())
                visit(sub)

    visit(graph.block())
    return out


def _first_position(block):
    return next(iter(block.nodes()), None) or block.returnNode()


def record_tensor_types(graph: torch._C.Graph, module: torch.jit.ScriptModule,
                        example_inputs: Sequence[torch.Tensor]) -> Dict[torch._C.Value, List[TensorType]]:
    """Run ``graph`` (a method graph of ``module``) once and record every tensor value's type.

    Returns
    -------
    dict
        For each tensor value of ``graph`` that was computed, the types it took, in the order
        it took them (several for values in loop bodies).
    """
    _define_record_op()
    original = _defined_values(graph)
    copy = graph.copy()
    copied = _defined_values(copy)
    int_type = torch._C.IntType.get()
    for key, (value, block, node) in enumerate(copied):
        if not is_tensor(value):
            continue
        if node is None and block is not copy.block():
            continue  # a loop-carried value, maybe uninitialised on entry: derived below
        if node is not None and node.kind() == "prim::Uninitialized":
            continue
        constant = copy.create("prim::Constant")
        constant.i_("value", key)
        constant.output().setType(int_type)
        record = copy.create(_RECORD_OP, [value, constant.output()], 0)
        if node is None:
            constant.insertBefore(_first_position(block))
        else:
            constant.insertAfter(node)
        record.insertAfter(constant)
    function = torch._C._create_function_from_graph(  # pylint: disable=protected-access
        "tvm_torch_record_types", copy)
    _recording.store = collections.defaultdict(list)
    try:
        with torch.no_grad(), torch.jit.optimized_execution(False):
            try:
                function(module._c, *example_inputs)  # pylint: disable=protected-access
            except RuntimeError as err:
                lines = [line for line in str(err).splitlines() if line.strip()]
                raise RuntimeError("tvm.contrib.torch.partition: running the model on "
                                   f"example_inputs failed: {lines[-1] if lines else err}") \
                    from err
        store = _recording.store
    finally:
        _recording.store = None
    types = {original[key][0]: seen for key, seen in store.items()}
    _derive_loop_carried(graph, types)
    return types


def _derive_loop_carried(graph: torch._C.Graph, types: Dict[torch._C.Value, List[TensorType]]):
    """Types of loop-carried tensors: those of their initial and their next values."""
    for node in walk_nodes(graph.block()):
        if node.kind() != "prim::Loop":
            continue
        body = next(iter(node.blocks()))
        for carried, initial, following in zip(list(body.inputs())[1:],
                                               list(node.inputs())[2:],
                                               list(body.outputs())[1:]):
            seen = types.get(initial, []) + types.get(following, [])
            if is_tensor(carried) and seen:
                types[carried] = seen


__all__ = ["TensorType", "record_tensor_types"]
