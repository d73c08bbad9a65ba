"""The ``option`` dict of :func:`tvm.contrib.torch.compile`: one table of keys, parsed once.

:data:`OPTIONS` holds one :class:`OptionSpec` per key (parser, default, meaning, whether it
applies only to partitioning). :func:`parse_options` turns an option dict into the typed
:class:`CompileOptions` that the pipeline and the partitioner take; the same table generates
the docs' options section (:func:`options_markdown`) and the command line's help
(:func:`cli_help`), so the three cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch

from .dtypes import COMPUTE_DTYPES, SUPPORTED_DTYPES

#: A dim is an int (static) or a str (symbolic, named).
Dim = Union[int, str]


@dataclasses.dataclass
class InputInfo:
    """One model input: name, shape (ints or dim names) and dtype."""

    name: str
    shape: Tuple[Dim, ...]
    dtype: str

    @property
    def is_static(self) -> bool:
        """Whether every dim is an int."""
        return all(isinstance(d, int) for d in self.shape)


@dataclasses.dataclass(frozen=True)
class TuningRPC:
    """Where MetaSchedule measures candidates: the RPC servers of a TVM tracker (``tuning_rpc``).

    Attributes
    ----------
    host, port : str, int
        The tracker's address (``python -m tvm.exec.rpc_tracker``).
    key : str
        The key the measuring servers registered under (``rpc_server --key``).
    workers : int or None
        Measurements run at once; ``None``: one per server registered under ``key``.
    timeout_s : float
        The most one measurement may take, waiting for a free server included; also how
        long the tracker may take to answer before tuning fails.
    """

    host: str
    port: int
    key: str
    workers: Optional[int] = None
    timeout_s: float = 60.0

    @property
    def tracker(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclasses.dataclass
class CompileOptions:
    """Validated compile options (see :data:`OPTIONS`)."""

    buckets: List[List[InputInfo]]
    default_dtype: str = "float32"
    export_dir: str = "pytorch_compiled"
    num_outputs: Optional[int] = None
    tuning_n_trials: int = 0
    tuning_log_file: str = "tuning.log"
    tuning_rpc: Optional[TuningRPC] = None
    tuning_builders: Optional[int] = None
    tuning_kernels: str = "all"
    tuning_compare_vendor: bool = False
    target: Any = None
    device: Optional[str] = None
    dim_ranges: Dict[str, Tuple[int, int]] = dataclasses.field(default_factory=dict)
    vendor_kernels: bool = True
    bucket_padding: bool = False
    partition: bool = False
    min_block_size: int = 3
    torch_executed_ops: Tuple[str, ...] = ()
    require_full_compilation: bool = False
    dynamic_shapes: bool = True
    verify: bool = True
    example_inputs: Optional[Tuple[torch.Tensor, ...]] = None
    cache_dir: Optional[str] = None
    #: The keys the option dict named (the rest took their defaults).
    given: FrozenSet[str] = frozenset()

    @property
    def tuning_log_explicit(self) -> bool:
        """Whether ``tuning_log_file`` was given (an existing log is then applied untuned)."""
        return "tuning_log_file" in self.given

    @property
    def num_inputs(self) -> int:
        """Number of model inputs."""
        return len(self.buckets[0])

    @property
    def dynamic(self) -> bool:
        """Whether some input dim is symbolic."""
        return any(not info.is_static for bucket in self.buckets for info in bucket)


def _fail(message: str) -> None:
    raise ValueError(f"tvm.contrib.torch.compile: {message}")


def make_input_info(name: Any, shape: Any, dtype: Any, default_dtype: str,
                    index: int) -> InputInfo:
    """A checked :class:`InputInfo`; floating dtypes become ``default_dtype``.

    ``index`` is the input's position, for error messages.
    """
    if not isinstance(name, str):
        _fail(f"input_infos[{index}] name must be a str, got {type(name).__name__}")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)):
        _fail(f"input_infos[{index}] ('{name}') shape must be a tuple of ints or dim names, "
              f"got {shape!r}")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, str)):
            _fail(f"input_infos[{index}] ('{name}') dims must be ints or names, got {dim!r}")
        if isinstance(dim, int) and dim <= 0:
            _fail(f"input_infos[{index}] ('{name}') dims must be positive, got {dim}")
        dims.append(dim)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in SUPPORTED_DTYPES:
        _fail(f"input_infos[{index}] ('{name}') has unsupported dtype {dtype!r}")
    if dtype in COMPUTE_DTYPES:
        dtype = default_dtype
    return InputInfo(name, tuple(dims), dtype)


def _parse_info(item: Any, index: int, default_dtype: str) -> InputInfo:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        _fail(f"input_infos[{index}] must be (name, shape) or (name, shape, dtype), got {item!r}")
    dtype = item[2] if len(item) == 3 else default_dtype
    return make_input_info(item[0], item[1], dtype, default_dtype, index)


def _is_info(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str)


def _parse_input_infos(value: Any, default_dtype: str) -> List[List[InputInfo]]:
    """One list of :class:`InputInfo` per bucket; a flat list is one bucket."""
    if not value or not isinstance(value, (list, tuple)):
        _fail(f"input_infos is required: a list of (name, shape) per input, got {value!r}")
    sets = [value] if _is_info(value[0]) else list(value)
    buckets = []
    for set_index, info_set in enumerate(sets):
        if not isinstance(info_set, (list, tuple)) or not info_set:
            _fail(f"input_infos bucket {set_index} must be a non-empty list of (name, shape)")
        buckets.append([_parse_info(item, i, default_dtype)
                        for i, item in enumerate(info_set)])
    names = [i.name for i in buckets[0]]
    for set_index, bucket in enumerate(buckets[1:], 1):
        if [i.name for i in bucket] != names:
            _fail(f"input_infos bucket {set_index} has inputs {[i.name for i in bucket]}, "
                  f"bucket 0 has {names}")
    return buckets


def check_dim_ranges(value: Any) -> Dict[str, Tuple[int, int]]:
    """``{dim_name: (min, max)}`` with ``0 < min <= max``; None is no ranges."""
    dim_ranges = {}
    for dim_name, bounds in (value or {}).items():
        if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                or not all(isinstance(b, int) and b > 0 for b in bounds) or bounds[0] > bounds[1]):
            _fail(f"dim_ranges['{dim_name}'] must be (min, max) with 0 < min <= max, "
                  f"got {bounds!r}")
        dim_ranges[dim_name] = (int(bounds[0]), int(bounds[1]))
    return dim_ranges


def _int_at_least(minimum: int, allow_none: bool = False) -> Callable[[str, Any], Any]:
    def parse(key: str, value: Any) -> Optional[int]:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(f"{key} must be an int >= {minimum}, got {value!r}")
        return value
    return parse


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(f"{key} must be a bool, got {value!r}")
    return value


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if value not in choices:
            _fail(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    return parse


def _path(allow_bytes: bool) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        kinds = (str, bytes) if allow_bytes else (str,)
        if not isinstance(value, kinds) and not hasattr(value, "__fspath__"):
            _fail(f"{key} must be a path, got {value!r}")
        return str(value)
    return parse


#: The keys of ``tuning_rpc`` and whether each is required.
_TUNING_RPC_KEYS = {"tracker": True, "key": True, "workers": False, "timeout_s": False}


def parse_tracker(text: Any, key: str = "tuning_rpc['tracker']") -> Tuple[str, int]:
    """``(host, port)`` from ``"host:port"`` (an IPv6 host in brackets: ``"[::1]:9190"``).

    Raises
    ------
    ValueError
        Naming ``key``, what was expected and what came.
    """
    expected = f'{key} must be "host:port" with a port in 1..65535'
    if not isinstance(text, str):
        _fail(f"{expected}, got {type(text).__name__} {text!r}")
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"{expected}, got {text!r}")
    return host, int(port)


def _tuning_rpc(key: str, value: Any) -> Optional[TuningRPC]:
    if value is None or isinstance(value, TuningRPC):
        return value
    shape = '{"tracker": "host:port", "key": str, "workers": int, "timeout_s": seconds}'
    if not isinstance(value, dict):
        _fail(f"{key} must be a dict {shape}, got {type(value).__name__} {value!r}")
    unknown = sorted(set(value) - set(_TUNING_RPC_KEYS))
    missing = [k for k, required in _TUNING_RPC_KEYS.items() if required and k not in value]
    if unknown or missing:
        _fail(f"{key} must be a dict {shape} ('workers' and 'timeout_s' optional); "
              + (f"unknown key(s) {unknown}" if unknown else f"missing {missing}")
              + f" in {value!r}")
    host, port = parse_tracker(value["tracker"], f"{key}['tracker']")
    rpc_key = value["key"]
    if not isinstance(rpc_key, str) or not rpc_key or ":" in rpc_key:
        _fail(f"{key}['key'] must be the non-empty key the RPC servers registered under "
              f"(without ':'), got {rpc_key!r}")
    workers = _int_at_least(1, allow_none=True)(f"{key}['workers']", value.get("workers"))
    timeout_s = value.get("timeout_s", TuningRPC.timeout_s)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or \
            not timeout_s > 0:
        _fail(f"{key}['timeout_s'] must be a number of seconds > 0, got {timeout_s!r}")
    return TuningRPC(host, port, rpc_key, workers, float(timeout_s))


def _default_dtype(key: str, value: Any) -> str:
    if value not in COMPUTE_DTYPES:
        _fail(f"{key} must be one of {list(COMPUTE_DTYPES)}, got {value!r}")
    return value


#: DLPack device type codes of the devices a compiled program runs on (``tvm.Device``).
_DLPACK_CPU, _DLPACK_CUDA = 1, 2


def device_name(value: Any, key: str = "device") -> str:
    """``"cpu"`` or ``"cuda:N"`` for a device given as str, ``torch.device`` or ``tvm.Device``.

    ``tvm.cpu()`` / ``tvm.cuda(N)`` are what TVM 0.19's ``tvm.contrib.torch`` took; a
    ``tvm.Device`` is recognised by its DLPack fields (no TVM import here).

    Raises
    ------
    ValueError
        Naming ``key`` and what came, for anything but a CPU or CUDA device.
    """
    expected = "'cpu', 'cuda', 'cuda:N', a torch.device or tvm.cpu()/tvm.cuda(N)"
    if hasattr(value, "dlpack_device_type") and hasattr(value, "index"):
        kind = int(value.dlpack_device_type())
        if kind == _DLPACK_CPU:
            return "cpu"
        if kind == _DLPACK_CUDA:
            return f"cuda:{int(value.index)}"
        _fail(f"{key} must be {expected}, got {value!r}")
    if not isinstance(value, (str, torch.device)):
        _fail(f"{key} must be {expected}, got {type(value).__name__} {value!r}")
    try:
        device = torch.device(value)
    except RuntimeError:
        _fail(f"{key} must be {expected}, got {value!r}")
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        _fail(f"{key} must be {expected}, got {str(device)!r}")
    return str(device)


def _device(key: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    return device_name(value, key)


def _operator_kinds(key: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)) or \
            not all(isinstance(k, str) and "::" in k for k in value):
        _fail(f"{key} must be a list of operator kinds such as 'aten::relu', got {value!r}")
    return tuple(value)


def _tensors_or_none(key: str, value: Any) -> Optional[Tuple[torch.Tensor, ...]]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor)
                                                       for t in value):
        _fail(f"{key} must be a list or tuple of tensors, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One key of the option dict.

    Attributes
    ----------
    name : str
        The key.
    parse : callable or None
        ``parse(key, value) -> typed value``; raises ``ValueError`` naming the key. Called only
        for keys the dict names. None for ``input_infos``, parsed apart: it depends on
        ``default_dtype`` and is optional for :func:`~tvm.contrib.torch.partition`.
    default : object
        The typed value when the key is left out.
    doc : str
        Its meaning (Markdown: the docs' table and, without backticks, the CLI's help).
    default_doc : str, optional
        How the docs show the default, when not ``default`` itself.
    partition_only : bool
        Whether the key applies only with ``"partition": True``.
    backend_only : bool
        Whether the key applies only to the ``torch.compile`` backend.
    """

    name: str
    parse: Optional[Callable[[str, Any], Any]]
    default: Any
    doc: str
    default_doc: Optional[str] = None
    partition_only: bool = False
    backend_only: bool = False

    def shown_default(self) -> str:
        """The default as the docs show it (Markdown)."""
        if self.default_doc is not None:
            return self.default_doc
        if isinstance(self.default, str):
            return f'`"{self.default}"`'
        if isinstance(self.default, tuple):
            return f"`{list(self.default)}`"
        return f"`{self.default}`"


