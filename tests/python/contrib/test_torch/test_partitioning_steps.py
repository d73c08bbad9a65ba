"""The partitioning steps on tiny scripted graphs: recording, classification, runs, segments.

No TVM build: these check which nodes TVM would take and how they are grouped.
"""
from __future__ import annotations

from typing import List

import torch

from tvm.contrib.torch.partitioning.classification import classify, is_operator, is_pure
from tvm.contrib.torch.partitioning.recording import record_tensor_types
from tvm.contrib.torch.partitioning.segments import find_runs, input_infos, segment_of

import partition_models  # noqa: F401  (registers the custom operator)


def _analyse(module: torch.nn.Module, *inputs, **kwargs):
    frozen = torch.jit.freeze(torch.jit.script(module.eval()))
    graph = frozen.graph
    types = record_tensor_types(graph, frozen, list(inputs))
    classes = classify(graph, types, **kwargs)
    return graph, classes


def _kinds(nodes) -> List[str]:
    return [n.kind() for n in nodes if is_operator(n)]


def _node(graph, kind):
    return next(n for n in graph.nodes() if n.kind() == kind)


class Chain(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x * 2.0 + 1.0)
        return torch.sigmoid(y)


def test_recorded_types_and_one_run():
    graph, classes = _analyse(Chain(), torch.rand(2, 3))
    runs = find_runs(graph, classes)
    assert len(runs) == 1 and _kinds(runs[0]) == ["aten::mul", "aten::add", "aten::relu",
                                                  "aten::sigmoid"]
    segment = segment_of(runs[0], classes)
    assert segment.num_operators == 4 and segment.meets(3) and not segment.meets(5)
    assert len(segment.inputs) == 1 and len(segment.outputs) == 1
    infos, ranges = input_infos(segment, classes)
    assert [(i.shape, i.dtype) for i in infos] == [((2, 3), "float32")] and ranges == {}


class WithCustomOp(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x + 1.0)
        y = torch.ops.tvm_test.scale_shift(y)
        return torch.tanh(y - 1.0)


def test_custom_operator_is_kept_and_splits_the_runs():
    graph, classes = _analyse(WithCustomOp(), torch.rand(4))
    custom = _node(graph, partition_models.CUSTOM_OP)
    assert custom not in classes.compute and "not an ATen operator" in classes.reasons[custom]
    runs = find_runs(graph, classes)
    assert [_kinds(r) for r in runs] == [["aten::add", "aten::relu"], ["aten::sub", "aten::tanh"]]


def test_torch_executed_ops_are_kept():
    graph, classes = _analyse(Chain(), torch.rand(2, 3), torch_executed_ops=["aten::relu"])
    relu = _node(graph, "aten::relu")
    assert classes.reasons[relu] == "listed in torch_executed_ops"
    assert [_kinds(r) for r in find_runs(graph, classes)] == [["aten::mul", "aten::add"],
                                                               ["aten::sigmoid"]]


class Branch(torch.nn.Module):
    def forward(self, x, flag: bool):
        if flag:
            x = torch.relu(x) * 3.0
        else:
            x = torch.tanh(x) - 1.0
        return x + 1.0


def test_branches_are_searched_and_the_branch_not_taken_stays():
    graph, classes = _analyse(Branch(), torch.rand(3), True)
    branch = _node(graph, "prim::If")
    assert "control flow" in classes.reasons[branch] and is_pure(branch)
    taken, other = list(branch.blocks())
    tanh = next(n for n in other.nodes() if n.kind() == "aten::tanh")
    assert classes.reasons[tanh] == "not executed with the example inputs"
    runs = [_kinds(r) for r in find_runs(graph, classes)]
    assert ["aten::relu", "aten::mul"] in runs and ["aten::add"] in runs
    assert not any("aten::tanh" in r for r in runs)


class Loop(torch.nn.Module):
    def forward(self, x, steps: int):
        for _ in range(steps):
            x = torch.cat([x, x * 2.0], 0)
        return x


def test_sizes_that_vary_in_a_loop_make_a_dynamic_segment():
    graph, classes = _analyse(Loop(), torch.rand(2, 4), 3)
    runs = find_runs(graph, classes)
    assert [_kinds(r) for r in runs] == [["aten::mul", "aten::cat"]]
    infos, ranges = input_infos(segment_of(runs[0], classes), classes)
    # The carried x took 2, 4, 8 and 16 rows: the range is [smallest, 8 x largest].
    assert infos[0].shape == ("s0", 4) and ranges == {"s0": (2, 128)}
    graph, classes = _analyse(Loop(), torch.rand(2, 4), 3, dynamic_shapes=False)
    cat = _node(next(_node(graph, "prim::Loop").blocks()), "aten::cat")
    assert classes.reasons[cat].startswith("shapes vary between calls")
    assert find_runs(graph, classes) == []


class Mutating(torch.nn.Module):
    def forward(self, x):
        y = x * 2.0
        y.add_(1.0)
        return torch.relu(y)


def test_in_place_operator_is_kept_and_not_moved_across():
    graph, classes = _analyse(Mutating(), torch.rand(3))
    add_ = _node(graph, "aten::add_")
    assert classes.reasons[add_] == "mutates its inputs" and not is_pure(add_)
    assert [_kinds(r) for r in find_runs(graph, classes)] == [["aten::mul"], ["aten::relu"]]


class Dropout(torch.nn.Module):
    def forward(self, x, p: float):
        return torch.dropout(torch.relu(x), p, True)


def test_random_operator_is_kept():
    graph, classes = _analyse(Dropout(), torch.rand(3), 0.5)
    assert classes.reasons[_node(graph, "aten::dropout")] == "nondeterministic"


class ShapeArithmetic(torch.nn.Module):
    def forward(self, x):
        n, d = x.shape
        return torch.relu(x.reshape(n, d // 2, 2)).sum(-1)


def test_shape_plumbing_joins_the_run_and_is_not_counted():
    graph, classes = _analyse(ShapeArithmetic(), torch.rand(4, 6))
    runs = find_runs(graph, classes)
    assert [_kinds(r) for r in runs] == [["aten::reshape", "aten::relu", "aten::sum"]]
    segment = segment_of(runs[0], classes)
    assert segment.num_operators == 3 and len(segment.inputs) == 1
    assert {n.kind() for n in runs[0] if n in classes.structural} >= {"aten::size"}
