"""The compile pipeline: ``PyTorchTVMModule`` and :func:`compile_program`.

frontend (model -> ExportedProgram -> Relax) -> passes (bind, fold, fp16, vendor kernels,
lift params) -> [tuning] -> build -> export (export_dir) -> runtime class -> ``nn.Module``.

:func:`compile_program` runs every step for one model and its input-shape buckets; both
:func:`tvm.contrib.torch.compile` and the partitioner (once per subgraph) call it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import tvm
from tvm import relax

from . import build as build_mod
from . import export as export_mod
from . import frontend, passes, profiler, tuning, vendor_choice, vendor_kernels, verify
from .built_program import BuiltProgram
from .module import GraphModule, VMModule
from .options import (OPTIONS_BY_NAME, CompileOptions, InputInfo, device_name,
                      example_tensor, make_input_info, parse_options, shapes_of)

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
    #: Sizes the symbolic dims took for conversion (and take for verification).
    dim_values: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: Input position -> rows of the embedding table it indexes (ids for verification).
    index_bounds: Dict[int, int] = dataclasses.field(default_factory=dict)


def model_device(module: Any) -> str:
    """Where a module's parameters are (``"cpu"`` for anything without parameters)."""
    if isinstance(module, torch.nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return "cpu" if tensor.device.type == "cpu" else str(tensor.device)
    return "cpu"


def _output_specs(mod: tvm.IRModule) -> List[Dict[str, Any]]:
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
    device : str, torch.device or tvm.Device, optional
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``tvm.cpu()`` or ``tvm.cuda(N)``.
    vendor_kernels : bool
        Whether heavy operators run on libtorch's vendor kernels (see
        :mod:`tvm.contrib.torch.vendor_kernels`); also settable as the attribute.

    Attributes
    ----------
    script_module, input_infos, default_dtype
        What :meth:`from_pytorch` was given (TVM 0.19's names).
    mod, params
        The first input-shape set's Relax module and weights (see :attr:`buckets` for all).
    log_file
        The tuning log :meth:`tune_tvm` recorded into (``tuning_log_file``).
    tuning_summaries
        What the last :meth:`tune_tvm` did: one
        :class:`~tvm.contrib.torch.tuning_progress.TuningSummary` per bucket.
    tvm_module
        The runnable module (a :class:`~tvm.contrib.torch.built_program.BuiltProgram`) of the
        last :meth:`build_tvm` / :meth:`load_tvm`.
    tvm_lib, tvm_params
        The first input-shape set's built ``relax.Executable`` and its weights, after
        :meth:`build_tvm`.

    Examples
    --------
    >>> ptm = PyTorchTVMModule()
    >>> ptm.from_pytorch(traced, [("x", (1, 3, 224, 224))])
    >>> ptm.build_tvm("pytorch_compiled")
    >>> module = ptm.build_pytorch_module(num_inputs=1, num_outputs=1)
    """

    def __init__(self, target=None, device=None, vendor_kernels: bool = True):
        # Checked before anything is built (a tvm.Device is what TVM 0.19's examples passed).
        self.device = device_name(device, "PyTorchTVMModule device") if device is not None \
            else "cpu"
        self.target = build_mod.resolve_target(target, self.device)
        self.script_module: Any = None
        self.input_infos: Optional[Sequence] = None
        self.tvm_module: Optional[BuiltProgram] = None
        self.tvm_lib: Optional[relax.Executable] = None
        self.default_dtype = "float32"
        self.dim_ranges: Dict[str, tuple] = {}
        self.vendor_kernels = vendor_kernels
        self.buckets: List[_Bucket] = []
        self.export_dir: Optional[str] = None
        self.tuning_log_file: Optional[str] = None
        self.tuning_summaries: List[tuning.TuningSummary] = []
        self.num_outputs: Optional[int] = None

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
        self.script_module = module
        self.input_infos = input_infos
        return self._convert(module, opts.buckets, opts.default_dtype, opts.dim_ranges)

    @property
    def dev(self) -> tvm.runtime.Device:
        """The runtime device as a ``tvm.Device`` (TVM 0.19's attribute)."""
        if self.device == "cpu":
            return tvm.cpu()
        return tvm.cuda(int(self.device.split(":")[1]) if ":" in self.device else 0)

    @property
    def mod(self) -> Optional[tvm.IRModule]:
        """The first input-shape set's imported Relax module (``None`` before conversion)."""
        return self.buckets[0].mod if self.buckets else None

    @property
    def params(self) -> Optional[List[tvm.runtime.Tensor]]:
        """The first input-shape set's weights, in ``main``'s parameter order."""
        return self.buckets[0].params if self.buckets else None

    @property
    def tvm_params(self) -> Optional[List[tvm.runtime.Tensor]]:
        """The weights the first built program was exported with (after :meth:`build_tvm`)."""
        if not self.buckets or self.buckets[0].prepared is None:
            return None
        return self.buckets[0].prepared[1]

    @property
    def log_file(self) -> Optional[str]:
        """TVM 0.19's name of :attr:`tuning_log_file`."""
        return self.tuning_log_file

    @log_file.setter
    def log_file(self, value: Optional[str]) -> None:
        self.tuning_log_file = None if value is None else os.path.abspath(value)

    def _convert(self, module: Any, buckets: Sequence[List[InputInfo]], default_dtype: str,
                dim_ranges: Dict[str, tuple]) -> "PyTorchTVMModule":
        """:meth:`from_pytorch` for input infos already parsed (:class:`InputInfo` buckets)."""
        self.default_dtype = default_dtype
        self.dim_ranges = dict(dim_ranges)
        # Traced on the model's own device: a trace records the device of the tensors it
        # created (arange, masks), which a host copy of the weights would not match. The
        # frontend moves the program to the host, where conversion reads the weights.
        device = model_device(module)
        self.buckets = [self._convert_bucket(module, list(bucket), device) for bucket in buckets]
        counts = {_count_outputs(b.mod) for b in self.buckets}
        if len(counts) != 1:
            raise frontend.ConversionError(
                f"tvm.contrib.torch: the buckets produce different output counts {counts}")
        self.num_outputs = counts.pop()
        return self

    def _convert_bucket(self, module: Any, infos: List[InputInfo], device: str) -> _Bucket:
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
        examples = [example_tensor(i, dim_values, device) for i in infos]
        dims = None
        if dynamic:
            dims = [{axis: dynamic[d] for axis, d in enumerate(i.shape) if isinstance(d, str)}
                    for i in infos]
        started = time.perf_counter()
        ep = frontend.to_exported_program(module, examples, dims)
        bounds = verify.index_bounds(ep)
        ep = frontend.decompose(ep)
        mod, params = frontend.to_relax(ep)
        num_input = frontend.relax_input_count(mod)
        if num_input != len(infos):
            raise ValueError(
                f"tvm.contrib.torch: the model takes {num_input} inputs but input_infos lists "
                f"{len(infos)} ({[i.name for i in infos]})")
        logger.info("converted %s in %.1fs", [i.shape for i in infos],
                    time.perf_counter() - started)
        return _Bucket(infos=infos, mod=mod, params=params, dim_values=dim_values,
                       index_bounds=bounds)

    def tune_tvm(self, log_file: str = "tuning.log", n_trial: int = 1000,
                 settings: Optional[tuning.TuneSettings] = None, rpc: Any = None,
                 builders: Optional[int] = None, kernels: str = "all",
                 compare_vendor: bool = False) -> List[tuning.TuningSummary]:
        """Tune every bucket's kernels with MetaSchedule, recording into ``log_file``.

        Records already in ``log_file`` are re-used: a second call measures nothing new.
        ``settings`` holds MetaSchedule's other knobs (builder, runner, search strategy, ...);
        ``rpc``, ``builders`` and ``kernels`` are the ``tuning_rpc``, ``tuning_builders`` and
        ``tuning_kernels`` options (measure on a tracker's RPC servers; local build
        processes; ``"heavy"``: tune only the kernels a profile of the untuned program shows
        to take 90% of its TVM-kernel time). ``compare_vendor`` (``tuning_compare_vendor``)
        first races tuned TVM kernels against oneDNN for the CPU convolutions
        (:mod:`.vendor_choice`), with the same trial budget.

        Returns
        -------
        list of TuningSummary
            One per bucket (trials, time, estimated speed-up); also :attr:`tuning_summaries`.

        Raises
        ------
        TuningError
            With ``rpc``: the tracker is unreachable, has no free server for the key, or was
            lost during tuning (the records measured before stay in ``log_file``).
        """
        rpc = OPTIONS_BY_NAME["tuning_rpc"].parse("tuning_rpc", rpc)
        builders = OPTIONS_BY_NAME["tuning_builders"].parse("tuning_builders", builders)
        kernels = OPTIONS_BY_NAME["tuning_kernels"].parse("tuning_kernels", kernels)
        compare_vendor = OPTIONS_BY_NAME["tuning_compare_vendor"].parse(
            "tuning_compare_vendor", compare_vendor)
        settings = settings or tuning.TuneSettings()
        if rpc is not None or builders is not None:
            settings = dataclasses.replace(settings, rpc=rpc or settings.rpc,
                                           builders=builders or settings.builders)
        self.tuning_log_file = os.path.abspath(log_file)
        self.tuning_summaries = []
        for bucket in self.buckets:
            bucket.prepared = None  # prepared again with the log's convolution choices
        if compare_vendor and self.vendor_kernels:
            sites: List[vendor_kernels.ConvSite] = []
            for bucket in self.buckets:
                self._prepare(bucket, sites)
                bucket.prepared = None
            vendor_choice.race(sites, self.target, self.tuning_log_file, n_trial, settings)
        profiles = self._tvm_kernel_times() if kernels == "heavy" else [None] * len(self.buckets)
        for bucket, kernel_ms in zip(self.buckets, profiles):
            prepared = self._prepare(bucket)[0]
            self.tuning_summaries.append(
                tuning.tune(prepared, self.target, n_trial, self.tuning_log_file, settings,
                            kernel_ms=kernel_ms))
        return self.tuning_summaries

    def _tvm_kernel_times(self) -> List[Dict[str, float]]:
        """Per bucket, the milliseconds per call of each TVM kernel of the current program
        (built with the records the tuning log holds), from a profile on random inputs."""
        saved = (self.export_dir, self.tvm_module, self.tvm_lib,
                 [bucket.files for bucket in self.buckets])
        times = []
        try:
            with tempfile.TemporaryDirectory(prefix="tvm_torch_profile_") as scratch:
                self.build_tvm(scratch)
                module = self.build_pytorch_module()
                for bucket in self.buckets:
                    inputs = [t.to(self.device) for t in verify.make_inputs(
                        bucket.infos, bucket.dim_values, bucket.index_bounds)]
                    report = profiler.profile(module, inputs, repeat=5, warmup=2)
                    times.append({row.name: row.ms for row in report.rows if row.kind == "TVM"})
                del module
        finally:
            self.export_dir, self.tvm_module, self.tvm_lib, files = saved
            for bucket, old in zip(self.buckets, files):
                bucket.files = old
        return times

    def _prepare(self, bucket: _Bucket,
                 sites: Optional[List[vendor_kernels.ConvSite]] = None):
        """The bucket's module through :func:`passes.prepare_for_build` (cached), with the
        vendor offload; ``sites`` collects its oneDNN convolutions."""
        if bucket.prepared is not None:
            return bucket.prepared
        extra = []
        if self.vendor_kernels:
            gpu = build_mod.is_cuda(self.target)
            bfloat16 = self.default_dtype == "bfloat16" and not gpu
            if bfloat16 and not build_mod.cpu_has_bfloat16():
                logger.warning("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX): "
                               "the bfloat16 program computes in float32, at float32 speed")
                bfloat16 = False
            elif bfloat16:
                slow = build_mod.bfloat16_slowdown_warning(build_mod.bfloat16_matmul_speedup())
                if slow:
                    logger.warning(slow)
            wins = {} if gpu else vendor_choice.tvm_wins(self.tuning_log_file, self.target)
            extra.append(vendor_kernels.offload_pass(gpu=gpu, bfloat16=bfloat16,
                                                     tvm_wins=wins, sites=sites))
            if not gpu:
                extra.append(vendor_kernels.nchw_input_pass())
                extra.append(vendor_kernels.destination_passing_pass())
        bucket.prepared = passes.prepare_for_build(bucket.mod, bucket.params,
                                                   shapes_of(bucket.infos), self.default_dtype,
                                                   extra)
        return bucket.prepared

    def build_tvm(self, export_dir: str, debug_runtime: bool = False) -> BuiltProgram:
        """Build every bucket and export its lib / graph / params into ``export_dir``.

        The directory's lock is held throughout (concurrent builds into it wait); the files
        of the previous build there are replaced, and ``programs.json`` lists the new ones.

        Returns
        -------
        BuiltProgram
            The exported files (one :class:`ExportedFiles` per bucket, as a sequence) and the
            runnable module (``.module``, ``set_input`` / ``run`` / ``get_output``), loaded
            on first use; also kept as :attr:`tvm_module`.
        """
        del debug_runtime  # accepted for the seed's signature; the Relax VM has no debug mode
        self.export_dir = os.path.abspath(export_dir)
        with export_mod.locked(self.export_dir):
            export_mod.remove_indexed(self.export_dir)
            files = self._build_buckets()
            export_mod.write_index(self.export_dir, files)
        self.tvm_module = self._built_program(files)
        return self.tvm_module

    def _built_program(self, files: List[export_mod.ExportedFiles]) -> BuiltProgram:
        return BuiltProgram(files, [i.name for i in self.buckets[0].infos],
                            self.build_pytorch_module)

    def _build_buckets(self) -> List[export_mod.ExportedFiles]:
        """Build and export each bucket as ``bucketN.*`` (the caller holds the lock)."""
        database = None
        if self.tuning_log_file and os.path.exists(self.tuning_log_file):
            database = tuning.open_database(self.tuning_log_file)
        files = []
        for index, bucket in enumerate(self.buckets):
            started = time.perf_counter()
            mod, params, names, transform = self._prepare(bucket)
            executable = build_mod.build(mod, self.target, database)
            if index == 0:
                self.tvm_lib = executable
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
        """Use the programs the last :meth:`build_tvm` exported into ``export_dir`` (their
        files checked against the SHA-256 digests it recorded).

        Returns ``self`` (chainable); the runnable module is :attr:`tvm_module`.
        """
        with export_mod.locked(export_dir):
            exported = export_mod.read_index(export_dir)
        self.export_dir = os.path.abspath(export_dir)
        self.buckets = []
        for files in exported:
            manifest = export_mod.read_manifest(files.graph_path)
            infos = [InputInfo(i["name"], tuple(i["shape"]), i["dtype"])
                     for i in manifest["inputs"]]
            self.dim_ranges.update({k: tuple(v) for k, v in manifest["dim_ranges"].items()})
            self.num_outputs = int(manifest["num_outputs"])
            self.buckets.append(_Bucket(infos=infos, mod=None, params=[], files=files))
        self.tvm_module = self._built_program(exported)
        return self

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


def _apply_tuning(ptm: PyTorchTVMModule, options: CompileOptions,
                  settings: Optional[tuning.TuneSettings]) -> None:
    """Tune when ``tuning_n_trials`` > 0; else apply an explicitly named, existing log."""
    if options.tuning_n_trials > 0:
        ptm.tune_tvm(options.tuning_log_file, options.tuning_n_trials, settings,
                     rpc=options.tuning_rpc, builders=options.tuning_builders,
                     kernels=options.tuning_kernels,
                     compare_vendor=options.tuning_compare_vendor)
    elif options.tuning_log_explicit and os.path.exists(options.tuning_log_file):
        ptm.tuning_log_file = os.path.abspath(options.tuning_log_file)
        # A bad race record next to it fails here with its own error, not as a build error.
        vendor_choice.load(ptm.tuning_log_file, ptm.target)


def _low_precision_model(module: Any, options: CompileOptions):
    """A float32 copy of a float16/bfloat16 model and the dtype it computes in, or ``None``.

    The pipeline converts float32 models and lowers them to ``default_dtype`` itself
    (``ToMixedPrecision``): a ``.half()`` / ``.bfloat16()`` model is converted from a float32
    copy and compiled for its own dtype (``default_dtype``, when given, must name it), with
    inputs and outputs in that dtype.
    """
    dtype = verify.model_float_dtype(module)
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if isinstance(module, torch.export.ExportedProgram):
        raise frontend.ConversionError(
            f"tvm.contrib.torch: this ExportedProgram computes in {dtype}; export the model in "
            "float32 and pass 'default_dtype' to compile it for a lower precision")
    own = str(dtype).replace("torch.", "")
    if "default_dtype" in options.given and options.default_dtype != own:
        raise frontend.ConversionError(
            f"tvm.contrib.torch: this model computes in {own} but default_dtype is "
            f"{options.default_dtype!r}; pass the float32 model (model.float()) to compile it "
            f"for {options.default_dtype}")
    return copy.deepcopy(module).float(), own


def _verify(source: Any, ptm: PyTorchTVMModule, result: torch.nn.Module,
            options: CompileOptions) -> None:
    """Run the compiled module and its source on the same inputs (see :mod:`.verify`)."""
    if options.example_inputs is not None:
        dtypes = [getattr(torch, i.dtype) for i in ptm.buckets[0].infos]
        if len(options.example_inputs) != len(dtypes):
            raise ValueError(f"tvm.contrib.torch.compile: example_inputs has "
                             f"{len(options.example_inputs)} tensor(s), the model takes "
                             f"{len(dtypes)}")
        input_sets = [[t.to(dtype) if t.is_floating_point() else t
                       for t, dtype in zip(options.example_inputs, dtypes)]]
    else:
        input_sets = [verify.make_inputs(b.infos, b.dim_values, b.index_bounds)
                      for b in ptm.buckets]
    lowered = getattr(torch, ptm.default_dtype)
    verify.check(source, result, input_sets, model_device(source),
                 lowered_to=None if lowered == torch.float32 else lowered)


def compile_program(module: Any, buckets: Sequence[List[InputInfo]], options: CompileOptions,
                    export_dir: str,
                    tune_settings: Optional[tuning.TuneSettings] = None) -> torch.nn.Module:
    """Every pipeline step for one model: convert, tune, build, export, wrap, verify.

    Parameters
    ----------
    module : torch.jit.ScriptModule, torch.jit.ScriptFunction, torch.nn.Module or
            torch.export.ExportedProgram
        The model, computing in float32 (float16/bfloat16 models compile for their own
        dtype unless ``default_dtype`` is given).
    buckets : sequence of list of InputInfo
        One program per input-shape set.
    options : CompileOptions
        Used here: ``target``, ``device`` (default: where the model's parameters are),
        ``vendor_kernels``, ``default_dtype``, ``dim_ranges``, ``num_outputs`` (checked when
        set), the tuning options, ``bucket_padding``, ``verify`` and ``example_inputs``.
    export_dir : str
        Where the programs' files go.
    tune_settings : TuneSettings, optional
        MetaSchedule's knobs beyond ``tuning_n_trials`` (``optimize_torch`` passes them).

    Returns
    -------
    torch.nn.Module
        A :class:`GraphModule` or :class:`VMModule`.

    Raises
    ------
    ConversionError
        When the model cannot be converted or built, or (``verify``) when the compiled
        program's outputs differ from the model's.
    """
    source = module
    default_dtype = options.default_dtype
    low = _low_precision_model(module, options)
    if low is not None:
        module, default_dtype = low
        # The option parser's own rule: compute-dtype inputs take the default dtype.
        buckets = [[make_input_info(i.name, i.shape, i.dtype, default_dtype, index)
                    for index, i in enumerate(b)] for b in buckets]
    ptm = PyTorchTVMModule(target=options.target, device=options.device or model_device(source),
                           vendor_kernels=options.vendor_kernels)
    ptm._convert(module, buckets, default_dtype,  # pylint: disable=protected-access
                 options.dim_ranges)
    if options.num_outputs is not None and options.num_outputs != ptm.num_outputs:
        raise ValueError(f"tvm.contrib.torch.compile: num_outputs={options.num_outputs} but the "
                         f"model returns {ptm.num_outputs} tensor(s)")
    _apply_tuning(ptm, options, tune_settings)
    # Built and loaded under the directory's lock: a concurrent compile into the same
    # export_dir cannot swap its files in between.
    with export_mod.locked(export_dir):
        try:
            ptm.build_tvm(export_dir)
        except frontend.ConversionError:
            raise
        except Exception as err:  # pylint: disable=broad-except
            text = str(err).strip()
            raise frontend.ConversionError(
                f"tvm.contrib.torch: TVM could not build the converted program: "
                f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}") from err
        result = ptm.build_pytorch_module(len(buckets[0]), ptm.num_outputs)
    if options.bucket_padding:
        result.engine.set_bucket_padding(True)
    if options.verify:
        started = time.perf_counter()
        _verify(source, ptm, result, options)
        logger.info("verified against the model in %.1fs", time.perf_counter() - started)
    return result


__all__ = ["PyTorchTVMModule", "compile_program", "model_device"]