#: Every accepted key, in the order the docs and error messages list them.
OPTIONS: Tuple[OptionSpec, ...] = (
    OptionSpec("input_infos", None, None,
               "`[(name, shape[, dtype]), ...]`; a list of such lists compiles one program per "
               "shape set; a `str` dim is symbolic", default_doc="required"),
    OptionSpec("default_dtype", _default_dtype, "float32",
               '`"float32"`, `"float16"` or `"bfloat16"`: the dtype the model computes in and '
               "its floating inputs/outputs use (default: float32, or the model's own for a "
               "`.half()`/`.bfloat16()` model; bfloat16 runs convolutions, linear layers and "
               "attention in bfloat16 on CPUs with AVX-512 BF16 or AMX, as torch.autocast "
               "does, passing bfloat16 results between them, and TVM's kernels in float32; "
               "with a warning where a bfloat16 matrix product measures slower than a float32 "
               "one)"),
    OptionSpec("export_dir", _path(allow_bytes=True), "pytorch_compiled",
               "where the compiled library, graph and params go"),
    OptionSpec("num_outputs", _int_at_least(1, allow_none=True), None,
               "number of outputs, checked against the model", default_doc="from the model"),
    OptionSpec("tuning_n_trials", _int_at_least(0), 0,
               "MetaSchedule trial budget; `0` skips tuning"),
    OptionSpec("tuning_log_file", _path(allow_bytes=False), "tuning.log",
               "MetaSchedule log, re-used when it exists"),
    OptionSpec("tuning_rpc", _tuning_rpc, None,
               'measure tuning candidates on the RPC servers of a TVM tracker: `{"tracker": '
               '"host:port", "key": KEY}`, optionally `"workers"` (measurements at once; default '
               'one per server under `KEY`) and `"timeout_s"` (the most one measurement may '
               "take, waiting for a server included; default 60); candidates are still built "
               "here (docs/tuning.md)",
               default_doc="measure on this machine"),
    OptionSpec("tuning_builders", _int_at_least(1, allow_none=True), None,
               "processes that build tuning candidates at once",
               default_doc="one per physical core"),
    OptionSpec("tuning_kernels", _one_of("all", "heavy"), "all",
               '`"all"`: tune every TVM kernel of the program; `"heavy"`: profile the untuned '
               "program first and tune only the TVM kernels that take 90% of its TVM-kernel "
               "time (docs/tuning.md)"),
    OptionSpec("tuning_compare_vendor", _bool, False,
               "CPU, experimental: also tune TVM kernels for the convolutions that run on "
               "oneDNN, time both per convolution, and keep the faster (recorded next to the "
               "tuning log, applied by later compiles with it; docs/tuning.md)"),
    OptionSpec("target", lambda key, value: value, None,
               'TVM target (`dict`, `Target`, `"llvm"`, `"cuda"`)',
               default_doc="this CPU (its model, the features it enables, its cores), or the "
                           "GPU when `device` is CUDA"),
    OptionSpec("device", _device, None,
               '`"cpu"`, `"cuda"`, `"cuda:N"`, a `torch.device` or `tvm.cpu()` / `tvm.cuda(N)`',
               default_doc="where the model's parameters are"),
    OptionSpec("dim_ranges", lambda key, value: check_dim_ranges(value), {},
               "`{dim_name: (min, max)}` for symbolic dims", default_doc="`(1, 2**20)`"),
    OptionSpec("vendor_kernels", _bool, True,
               "run convolutions, matmuls and attention on oneDNN/MKL/ATen (CPU) or "
               "cuDNN/cuBLAS/ATen (CUDA) through libtorch, and layer norm and softmax on ATen; "
               "on CPU also pooling and transcendental elementwise ops (gelu, sigmoid, tanh, "
               "silu, exp)"),
    OptionSpec("bucket_padding", _bool, False,
               "pad a smaller batch up to the nearest compiled bucket, slice outputs back (only "
               "for models whose batch rows are independent)"),
    OptionSpec("verify", _bool, True,
               "after building, run the compiled program and the source model on the same "
               "inputs and raise `ConversionError` naming the first output that differs beyond "
               "a dtype-aware tolerance; turn off for nondeterministic models"),
    OptionSpec("example_inputs", _tensors_or_none, None,
               "inputs (a list or tuple of tensors) for the verification run",
               default_doc="generated from `input_infos`"),
    OptionSpec("partition", _bool, False,
               "compile the parts TVM supports, keep the rest in TorchScript; returns a "
               "`ScriptModule` with the model's `forward` signature"),
    OptionSpec("min_block_size", _int_at_least(1), 3,
               "the fewest operators a TVM subgraph may have (a fused transformer kernel counts "
               "as enough)", partition_only=True),
    OptionSpec("torch_executed_ops", _operator_kinds, (),
               'operator kinds that stay in TorchScript, e.g. `["aten::softmax"]`',
               partition_only=True),
    OptionSpec("require_full_compilation", _bool, False,
               "raise instead of keeping any operator in TorchScript", partition_only=True),
    OptionSpec("dynamic_shapes", _bool, True,
               "compile subgraphs whose sizes vary between calls with symbolic dims "
               "(`TvmVMModule`; else keep them in TorchScript)", partition_only=True),
    OptionSpec("cache_dir", _path(allow_bytes=False), None,
               "a directory where compiled graphs are saved and looked up by graph, input "
               "signature, weights and options, so a later process loads them instead of "
               "building", default_doc="in-process cache only", backend_only=True),
)

