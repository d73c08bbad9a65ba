"""Step 6 of partitioning: :func:`partition`, the driver of the other steps.

:func:`partition` freezes the model, records the tensor types of one run on the example inputs
(:mod:`.recording`), classifies the nodes (:mod:`.classification`), finds the runs of
operators TVM converts (:mod:`.segments`), compiles each run of at least ``min_block_size``
operators with :func:`~tvm.contrib.torch.pipeline.compile_program` (a ``TvmVMModule`` with
symbolic dims when its sizes varied between calls) and rewrites the graph so the run becomes
one guarded call of that module (:mod:`.rewrite`). Control flow, operators TVM cannot take and
operators listed in ``torch_executed_ops`` stay in TorchScript. The result is a
``torch.jit.ScriptModule`` with the input's ``forward`` signature that saves and loads like any
other; its ``tvm_partition_report`` attribute (:mod:`.report`, saved with it) says what was
offloaded.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import frontend, verify
from ..dtypes import COMPUTE_DTYPES
from ..errors import TuningError
from ..options import CompileOptions, check_dim_ranges, make_input_info, parse_options
from ..pipeline import compile_program
from .classification import Classification, classify
from .recording import record_tensor_types
from .report import (
    REPORT_ATTRIBUTE,
    PartitionReport,
    count_operators,
    full_compilation_error,
    kept_reasons,
)
from .rewrite import rewrite, subgraph
from .segments import Segment, find_runs, input_infos, segment_of, split_points

logger = logging.getLogger(__name__)

_SEGMENT_PREFIX = "_tvm_segment_"


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


class _Partitioner:
    """State of one :func:`partition` call."""

    def __init__(self, frozen: torch.jit.ScriptModule, opts: CompileOptions,
                 classes: Classification):
        self.frozen = frozen
        self.graph = frozen.graph
        self.opts = opts
        self.classes = classes
        self.segments: List[Dict[str, Any]] = []
        self.skipped: List[Dict[str, Any]] = []
        self.calls: List[torch._C.Node] = []

    def skip(self, segment: Segment, reason: str) -> None:
        """Leave a run in TorchScript, noting why."""
        self.skipped.append({"operators": segment.operators, "reason": reason})
        for node in segment.nodes:
            if node in self.classes.compute:
                self.classes.reasons.setdefault(node, reason)

    def offload(self, nodes: List[torch._C.Node]) -> None:
        """Compile a run (splitting it when TVM cannot convert it whole) and rewrite the graph."""
        segment = segment_of(nodes, self.classes)
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
        except TuningError:
            raise  # the tracker, not this subgraph, is at fault: no TorchScript fallback
        except Exception as err:  # pylint: disable=broad-except
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            points = split_points(nodes)
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
        segment = segment_of(nodes, self.classes)
        self.calls.extend(rewrite(self.graph, segment, engine, attribute, self.classes))
        infos, ranges = input_infos(segment, self.classes)
        self.segments.append({
            "attribute": attribute,
            "operators": segment.operators,
            "input_shapes": [list(i.shape) for i in infos],
            "input_dtypes": [i.dtype for i in infos],
            "dim_ranges": {k: list(v) for k, v in ranges.items()},
            "num_outputs": len(segment.outputs),
        })

    def _compile(self, segment: Segment) -> torch.nn.Module:
        index = len(self.segments)
        infos, ranges = input_infos(segment, self.classes)
        floats = {info.dtype for info in infos if info.dtype in COMPUTE_DTYPES}
        default_dtype = floats.pop() if len(floats) == 1 else "float32"
        function = torch._C._create_function_from_graph(  # pylint: disable=protected-access
            f"tvm_segment_{index}", subgraph(segment, upcast_half=default_dtype != "float32"))
        bucket = [make_input_info(info.name, info.shape, info.dtype, default_dtype, position)
                  for position, info in enumerate(infos)]
        # The partitioned model is verified whole, on the user's example inputs; generated
        # inputs could index out of range inside a subgraph.
        options = dataclasses.replace(self.opts, default_dtype=default_dtype,
                                      dim_ranges=check_dim_ranges(ranges),
                                      num_outputs=len(segment.outputs), verify=False)
        started = time.perf_counter()
        # Each program gets its own directory; a second pass over the same run overwrites.
        module = compile_program(function, [bucket], options,
                                 os.path.join(self.opts.export_dir, f"segment{index}"))
        logger.info("compiled subgraph %d (%d operators) in %.1fs", index,
                    segment.num_operators, time.perf_counter() - started)
        return module


def _check_full_compilation(graph: torch._C.Graph, runs: List[List[torch._C.Node]],
                            classes: Classification, min_block_size: int) -> None:
    """Before compiling anything: raise if an operator cannot be in any subgraph."""
    kept = count_operators(graph, [node for run in runs for node in run])
    for run in runs:
        if segment_of(run, classes).meets(min_block_size):
            continue
        for node in run:
            if node in classes.compute:
                kept[node.kind()] = kept.get(node.kind(), 0) + 1
                classes.reasons.setdefault(node, f"in a run below min_block_size={min_block_size}")
    if kept:
        raise full_compilation_error(kept, kept_reasons(classes, graph))


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
    if opts.cache_dir is not None:
        raise ValueError("tvm.contrib.torch.partition: cache_dir applies only to the "
                         "torch.compile backend")
    if opts.buckets:
        raise ValueError("tvm.contrib.torch.partition: shapes come from example_inputs; "
                         "drop 'input_infos' (compile(..., {'partition': True}) takes it)")
    return partition_with_options(module, example_inputs, opts)


def _verify(script: torch.jit.ScriptModule, result: torch.jit.ScriptModule,
            arguments: Sequence[Any]) -> None:
    """The partitioned model against the model it came from, on the example inputs."""
    with torch.no_grad():
        expected = verify.flatten_outputs(script(*arguments))
        actual = verify.flatten_outputs(result(*arguments))
    verify.compare_outputs(actual, expected, arguments)


def partition_with_options(module: Any, example_inputs: Sequence[Any],
                           opts: CompileOptions,
                           more_inputs: Sequence[Sequence[Any]] = ()) -> torch.jit.ScriptModule:
    """:func:`partition` with options already parsed (``opts.buckets`` is not read).

    ``compile(..., {"partition": True})`` calls it with example inputs made from
    ``input_infos``. ``more_inputs``: further argument sets recorded after
    ``example_inputs`` (the torch.compile backend passes one with its dynamic dims grown, so
    they become symbolic dims).
    """
    if opts.default_dtype != "float32" or opts.dim_ranges or opts.bucket_padding:
        raise ValueError("tvm.contrib.torch.partition: default_dtype, dim_ranges and "
                         "bucket_padding do not apply; the model runs in its own dtype at the "
                         "example shapes (convert it with .half() for float16)")
    if not isinstance(example_inputs, (list, tuple)):
        raise TypeError("tvm.contrib.torch.partition: example_inputs must be a list or tuple "
                        f"of forward's arguments, got {type(example_inputs).__name__}")
    started = time.perf_counter()
    opts = dataclasses.replace(opts, device=opts.device or _device_of(example_inputs))
    device = opts.device
    with frontend.quiet_torchscript_warnings():
        script = _as_script(module, example_inputs)
        frozen = _freeze(script)
    graph = frozen.graph
    types = record_tensor_types(graph, frozen, _complete_arguments(frozen, example_inputs))
    for arguments in more_inputs:
        for value, seen in record_tensor_types(
                graph, frozen, _complete_arguments(frozen, arguments)).items():
            types.setdefault(value, []).extend(seen)
    classes = classify(graph, types, opts.torch_executed_ops, opts.dynamic_shapes)
    before = count_operators(graph)
    runs = find_runs(graph, classes)
    if opts.require_full_compilation:
        _check_full_compilation(graph, runs, classes, opts.min_block_size)
    worker = _Partitioner(frozen, opts, classes)
    for run in runs:
        worker.offload(run)
    torch._C._jit_pass_dce(graph)  # pylint: disable=protected-access
    graph.lint()
    kept = count_operators(graph, worker.calls)
    reasons = kept_reasons(classes, graph)
    if opts.require_full_compilation and kept:
        raise full_compilation_error(kept, reasons)
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
    if opts.verify and worker.segments:
        # On the module before the round trip: its engines are not the returned ones, whose
        # call counts stay the user's.
        _verify(script, frozen, _complete_arguments(frozen, example_inputs))
    logger.info("partitioned in %.1fs: %s", time.perf_counter() - started,
                report.summary().splitlines()[0])
    return result


__all__ = ["partition", "partition_with_options"]
