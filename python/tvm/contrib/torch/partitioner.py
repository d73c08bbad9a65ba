"""Partial offload: compile the parts of a TorchScript model TVM supports, keep the rest.

:func:`partition` freezes the model, records the tensor types of one run on the example inputs,
finds the runs of operators TVM converts (:mod:`.graph_partition`), compiles each run of at
least ``min_block_size`` operators into a ``TvmGraphModule`` (a ``TvmVMModule`` with symbolic
dims when its sizes varied between calls) and rewrites the graph so the run becomes one
guarded call of that module. Control flow, operators TVM cannot take and operators listed
in ``torch_executed_ops`` stay in TorchScript. The result is a ``torch.jit.ScriptModule`` with
the input's ``forward`` signature that saves and loads like any other; its
``tvm_partition_report`` attribute (JSON, saved with it) says what was offloaded.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import frontend
from . import graph_partition as gp
from .compiler import PyTorchTVMModule, apply_tuning_options
from .frontend import ConversionError
from .options import CompileOptions, parse_options

logger = logging.getLogger(__name__)

#: Name of the string attribute holding the report on the partitioned module.
REPORT_ATTRIBUTE = "tvm_partition_report"
_SEGMENT_PREFIX = "_tvm_segment_"


@dataclasses.dataclass
class PartitionReport:
    """What :func:`partition` offloaded to TVM and what stayed in TorchScript.

    Attributes
    ----------
    num_operators : int
        Operators in the frozen model (constants and list/tuple/size plumbing not counted;
        ``prim::If`` / ``prim::Loop`` counted).
    offloaded_operators : int
        Operators now running in TVM programs.
    kept_operators : dict of str to int
        Operators still run by TorchScript, by kind.
    segments : list of dict
        One entry per TVM program: ``attribute``, ``operators`` (kind -> count),
        ``input_shapes``, ``input_dtypes``, ``num_outputs``.
    kept_reasons : dict of str to str
        For each kept kind, why (the first reason met).
    skipped : list of dict
        Runs of convertible operators left in TorchScript: ``operators`` and ``reason``.
    """

    num_operators: int
    offloaded_operators: int
    kept_operators: Dict[str, int]
    segments: List[Dict[str, Any]]
    kept_reasons: Dict[str, str]
    skipped: List[Dict[str, Any]]

    @property
    def num_subgraphs(self) -> int:
        """Number of TVM programs."""
        return len(self.segments)

    @property
    def num_kept_operators(self) -> int:
        """Operators still run by TorchScript."""
        return sum(self.kept_operators.values())

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PartitionReport":
        """Read a report written by :meth:`to_json`."""
        return cls(**json.loads(text))

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.offloaded_operators} of {self.num_operators} operators offloaded to "
                 f"TVM in {self.num_subgraphs} subgraph(s); {self.num_kept_operators} kept in "
                 "TorchScript"]
        for kind, count in sorted(self.kept_operators.items()):
            reason = self.kept_reasons.get(kind, "")
            lines.append(f"  kept {kind} x{count}" + (f": {reason}" if reason else ""))
        return "\n".join(lines)


def partition_report(module: torch.jit.ScriptModule) -> PartitionReport:
    """The report stored on a module returned by :func:`partition` (also after loading)."""
    if not hasattr(module, REPORT_ATTRIBUTE):
        raise ValueError("tvm.contrib.torch: this module was not made by partition(); it has no "
                         f"'{REPORT_ATTRIBUTE}' attribute")
    return PartitionReport.from_json(getattr(module, REPORT_ATTRIBUTE))


def _as_script(module: Any, example_inputs: Sequence[Any]) -> torch.jit.ScriptModule:
    if isinstance(module, torch.export.ExportedProgram):
        raise TypeError("tvm.contrib.torch.partition: expected a TorchScript module or an "
                        "nn.Module, got an ExportedProgram (it has no TorchScript graph to "
                        "partition; compile() without 'partition' takes it whole)")
    if isinstance(module, torch.jit.ScriptModule):
        return module
    if isinstance(module, torch.nn.Module):
        try:
            return torch.jit.script(module)
        except Exception as err:  # pylint: disable=broad-except
            logger.info("torch.jit.script failed (%s); tracing with the example inputs",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            with torch.no_grad():
                return torch.jit.trace(module, tuple(example_inputs))
    raise TypeError("tvm.contrib.torch.partition: expected a torch.jit.ScriptModule or a "
                    f"torch.nn.Module, got {type(module).__name__}")


def _freeze(script: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze (weights become constants, methods inlined) and functionalise in-place ops."""
    frozen = frontend.freeze(script)
    # relu_ / add_ on values nothing else aliases become relu / add (TVM takes those).
    torch._C._jit_pass_remove_mutation(frozen.graph)  # pylint: disable=protected-access
    return frozen


