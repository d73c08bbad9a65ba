"""The ``option`` dict of :func:`tvm.contrib.torch.compile`: keys, defaults and checks."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

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


@dataclasses.dataclass
class CompileOptions:
    """Validated compile options (see :data:`OPTION_DOCS`)."""

    buckets: List[List[InputInfo]]
    default_dtype: str = "float32"
    export_dir: str = "pytorch_compiled"
    num_outputs: Optional[int] = None
    tuning_n_trials: int = 0
    tuning_log_file: str = "tuning.log"
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
    #: Whether ``tuning_log_file`` was given (an existing log is then applied untuned).
    tuning_log_explicit: bool = False

    @property
    def num_inputs(self) -> int:
        """Number of model inputs."""
        return len(self.buckets[0])

    @property
    def dynamic(self) -> bool:
        """Whether some input dim is symbolic."""
        return any(not info.is_static for bucket in self.buckets for info in bucket)


#: Every accepted key with its meaning.
OPTION_DOCS = {
    "input_infos": "list of (name, shape[, dtype]) per input; a list of such lists compiles "
                   "one program per shape set (buckets); a str dim is symbolic",
    "default_dtype": '"float32" or "float16": the dtype the model computes in and floating '
                     "inputs/outputs use",
    "export_dir": "directory for the compiled library, graph and params",
    "num_outputs": "number of output tensors (checked against the model)",
    "tuning_n_trials": "MetaSchedule trials; 0 skips tuning",
    "tuning_log_file": "MetaSchedule log (tuning records); re-used when it exists",
    "target": "TVM target (dict, Target, 'llvm' or 'cuda'); default: this CPU, or the GPU "
              "when device is CUDA",
    "device": '"cpu", "cuda" or "cuda:N"; default: where the model\'s parameters are',
    "dim_ranges": "{dim_name: (min, max)} for symbolic dims",
    "vendor_kernels": "run convolutions and matmuls on PyTorch's oneDNN/MKL kernels on CPU "
                      "(default True)",
    "bucket_padding": "pad a smaller batch (dim 0) up to the nearest compiled bucket and slice "
                      "the outputs back (default False; only for models whose batch rows are "
                      "independent)",
    "partition": "compile only the parts TVM supports and keep the rest (control flow, "
                 "custom and unsupported operators) in TorchScript; returns a ScriptModule "
                 "with the model's own forward signature (default False)",
    "min_block_size": "partition: the fewest operators a TVM subgraph may have (default 3)",
    "torch_executed_ops": 'partition: operator kinds that stay in TorchScript, e.g. '
                          '["aten::softmax"]',
    "require_full_compilation": "partition: raise instead of keeping any operator in "
                                "TorchScript (default False)",
    "dynamic_shapes": "partition: compile subgraphs whose sizes vary between calls (loop "
                      "iterations) with symbolic dims (TvmVMModule) instead of keeping them in "
                      "TorchScript (default True)",
}

#: Keys that only apply with ``"partition": True``.
PARTITION_KEYS = ("min_block_size", "torch_executed_ops", "require_full_compilation",
                  "dynamic_shapes")

_FLOAT_DTYPES = ("float32", "float16")


def _fail(message: str) -> None:
    raise ValueError(f"tvm.contrib.torch.compile: {message}")


def _parse_info(item: Any, index: int, default_dtype: str) -> InputInfo:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        _fail(f"input_infos[{index}] must be (name, shape) or (name, shape, dtype), got {item!r}")
    name, shape = item[0], item[1]
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
    dtype = item[2] if len(item) == 3 else default_dtype
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32",
                     "int64", "uint8", "bool"):
        _fail(f"input_infos[{index}] ('{name}') has unsupported dtype {dtype!r}")
    if dtype in _FLOAT_DTYPES:
        dtype = default_dtype
    return InputInfo(name, tuple(dims), dtype)


def _is_info(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str)


def parse_options(option: Optional[Dict[str, Any]],
                  require_input_infos: bool = True) -> CompileOptions:
    """Validate the ``option`` dict.

    Parameters
    ----------
    option : dict or None
        The options (see :data:`OPTION_DOCS`).
    require_input_infos : bool
        Whether ``input_infos`` must be given (``partition`` takes example inputs instead).

    Raises
    ------
    ValueError, TypeError
        For unknown keys (the message lists the valid ones) and values of the wrong kind.
    """
    if option is None:
        option = {}
    if not isinstance(option, dict):
        raise TypeError(f"tvm.contrib.torch.compile: option must be a dict, got "
                        f"{type(option).__name__}")
    unknown = sorted(set(option) - set(OPTION_DOCS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in OPTION_DOCS.items())
        _fail(f"unknown option key(s) {unknown}; valid keys are:\n{valid}")

    default_dtype = option.get("default_dtype", "float32")
    if default_dtype not in _FLOAT_DTYPES:
        _fail(f"default_dtype must be one of {list(_FLOAT_DTYPES)}, got {default_dtype!r}")

    infos = option.get("input_infos")
    if infos is None and not require_input_infos:
        sets = []
    elif not infos or not isinstance(infos, (list, tuple)):
        _fail(f"input_infos is required: a list of (name, shape) per input, got {infos!r}")
    else:
        sets = [infos] if _is_info(infos[0]) else list(infos)
    buckets = []
    for set_index, info_set in enumerate(sets):
        if not isinstance(info_set, (list, tuple)) or not info_set:
            _fail(f"input_infos bucket {set_index} must be a non-empty list of (name, shape)")
        buckets.append([_parse_info(item, i, default_dtype) for i, item in enumerate(info_set)])
    names = [i.name for i in buckets[0]] if buckets else []
    for set_index, bucket in enumerate(buckets[1:], 1):
        if [i.name for i in bucket] != names:
            _fail(f"input_infos bucket {set_index} has inputs {[i.name for i in bucket]}, "
                  f"bucket 0 has {names}")

    def _int(key, default, minimum):
        value = option.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(f"{key} must be an int >= {minimum}, got {value!r}")
        return value

    dim_ranges = {}
    for dim_name, bounds in (option.get("dim_ranges") or {}).items():
        if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                or not all(isinstance(b, int) and b > 0 for b in bounds) or bounds[0] > bounds[1]):
            _fail(f"dim_ranges['{dim_name}'] must be (min, max) with 0 < min <= max, "
                  f"got {bounds!r}")
        dim_ranges[dim_name] = (int(bounds[0]), int(bounds[1]))

    device = option.get("device")
    if device is not None:
        device = str(torch.device(device))
        if not (device == "cpu" or device.startswith("cuda")):
            _fail(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    export_dir = option.get("export_dir", "pytorch_compiled")
    if not isinstance(export_dir, (str, bytes)) and not hasattr(export_dir, "__fspath__"):
        _fail(f"export_dir must be a path, got {export_dir!r}")
    log_file = option.get("tuning_log_file", "tuning.log")
    if not isinstance(log_file, str) and not hasattr(log_file, "__fspath__"):
        _fail(f"tuning_log_file must be a path, got {log_file!r}")
    executed = option.get("torch_executed_ops", ())
    if isinstance(executed, str) or not isinstance(executed, (list, tuple, set)) or \
            not all(isinstance(k, str) and "::" in k for k in executed):
        _fail("torch_executed_ops must be a list of operator kinds such as 'aten::relu', "
              f"got {executed!r}")
    for key in ("vendor_kernels", "bucket_padding", "partition", "require_full_compilation",
                "dynamic_shapes"):
        if key in option and not isinstance(option[key], bool):
            _fail(f"{key} must be a bool, got {option[key]!r}")
    return CompileOptions(
        buckets=buckets,
        default_dtype=default_dtype,
        export_dir=str(export_dir),
        num_outputs=_int("num_outputs", None, 1),
        tuning_n_trials=_int("tuning_n_trials", 0, 0),
        tuning_log_file=str(log_file),
        target=option.get("target"),
        device=device,
        dim_ranges=dim_ranges,
        vendor_kernels=option.get("vendor_kernels", True),
        bucket_padding=option.get("bucket_padding", False),
        partition=option.get("partition", False),
        min_block_size=_int("min_block_size", 3, 1),
        torch_executed_ops=tuple(executed),
        require_full_compilation=option.get("require_full_compilation", False),
        dynamic_shapes=option.get("dynamic_shapes", True),
        tuning_log_explicit="tuning_log_file" in option,
    )


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