#: The table by key.
OPTIONS_BY_NAME: Dict[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}

#: Keys that only apply with ``"partition": True``.
PARTITION_KEYS = tuple(spec.name for spec in OPTIONS if spec.partition_only)

#: Keys that only apply to the ``torch.compile`` backend (:mod:`.dynamo_backend`).
BACKEND_KEYS = tuple(spec.name for spec in OPTIONS if spec.backend_only)


def _plain(text: str) -> str:
    """Markdown without code spans (for error messages and the CLI's help)."""
    return text.replace("`", "")


def _described(spec: OptionSpec) -> str:
    if spec.backend_only:
        return "torch.compile backend: " + spec.doc
    return ("partition: " if spec.partition_only else "") + spec.doc


def _check_known(option: Any) -> Dict[str, Any]:
    if option is None:
        return {}
    if not isinstance(option, dict):
        raise TypeError(f"tvm.contrib.torch.compile: option must be a dict, got "
                        f"{type(option).__name__}")
    unknown = sorted(set(option) - set(OPTIONS_BY_NAME))
    if unknown:
        valid = "\n".join(f"  {spec.name}: {_plain(_described(spec))}" for spec in OPTIONS)
        _fail(f"unknown option key(s) {unknown}; valid keys are:\n{valid}")
    return option


