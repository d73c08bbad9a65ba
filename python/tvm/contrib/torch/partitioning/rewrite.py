"""Step 4 of partitioning: a segment as a standalone graph, and the graph rewritten to call it.

:func:`subgraph` copies a segment's nodes (with the constants they read) into a graph of their
own, which the pipeline compiles; :func:`rewrite` then routes the segment's outputs through
the compiled program, behind a guard that runs the original nodes for inputs the program was
not compiled for.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .classification import Classification
from .graph_utils import is_tensor
from .segments import Segment


def subgraph(segment: Segment, upcast_half: bool = False) -> torch._C.Graph:
    """A standalone graph computing the segment's outputs from its inputs (constants copied).

    ``upcast_half``: float16/bfloat16 weights are copied as float32 (the pipeline converts a
    float32 model and lowers it to ``default_dtype`` itself, with inputs and outputs in it).
    """
    graph = torch._C.Graph()
    mapping: Dict[torch._C.Value, torch._C.Value] = {}
    for value in segment.inputs:
        new = graph.addInput()
        new.setType(torch._C.TensorType.get())
        mapping[value] = new

    def lookup(value):
        if value not in mapping:
            producer = value.node()
            assert producer.kind() == "prim::Constant", producer.kind()
            constant = graph.createClone(producer, lambda v: v)
            if is_tensor(value) and producer.kindOf("value") == "t":
                # Conversion reads the weights on the host; the program runs on the device.
                weight = producer.t("value").cpu()
                if upcast_half and weight.dtype in (torch.float16, torch.bfloat16):
                    weight = weight.float()
                constant.t_("value", weight)
            graph.appendNode(constant)
            # Flat names: torch's converter turns dotted names ("self.fc.weight") into
            # attribute paths, which clash when one name prefixes another.
            constant.output().setDebugName(f"constant{len(mapping)}")
            mapping[value] = constant.output()
        return mapping[value]

    for node in segment.pulled + segment.nodes:
        clone = graph.createClone(node, lookup)
        graph.appendNode(clone)
        for old, new in zip(node.outputs(), clone.outputs()):
            mapping[old] = new
    outputs = [mapping[v] for v in segment.outputs]
    if len(outputs) == 1:
        graph.registerOutput(outputs[0])
    else:
        pack = graph.create("prim::TupleConstruct", outputs, 1)
        pack.output().setType(torch._C.TupleType([v.type() for v in outputs]))
        graph.appendNode(pack)
        graph.registerOutput(pack.output())
    return graph


def rewrite(graph: torch._C.Graph, segment: Segment, engine: torch.ScriptObject,
             attribute: str, classes: Classification) -> List[torch._C.Node]:
    """Route the segment's outputs through the TVM program, guarded by ``engine.accepts``.

    Inserted before the segment's first node::

        inputs = [...]
        if self.<attribute>.accepts(inputs):
            outputs = self.<attribute>.forward(inputs)
        else:
            outputs = <the segment's nodes, as they were>

    so inputs of shapes the program was not compiled for still run (in TorchScript). The
    original nodes become dead (dead-code elimination removes them), except the kept ones,
    which now read the ``if``'s outputs.

    Returns
    -------
    list of torch._C.Node
        The inserted operator nodes (the ``accepts`` call and the ``prim::If``).
    """
    tensor_type = torch._C.TensorType.get()
    tensor_list = torch._C.ListType(tensor_type)
    self_value = next(graph.inputs())
    first = segment.nodes[0]
    get = graph.create("prim::GetAttr", [self_value], 1)
    get.s_("name", attribute)
    get.output().setType(engine._type())  # pylint: disable=protected-access
    get.insertBefore(first)
    pack = graph.create("prim::ListConstruct", list(segment.inputs), 1)
    pack.output().setType(tensor_list)
    pack.insertAfter(get)
    accepts = graph.create("prim::CallMethod", [get.output(), pack.output()], 1)
    accepts.s_("name", "accepts")
    accepts.output().setType(torch._C.BoolType.get())
    accepts.insertAfter(pack)
    branch = graph.create("prim::If", [accepts.output()], len(segment.outputs))
    branch.insertAfter(accepts)
    compiled, fallback = branch.addBlock(), branch.addBlock()

    call = graph.create("prim::CallMethod", [get.output(), pack.output()], 1)
    call.s_("name", "forward")
    call.output().setType(tensor_list)
    call.insertBefore(compiled.returnNode())
    unpack = graph.create("prim::ListUnpack", [call.output()], len(segment.outputs))
    unpack.insertBefore(compiled.returnNode())
    for value in unpack.outputs():
        value.setType(tensor_type)
        compiled.registerOutput(value)

    mapping: Dict[torch._C.Value, torch._C.Value] = {}

    def lookup(value):
        if value not in mapping and value.node().kind() == "prim::Constant":
            # Constants may sit after the insertion point: copy them into the block.
            constant = graph.createClone(value.node(), lambda v: v)
            constant.insertBefore(fallback.returnNode())
            mapping[value] = constant.output()
        return mapping.get(value, value)

    for node in segment.nodes:
        clone = graph.createClone(node, lookup)
        clone.insertBefore(fallback.returnNode())
        for old, new in zip(node.outputs(), clone.outputs()):
            mapping[old] = new
    for value in segment.outputs:
        fallback.registerOutput(mapping[value])

    for old, new in zip(segment.outputs, branch.outputs()):
        new.setType(tensor_type)
        classes.types[new] = classes.types.get(old, [])
        old.replaceAllUsesWith(new)
    return [accepts, branch]


__all__ = ["rewrite", "subgraph"]