def _complete_arguments(frozen: torch.jit.ScriptModule, example_inputs: Sequence[Any]) -> List[Any]:
    """``example_inputs`` plus the defaults of the forward arguments they leave out."""
    arguments = frozen.forward.schema.arguments[1:]
    if len(example_inputs) > len(arguments):
        raise TypeError(f"tvm.contrib.torch.partition: forward takes {len(arguments)} "
                        f"argument(s) ({', '.join(a.name for a in arguments)}), "
                        f"example_inputs has {len(example_inputs)}")
    values = list(example_inputs)
    for arg in arguments[len(values):]:
        if not arg.has_default_value():
            raise TypeError(f"tvm.contrib.torch.partition: example_inputs leaves out forward's "
                            f"argument '{arg.name}', which has no default")
        values.append(arg.default_value)
    return values


def _device_of(example_inputs: Sequence[Any]) -> str:
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return str(value.device)
    return "cpu"


# ---------------------------------------------------------------------------------------------
# one segment: subgraph, compilation, rewrite


def _subgraph(segment: gp.Segment, upcast_half: bool = False) -> torch._C.Graph:
    """A standalone graph computing the segment's outputs from its inputs (constants copied).

    ``upcast_half``: float16 weights are copied as float32 (the pipeline converts a float32
    model and makes it float16 with ``ToMixedPrecision``, float16 inputs and outputs).
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
            if gp.is_tensor(value) and producer.kindOf("value") == "t":
                # Conversion reads the weights on the host; the program runs on the device.
                weight = producer.t("value").cpu()
                if upcast_half and weight.dtype == torch.float16:
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


def _input_infos(segment: gp.Segment, classes: gp.Classification):
    """``input_infos`` and ``dim_ranges`` of a segment's program, from the recorded types.

    A dim whose size varied between calls becomes symbolic; dims whose sizes varied the same
    way (the same sequence of sizes) share a symbol. Its range runs from the smallest size
    seen to eight times the largest; sizes outside it fall back to TorchScript.
    """
    symbols: Dict[tuple, str] = {}
    ranges: Dict[str, tuple] = {}
    infos = []
    for index, value in enumerate(segment.inputs):
        records = classes.types[value]
        dims = []
        for axis in range(len(records[0][0])):
            sizes = tuple(record[0][axis] for record in records)
            if len(set(sizes)) == 1:
                dims.append(sizes[0])
                continue
            name = symbols.setdefault(sizes, f"s{len(symbols)}")
            ranges[name] = (min(sizes), 8 * max(sizes))
            dims.append(name)
        infos.append((f"input{index}", tuple(dims), records[0][1]))
    return infos, ranges


def _rewrite(graph: torch._C.Graph, segment: gp.Segment, engine: torch.ScriptObject,
             attribute: str, classes: gp.Classification) -> List[torch._C.Node]:
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


def _split_points(nodes: Sequence[torch._C.Node]) -> List[int]:
    """Indices where a run can be cut: no non-tensor value crosses the cut."""
    points = []
    for cut in range(1, len(nodes)):
        later = set(nodes[cut:])
        crossing = any(use.user in later for node in nodes[:cut] for v in node.outputs()
                       if not gp.is_tensor(v) for use in v.uses())
        if not crossing:
            points.append(cut)
    return points


class _Partitioner:
    """State of one :func:`partition` call."""

    def __init__(self, frozen: torch.jit.ScriptModule, opts: CompileOptions, device: str,
                 classes: gp.Classification):
        self.frozen = frozen
        self.graph = frozen.graph
        self.opts = opts
        self.device = device
        self.classes = classes
        self.segments: List[Dict[str, Any]] = []
        self.skipped: List[Dict[str, Any]] = []
        self.calls: List[torch._C.Node] = []

    def skip(self, segment: gp.Segment, reason: str) -> None:
        """Leave a run in TorchScript, noting why."""
        self.skipped.append({"operators": segment.operators, "reason": reason})
        for node in segment.nodes:
            if node in self.classes.compute:
                self.classes.reasons.setdefault(node, reason)

    def offload(self, nodes: List[torch._C.Node]) -> None:
        """Compile a run (splitting it when TVM cannot convert it whole) and rewrite the graph."""
        segment = gp.segment_of(nodes, self.classes)
        if not segment.meets(self.opts.min_block_size):
            self.skip(segment, f"a run of {segment.num_operators} operator(s), below "
                               f"min_block_size={self.opts.min_block_size}")
            return
        if not segment.outputs:
            return
        if not segment.inputs:
            self.skip(segment, "computes from constants only")
            return
        try:
            module = self._compile(segment)
        except Exception as err:  # pylint: disable=broad-except
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            points = _split_points(nodes)
            if segment.num_operators <= 1 or not points:
                logger.warning("kept in TorchScript, TVM could not compile %s: %s",
                               sorted(segment.operators), message)
                self.skip(segment, f"TVM could not compile it: {message}")
                return
            cut = min(points, key=lambda p: abs(p - len(nodes) // 2))
            logger.info("TVM could not compile a run of %d operators (%s); splitting it",
                        segment.num_operators, message)
            self.offload(list(nodes[:cut]))
            self.offload(list(nodes[cut:]))
            return
        index = len(self.segments)
        attribute = f"{_SEGMENT_PREFIX}{index}"
        engine = module.engine
        self.frozen._c._register_attribute(  # pylint: disable=protected-access
            attribute, engine._type(), engine)  # pylint: disable=protected-access
        # Earlier rewrites may have replaced the values the run reads: its inputs are re-read.
        segment = gp.segment_of(nodes, self.classes)
        self.calls.extend(_rewrite(self.graph, segment, engine, attribute, self.classes))
        infos, ranges = _input_infos(segment, self.classes)
        self.segments.append({
            "attribute": attribute,
            "operators": segment.operators,
            "input_shapes": [list(i[1]) for i in infos],
            "input_dtypes": [i[2] for i in infos],
            "dim_ranges": {k: list(v) for k, v in ranges.items()},
            "num_outputs": len(segment.outputs),
        })

    def _compile(self, segment: gp.Segment) -> torch.nn.Module:
        index = len(self.segments)
        infos, ranges = _input_infos(segment, self.classes)
        floats = {dtype for _, _, dtype in infos if dtype in ("float32", "float16")}
        default_dtype = "float16" if floats == {"float16"} else "float32"
        function = torch._C._create_function_from_graph(  # pylint: disable=protected-access
            f"tvm_segment_{index}", _subgraph(segment, upcast_half=default_dtype == "float16"))
        started = time.perf_counter()
        ptm = PyTorchTVMModule(target=self.opts.target, device=self.device)
        ptm.vendor_kernels = self.opts.vendor_kernels
        ptm.from_pytorch(function, infos, default_dtype=default_dtype, dim_ranges=ranges)
        if ptm.num_outputs != len(segment.outputs):
            raise ConversionError(f"the program returns {ptm.num_outputs} tensors, the run has "
                                  f"{len(segment.outputs)} outputs")
        apply_tuning_options(ptm, self.opts)
        # Each program gets its own directory; a second pass over the same run overwrites.
        ptm.build_tvm(os.path.join(self.opts.export_dir, f"segment{index}"))
        module = ptm.build_pytorch_module(len(segment.inputs), len(segment.outputs))
        logger.info("compiled subgraph %d (%d operators) in %.1fs", index,
                    segment.num_operators, time.perf_counter() - started)
        return module


def _count_operators(graph: torch._C.Graph, exclude=()) -> Dict[str, int]:
    """Operators by kind, not counting ``exclude`` nodes and what their blocks hold."""
    excluded = set(exclude)
    counts: Dict[str, int] = collections.Counter()

    def visit(block):
        for node in block.nodes():
            if node in excluded:
                continue
            if gp.is_operator(node):
                counts[node.kind()] += 1
            for sub in node.blocks():
                visit(sub)

    visit(graph.block())
    return dict(counts)


def _kept_reasons(classes: gp.Classification, graph: torch._C.Graph) -> Dict[str, str]:
    reasons: Dict[str, str] = {}
    for node in gp.walk_nodes(graph.block()):
        if gp.is_operator(node) and node in classes.reasons:
            reasons.setdefault(node.kind(), classes.reasons[node])
    return reasons


def _full_compilation_error(kept: Dict[str, int], reasons: Dict[str, str]) -> ConversionError:
    lines = [f"  {kind} x{count}: {reasons.get(kind, 'kept')}"
             for kind, count in sorted(kept.items())]
    return ConversionError("tvm.contrib.torch.partition: require_full_compilation is set but "
                           "these operators would stay in TorchScript:\n" + "\n".join(lines))


def _check_full_compilation(graph: torch._C.Graph, runs: List[List[torch._C.Node]],
                            classes: gp.Classification, min_block_size: int) -> None:
    """Before compiling anything: raise if an operator cannot be in any subgraph."""
    kept = _count_operators(graph, [node for run in runs for node in run])
    for run in runs:
        if gp.segment_of(run, classes).meets(min_block_size):
            continue
        for node in run:
            if node in classes.compute:
                kept[node.kind()] = kept.get(node.kind(), 0) + 1
                classes.reasons.setdefault(node, f"in a run below min_block_size={min_block_size}")
    if kept:
        raise _full_compilation_error(kept, _kept_reasons(classes, graph))


def partition(module: Any, example_inputs: Sequence[Any],
              option: Optional[Dict[str, Any]] = None) -> torch.jit.ScriptModule:
    """Offload the parts of a model TVM supports; keep the rest in TorchScript.

    Parameters
    ----------
    module : torch.jit.ScriptModule or torch.nn.Module
        A traced or scripted module, or a plain module (scripted, or traced when scripting
        fails). It computes in its own dtype; convert it (``.half()``) for float16.
    example_inputs : sequence
        The arguments of one ``forward`` call. Shapes inside the model are recorded from
        this call: TVM programs are compiled for these shapes (with symbolic dims where sizes
        varied between loop iterations); branches not taken stay in TorchScript.
    option : dict, optional
        ``min_block_size`` (default 3), ``torch_executed_ops`` (operator kinds such as
        ``"aten::relu"`` that stay in TorchScript), ``require_full_compilation`` (raise
        instead of keeping operators in TorchScript), ``dynamic_shapes`` (default True:
        varying sizes get symbolic dims), and the compile options ``export_dir``,
        ``target``, ``vendor_kernels``, ``tuning_n_trials``, ``tuning_log_file``.

    Returns
    -------
    torch.jit.ScriptModule
        Same ``forward`` signature as ``module``; saves and loads like any TorchScript
        module (``import tvm.contrib.torch`` before loading). :func:`partition_report`
        reads what was offloaded.

    Raises
    ------
    ConversionError
        With ``require_full_compilation``, naming the operators that would stay.
    """
    option = dict(option or {})
    option.pop("partition", None)
    opts = parse_options(option, require_input_infos=False)
    if opts.buckets:
        raise ValueError("tvm.contrib.torch.partition: shapes come from example_inputs; "
                         "drop 'input_infos' (compile(..., {'partition': True}) takes it)")
    if opts.default_dtype != "float32" or opts.dim_ranges or opts.bucket_padding:
        raise ValueError("tvm.contrib.torch.partition: default_dtype, dim_ranges and "
                         "bucket_padding do not apply; the model runs in its own dtype at the "
                         "example shapes (convert it with .half() for float16)")
    if not isinstance(example_inputs, (list, tuple)):
        raise TypeError("tvm.contrib.torch.partition: example_inputs must be a list or tuple "
                        f"of forward's arguments, got {type(example_inputs).__name__}")
    started = time.perf_counter()
    device = opts.device or _device_of(example_inputs)
    with frontend.quiet_torchscript_warnings():
        script = _as_script(module, example_inputs)
        frozen = _freeze(script)
    graph = frozen.graph
    types = gp.record_tensor_types(graph, frozen, _complete_arguments(frozen, example_inputs))
    classes = gp.classify(graph, types, opts.torch_executed_ops, opts.dynamic_shapes)
    before = _count_operators(graph)
    runs = gp.find_runs(graph, classes)
    if opts.require_full_compilation:
        _check_full_compilation(graph, runs, classes, opts.min_block_size)
    worker = _Partitioner(frozen, opts, device, classes)
    for run in runs:
        worker.offload(run)
    torch._C._jit_pass_dce(graph)  # pylint: disable=protected-access
    graph.lint()
    kept = _count_operators(graph, worker.calls)
    reasons = _kept_reasons(classes, graph)
    if opts.require_full_compilation and kept:
        raise _full_compilation_error(kept, reasons)
    report = PartitionReport(
        num_operators=sum(before.values()),
        offloaded_operators=sum(sum(s["operators"].values()) for s in worker.segments),
        kept_operators=kept,
        segments=worker.segments,
        kept_reasons=reasons,
        skipped=worker.skipped,
    )
    frozen._c._register_attribute(  # pylint: disable=protected-access
        REPORT_ATTRIBUTE, torch._C.StringType.get(), report.to_json())
    # A save/load round trip gives a module exactly like the one users will load later (and
    # checks that it serialises).
    buffer = io.BytesIO()
    with frontend.quiet_torchscript_warnings():
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        result = torch.jit.load(buffer, map_location=device)
    logger.info("partitioned in %.1fs: %s", time.perf_counter() - started,
                report.summary().splitlines()[0])
    return result


__all__ = ["PartitionReport", "partition", "partition_report"]