def parse_options(option: Optional[Dict[str, Any]],
                  require_input_infos: bool = True) -> CompileOptions:
    """Validate the ``option`` dict into :class:`CompileOptions`.

    Parameters
    ----------
    option : dict or None
        The options (see :data:`OPTIONS`).
    require_input_infos : bool
        Whether ``input_infos`` must be given (``partition`` takes example inputs instead).

    Raises
    ------
    ValueError, TypeError
        For unknown keys (the message lists the valid ones) and values of the wrong kind.
    """
    option = _check_known(option)
    values: Dict[str, Any] = {}
    for spec in OPTIONS:
        if spec.parse is None:
            continue
        values[spec.name] = spec.parse(spec.name, option[spec.name]) if spec.name in option \
            else spec.default
    infos = option.get("input_infos")
    if infos is None and not require_input_infos:
        buckets: List[List[InputInfo]] = []
    else:
        buckets = _parse_input_infos(infos, values["default_dtype"])
    values["dim_ranges"] = dict(values["dim_ranges"])
    return CompileOptions(buckets=buckets, given=frozenset(option), **values)


def options_markdown() -> str:
    """The docs' options table (docs/README.md, section Options), generated from :data:`OPTIONS`."""
    lines = ["| key | meaning | default |", "|---|---|---|"]
    lines += [f"| `{spec.name}` | {_described(spec)} | {spec.shown_default()} |"
              for spec in OPTIONS]
    return "\n".join(lines) + "\n"


