"""``compile()`` and ``PyTorchTVMModule``: the pipeline from a PyTorch model to a scriptable module.

frontend (model -> ExportedProgram -> Relax) -> passes (bind, fold, fp16, vendor kernels,
lift params) -> [tuning] -> build -> export (export_dir) -> runtime class -> ``nn.Module``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import tvm

from . import build as build_mod
from . import export as export_mod
from . import frontend, passes
from .module import GraphModule, VMModule
from .options import (
    PARTITION_KEYS,
    CompileOptions,
    InputInfo,
    example_tensor,
    parse_options,
    shapes_of,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Bucket:
    """One input-shape set: its imported Relax module and, once built, its files."""

    infos: List[InputInfo]
    mod: tvm.IRModule
    params: List[tvm.runtime.Tensor]
    files: Optional[export_mod.ExportedFiles] = None
    #: ``passes.prepare_for_build``'s result, made once for tuning and building.
    prepared: Optional[tuple] = None


def _model_device(module: Any) -> str:
    if isinstance(module, torch.nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return "cpu" if tensor.device.type == "cpu" else str(tensor.device)
    return "cpu"


def _output_specs(mod: tvm.IRModule) -> List[Dict[str, Any]]:
    from tvm import relax  # pylint: disable=import-outside-toplevel

    out = []

    def walk(ty):
        if isinstance(ty, relax.TupleType):
            for field in ty.fields:
                walk(field)
        elif isinstance(ty, relax.TensorType):
            shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d)
                     for d in ty.shape.values] if ty.shape is not None else None
            out.append({"shape": shape, "dtype": str(ty.dtype)})
        else:
            out.append({"shape": None, "dtype": None})

    walk(mod["main"].ret_ty)
    return out


def _count_outputs(mod: tvm.IRModule) -> int:
    """Number of tensors ``main`` returns, tuples flattened."""
    return len(_output_specs(mod))


class PyTorchTVMModule:
    """The compile pipeline one step at a time (the seed's reference implementation).

    Parameters
    ----------
    target : dict, str or tvm.target.Target, optional
        Default: this CPU, or the current GPU when ``device`` is CUDA.
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Examples
    --------
    >>> ptm = PyTorchTVMModule()
    >>> ptm.from_pytorch(traced, [("x", (1, 3, 224, 224))])
    >>> ptm.build_tvm("pytorch_compiled")
    >>> module = ptm.build_pytorch_module(num_inputs=1, num_outputs=1)
    """

    def __init__(self, target=None, device: Optional[str] = None):
        self.device = device or "cpu"
        self.target = build_mod.resolve_target(target, self.device)
        self.default_dtype = "float32"
        self.dim_ranges: Dict[str, tuple] = {}
        self.vendor_kernels = True
        self.buckets: List[_Bucket] = []
        self.export_dir: Optional[str] = None
        self.tuning_log_file: Optional[str] = None
        self.num_outputs: Optional[int] = None

    # ---- step 1: frontend ----
    def from_pytorch(self, module: Any, input_infos: Sequence, default_dtype: str = "float32",
                     dim_ranges: Optional[Dict[str, tuple]] = None) -> "PyTorchTVMModule":
        """Convert the model to Relax once per input-shape set.

        Parameters
        ----------
        module : torch.jit.ScriptModule, torch.nn.Module or torch.export.ExportedProgram
            The model (computing in float32; ``default_dtype`` converts it).
        input_infos : list
            As the ``input_infos`` option.
        default_dtype : str
            ``"float32"`` or ``"float16"``.
        dim_ranges : dict, optional
            ``{dim_name: (min, max)}`` for symbolic dims.
        """
        opts = parse_options({"input_infos": input_infos, "default_dtype": default_dtype,
                              "dim_ranges": dim_ranges or {}})
        self.default_dtype = opts.default_dtype
        self.dim_ranges = dict(opts.dim_ranges)
        if isinstance(module, torch.nn.Module) and _model_device(module) != "cpu":
            # Conversion reads the weights on the host; the runtime device is separate.
            module = copy.deepcopy(module).cpu()
        self.buckets = [self._convert_bucket(module, bucket) for bucket in opts.buckets]
        counts = {_count_outputs(b.mod) for b in self.buckets}
        if len(counts) != 1:
            raise frontend.ConversionError(
                f"tvm.contrib.torch: the buckets produce different output counts {counts}")
        self.num_outputs = counts.pop()
        return self

    def _convert_bucket(self, module: Any, infos: List[InputInfo]) -> _Bucket:
        dynamic = {}
        dim_values = {}
        for info in infos:
            for dim in info.shape:
                if isinstance(dim, str) and dim not in dynamic:
                    low, high = self.dim_ranges.get(dim, (1, 2 ** 20))
                    # An example size off the range's ends keeps torch.export from
                    # specialising it (0/1 specialisation).
                    dim_values[dim] = min(max(low, 2), high) if high > 2 else high
                    dynamic[dim] = torch.export.Dim(dim, min=max(low, 1), max=high)
        examples = [example_tensor(i, dim_values, "cpu") for i in infos]  # host, as the weights
        dims = None
        if dynamic:
            dims = [{axis: dynamic[d] for axis, d in enumerate(i.shape) if isinstance(d, str)}
                    for i in infos]
        started = time.perf_counter()
        ep = frontend.to_exported_program(module, examples, dims)
        ep = frontend.decompose(ep)
        mod, params = frontend.to_relax(ep)
        num_input = frontend.relax_input_count(mod)
        if num_input != len(infos):
            raise ValueError(
                f"tvm.contrib.torch: the model takes {num_input} inputs but input_infos lists "
                f"{len(infos)} ({[i.name for i in infos]})")
        logger.info("converted %s in %.1fs", [i.shape for i in infos],
                    time.perf_counter() - started)
        return _Bucket(infos=infos, mod=mod, params=params)

    # ---- step 2: tuning ----
    def tune_tvm(self, log_file: str = "tuning.log", n_trial: int = 1000) -> None:
        """Tune every bucket's kernels with MetaSchedule, recording into ``log_file``.

        Records already in ``log_file`` are re-used: a second call measures nothing new.
        """
        from . import tuning  # pylint: disable=import-outside-toplevel

        self.tuning_log_file = os.path.abspath(log_file)
        for bucket in self.buckets:
            prepared = self._prepare(bucket)[0]
            tuning.tune(prepared, self.target, n_trial, self.tuning_log_file)

    # ---- step 3: build and export ----
    def _prepare(self, bucket: _Bucket):
        if bucket.prepared is not None:
            return bucket.prepared
        extra = []
        if self.vendor_kernels:
            from . import vendor_kernels  # pylint: disable=import-outside-toplevel

            extra.append(vendor_kernels.offload_pass(gpu=build_mod.is_cuda(self.target)))
        bucket.prepared = passes.prepare_for_build(bucket.mod, bucket.params,
                                                   shapes_of(bucket.infos), self.default_dtype,
                                                   extra)
        return bucket.prepared

    def build_tvm(self, export_dir: str, debug_runtime: bool = False) -> List[export_mod.ExportedFiles]:
        """Build every bucket and export its lib / graph / params into ``export_dir``."""
        del debug_runtime  # accepted for the seed's signature; the Relax VM has no debug mode
        self.export_dir = os.path.abspath(export_dir)
        database = None
        if self.tuning_log_file and os.path.exists(self.tuning_log_file):
            from . import tuning  # pylint: disable=import-outside-toplevel

            database = tuning.open_database(self.tuning_log_file)
        files = []
        for index, bucket in enumerate(self.buckets):
            started = time.perf_counter()
            mod, params, names, transform = self._prepare(bucket)
            executable = build_mod.build(mod, self.target, database)
            manifest = export_mod.make_manifest(
                inputs=[{"name": i.name, "shape": list(i.shape), "dtype": i.dtype}
                        for i in bucket.infos],
                num_outputs=_count_outputs(mod),
                outputs=_output_specs(mod),
                param_names=names,
                target=self.target,
                dim_ranges={k: v for k, v in self.dim_ranges.items()
                            if any(k in i.shape for i in bucket.infos)},
                transform_params=transform,
                extra={"default_dtype": self.default_dtype},
            )
            bucket.files = export_mod.export_program(executable, mod, manifest, params,
                                                     self.export_dir, f"bucket{index}")
            logger.info("built bucket %d in %.1fs", index, time.perf_counter() - started)
            files.append(bucket.files)
        return files

    def load_tvm(self, export_dir: str) -> "PyTorchTVMModule":
        """Use programs already exported into ``export_dir``."""
        exported = export_mod.list_exported(export_dir)
        if not exported:
            raise FileNotFoundError(f"tvm.contrib.torch: no exported program in {export_dir}")
        self.export_dir = os.path.abspath(export_dir)
        self.buckets = []
        for files in exported:
            manifest = export_mod.read_manifest(files.graph_path)
            infos = [InputInfo(i["name"], tuple(i["shape"]), i["dtype"])
                     for i in manifest["inputs"]]
            self.dim_ranges.update({k: tuple(v) for k, v in manifest["dim_ranges"].items()})
            self.num_outputs = int(manifest["num_outputs"])
            self.buckets.append(_Bucket(infos=infos, mod=None, params=[], files=files))
        return self

    # ---- step 4: the nn.Module ----
    def build_pytorch_module(self, num_inputs: Optional[int] = None,
                             num_outputs: Optional[int] = None,
                             input_infos=None) -> torch.nn.Module:
        """A :class:`GraphModule` (static shapes) or :class:`VMModule` (symbolic dims).

        Parameters
        ----------
        num_inputs, num_outputs : int, optional
            Checked against the compiled programs.
        input_infos : ignored
            Accepted for the seed's signature; the shapes come from the exported graphs.
        """
        del input_infos
        if not self.buckets or any(b.files is None for b in self.buckets):
            raise RuntimeError("tvm.contrib.torch: call build_tvm() or load_tvm() first")
        real_inputs = len(self.buckets[0].infos)
        if num_inputs is not None and num_inputs != real_inputs:
            raise ValueError(f"num_inputs={num_inputs} but the model takes {real_inputs} inputs")
        if num_outputs is not None and num_outputs != self.num_outputs:
            raise ValueError(f"num_outputs={num_outputs} but the model returns "
                             f"{self.num_outputs} tensors")
        dynamic = any(not i.is_static for b in self.buckets for i in b.infos)
        if dynamic and len(self.buckets) > 1:
            raise ValueError("tvm.contrib.torch: symbolic dims take one input_infos set")
        cls = VMModule if dynamic else GraphModule
        module = cls(real_inputs, self.num_outputs, self.device)
        for bucket in self.buckets:
            shapes = [[d if isinstance(d, int) else -1 for d in i.shape] for i in bucket.infos]
            module.init(shapes, *bucket.files.as_tuple())
        return module


def apply_tuning_options(ptm: PyTorchTVMModule, opts: CompileOptions) -> None:
    """Tune when ``tuning_n_trials`` > 0; else apply an explicitly named, existing log."""
    if opts.tuning_n_trials > 0:
        ptm.tune_tvm(opts.tuning_log_file, opts.tuning_n_trials)
    elif opts.tuning_log_explicit and os.path.exists(opts.tuning_log_file):
        ptm.tuning_log_file = os.path.abspath(opts.tuning_log_file)


def compile(module: Any, option: Optional[Dict[str, Any]] = None) -> torch.nn.Module:  # pylint: disable=redefined-builtin
    """Compile a PyTorch model with TVM into a scriptable module.

    Parameters
    ----------
    module : torch.jit.ScriptModule, torch.nn.Module or torch.export.ExportedProgram
        A ``torch.jit.trace``/``torch.jit.script`` module, a plain module or an exported
        program, computing in float32.
    option : dict
        See :data:`tvm.contrib.torch.options.OPTION_DOCS`; ``input_infos`` is required.

    Returns
    -------
    torch.nn.Module
        ``forward(inputs: List[Tensor]) -> List[Tensor]``; works with ``torch.jit.script``
        and saves into one self-contained file. With ``"partition": True``: a
        ``torch.jit.ScriptModule`` with the model's own ``forward`` signature (see
        :func:`tvm.contrib.torch.partition`).
    """
    opts: CompileOptions = parse_options(option)
    if opts.partition:
        return _compile_partitioned(module, opts, option)
    misplaced = sorted(set(option or {}) & set(PARTITION_KEYS))
    if misplaced:
        raise ValueError(f"tvm.contrib.torch.compile: {misplaced} apply only with "
                         "'partition': True")
    device = opts.device or _model_device(module)
    started = time.perf_counter()
    ptm = PyTorchTVMModule(target=opts.target, device=device)
    ptm.vendor_kernels = opts.vendor_kernels
    ptm.from_pytorch(module, [[(i.name, i.shape, i.dtype) for i in b] for b in opts.buckets],
                     default_dtype=opts.default_dtype, dim_ranges=opts.dim_ranges)
    if opts.num_outputs is not None and opts.num_outputs != ptm.num_outputs:
        raise ValueError(f"tvm.contrib.torch.compile: num_outputs={opts.num_outputs} but the "
                         f"model returns {ptm.num_outputs} tensor(s)")
    apply_tuning_options(ptm, opts)
    ptm.build_tvm(opts.export_dir)
    result = ptm.build_pytorch_module(opts.num_inputs, ptm.num_outputs)
    if opts.bucket_padding:
        result.engine.set_bucket_padding(True)
    logger.info("compiled in %.1fs", time.perf_counter() - started)
    return result


def _compile_partitioned(module: Any, opts: CompileOptions,
                         option: Dict[str, Any]) -> torch.jit.ScriptModule:
    """``compile(..., {"partition": True})``: example inputs made from ``input_infos``."""
    from .partitioner import partition  # pylint: disable=import-outside-toplevel

    if len(opts.buckets) != 1 or opts.dynamic:
        raise ValueError("tvm.contrib.torch.compile: partition takes one input_infos set with "
                         "static shapes (the shapes inside the model are recorded from it)")
    device = opts.device or _model_device(module)
    examples = [example_tensor(info, {}, device) for info in opts.buckets[0]]
    rest = {k: v for k, v in option.items() if k not in ("input_infos", "partition")}
    return partition(module, examples, rest)