def cli_help(name: str, extra: str = "") -> str:
    """The command line's help for the flag that sets option ``name`` (argparse-escaped)."""
    spec = OPTIONS_BY_NAME[name]
    text = _plain(spec.doc) + extra + f" (default {_plain(spec.shown_default())})"
    return text.replace("%", "%%")


#: Markers around the generated table in docs/README.md.
DOCS_BEGIN = "<!-- options table: generated by tvm.contrib.torch.options.options_markdown() -->"
DOCS_END = "<!-- end of the generated options table -->"


def replace_docs_section(text: str) -> str:
    """``text`` (docs/README.md) with the generated options table between the markers."""
    pattern = re.compile(re.escape(DOCS_BEGIN) + r"\n.*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(text):
        raise ValueError("the docs have no generated options table markers")
    return pattern.sub(lambda _: f"{DOCS_BEGIN}\n{options_markdown()}{DOCS_END}", text)


def example_tensor(info: InputInfo, dim_values: Dict[str, int], device: str) -> torch.Tensor:
    """A deterministic example input for tracing (float inputs are float32 for conversion)."""
    shape = [d if isinstance(d, int) else dim_values[d] for d in info.shape]
    dtype = getattr(torch, info.dtype)
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.rand(shape, generator=generator).to(device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def shapes_of(bucket: Sequence[InputInfo]) -> List[Tuple[Dim, ...]]:
    """The shapes of one bucket."""
    return [info.shape for info in bucket]
