"""``python -m tvm.contrib.torch compile MODEL.pt --input x:1x3x224x224 -o MODEL_tvm.pt``.

Takes a saved TorchScript model and writes a drop-in replacement: the model partitioned by
:func:`tvm.contrib.torch.partition` (the operators TVM supports run as TVM programs, the rest
stays TorchScript), saved with the same ``forward`` signature. Prints what was offloaded and
the latency before and after.

With ``--trials N`` it tunes first, measuring on this machine or, with ``--tuning-rpc
HOST:PORT --tuning-key KEY``, on the RPC servers of a TVM tracker.

``python -m tvm.contrib.torch profile MODEL_tvm.pt --input x:1x3x224x224`` prints where a
compiled model's time goes, kernel by kernel (:mod:`.profiler`); ``tuning-db list|merge``
shows and merges tuning logs (:mod:`.tuning_db`); ``triton-repo`` writes a Triton Inference
Server model repository (:mod:`.triton_repo`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import List, Sequence, Tuple

import torch

from .dtypes import COMPUTE_DTYPES
from .errors import TuningError
from .export import save_module
from .frontend import ConversionError
from .options import cli_help, parse_options, parse_tracker
from .partitioning import partition_report, partition_with_options
from .timing import measure

logger = logging.getLogger(__name__)


class CliError(Exception):
    """An error reported as one line with a non-zero exit code."""


def _parse_input(text: str) -> Tuple[str, Tuple[int, ...]]:
    name, sep, dims = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise CliError(f"--input must look like NAME:1x3x224x224, got {text!r}")
    return name, shape


def _parse_typed_input(text: str) -> Tuple[str, Tuple[int, ...], torch.dtype]:
    """``NAME:SHAPE[:DTYPE]`` (dtype float32 by default)."""
    head, sep, dtype_name = text.rpartition(":")
    if sep and head and ":" in head:
        name, shape = _parse_input(head)
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise CliError(f"--input {text!r}: unknown dtype {dtype_name!r}")
        return name, shape, dtype
    name, shape = _parse_input(text)
    return name, shape, torch.float32


def _random_input(shape: Tuple[int, ...], dtype: torch.dtype,
                  generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) for floating dtypes; 0 or 1 for the others (valid as ids and masks)."""
    if dtype.is_floating_point:
        return torch.rand(shape, generator=generator).to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def _load_model(path: str) -> torch.jit.ScriptModule:
    """A saved TorchScript model, on CPU, in eval mode."""
    if not os.path.isfile(path):
        raise CliError(f"no such model file: {path}")
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except Exception as err:  # pylint: disable=broad-except
        raise CliError(f"cannot load {path} as TorchScript: {err}") from err


def _model_and_random_inputs(args: argparse.Namespace):
    """The saved model and one random input per ``--input NAME:SHAPE[:DTYPE]``."""
    model = _load_model(args.model)
    generator = torch.Generator().manual_seed(0)
    return model, [_random_input(shape, dtype, generator)
                   for _, shape, dtype in (_parse_typed_input(text) for text in args.input)]


def profile_command(args: argparse.Namespace) -> None:
    """The ``profile`` subcommand."""
    from .profiler import profile  # pylint: disable=import-outside-toplevel

    model, inputs = _model_and_random_inputs(args)
    try:
        report = profile(model, inputs, repeat=args.repeat)
    except ValueError as err:
        raise CliError(str(err)) from err
    print(report.table(top=args.top if args.top > 0 else None))


def triton_repo_command(args: argparse.Namespace) -> None:
    """The ``triton-repo`` subcommand."""
    from .triton_repo import write_repository  # pylint: disable=import-outside-toplevel

    model, inputs = _model_and_random_inputs(args)
    try:
        config = write_repository(model, inputs, args.output, name=args.name)
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from err
    print(f"wrote {config} and {os.path.join(os.path.dirname(config), '1', 'model.pt')}")
    print("serve with: LD_PRELOAD=<libtvm_torch_runtime.so built against the server's libtorch> "
          f"tritonserver --model-repository={args.output}")


def tuning_db_command(args: argparse.Namespace) -> None:
    """The ``tuning-db`` subcommand."""
    from . import tuning_db  # pylint: disable=import-outside-toplevel

    try:
        if args.action == "list":
            print(tuning_db.table(tuning_db.summarize(args.logs[0])))
            return
        added = tuning_db.merge(args.logs, args.output)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err
    print(f"merged {len(args.logs)} log(s) into {args.output}: {added} record(s) added")


def _argument_names(model: torch.jit.ScriptModule) -> List[str]:
    """Names of the forward arguments given by --input: the tensors before any default.

    Arguments with defaults (``src_mask=None``) are left out and keep their defaults.
    """
    names = []
    for arg in model.forward.schema.arguments[1:]:
        if arg.has_default_value():
            break
        if str(arg.type) != "Tensor":
            raise CliError(f"forward argument '{arg.name}' is {arg.type}; only Tensor arguments "
                           "(and arguments with defaults) are supported")
        names.append(arg.name)
    return names


def _tuning_rpc(args: argparse.Namespace):
    """The ``tuning_rpc`` option of ``--tuning-rpc HOST:PORT --tuning-key KEY ...`` (or None)."""
    extra = [flag for flag, value in (("--tuning-key", args.tuning_key),
                                      ("--tuning-workers", args.tuning_workers),
                                      ("--tuning-timeout", args.tuning_timeout))
             if value is not None]
    if not args.tuning_rpc:
        if extra:
            raise CliError(f"{', '.join(extra)} given without --tuning-rpc HOST:PORT")
        return None
    try:
        parse_tracker(args.tuning_rpc, "--tuning-rpc")
    except ValueError as err:
        raise CliError(str(err).replace("tvm.contrib.torch.compile: ", "")) from err
    if not args.tuning_key:
        raise CliError("--tuning-rpc needs --tuning-key KEY: the key the RPC servers "
                       "registered under (rpc_server --key)")
    rpc = {"tracker": args.tuning_rpc, "key": args.tuning_key}
    if args.tuning_workers is not None:
        rpc["workers"] = args.tuning_workers
    if args.tuning_timeout is not None:
        rpc["timeout_s"] = args.tuning_timeout
    return rpc


def compile_command(args: argparse.Namespace) -> None:
    """The ``compile`` subcommand."""
    rpc = _tuning_rpc(args)
    for name in args.import_module or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise CliError(f"cannot import {name}: {err}") from err
    for path in args.load_library or []:
        if not os.path.isfile(path):
            raise CliError(f"no such library: {path}")
        torch.ops.load_library(path)
    model = _load_model(args.model)
    names = _argument_names(model)
    infos = [_parse_input(text) for text in args.input]
    if len(infos) != len(names):
        raise CliError(f"the model's forward takes {len(names)} tensor(s) ({', '.join(names)}) "
                       f"but {len(infos)} --input given")
    given = [name for name, _ in infos]
    if given != names:
        wrong = [g for g, n in zip(given, names) if g != n]
        raise CliError(f"--input names {', '.join(repr(w) for w in wrong)} do not match the "
                       f"model's forward arguments: give them in order as "
                       f"{', '.join(n + ':SHAPE' for n in names)}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f"cannot write {args.output}: directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {args.output}: directory {out_dir} is not writable")
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:
        model = model.to(dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(shape, generator=generator).to(dtype) for _, shape in infos]
    option = {"tuning_n_trials": args.trials, "min_block_size": args.min_block_size,
              "torch_executed_ops": list(args.torch_executed_op or []),
              "require_full_compilation": args.require_full_compilation,
              "verify": not args.no_verify}
    if args.tuning_log:
        option["tuning_log_file"] = args.tuning_log
    if rpc is not None:
        option["tuning_rpc"] = rpc
    if args.tuning_builders is not None:
        option["tuning_builders"] = args.tuning_builders
    option["tuning_kernels"] = args.tuning_kernels
    option["tuning_compare_vendor"] = args.tuning_compare_vendor
    if args.trials > 0:  # the tuning summary (trials, time, speed-up) is part of the report,
        # and so are the convolutions' races (oneDNN against tuned TVM kernels)
        for name in ("tvm.contrib.torch.tuning", "tvm.contrib.torch.vendor_choice"):
            summary = logging.getLogger(name)
            summary.setLevel(logging.INFO)
            summary.addHandler(logging.StreamHandler(sys.stdout))
    with tempfile.TemporaryDirectory(prefix="tvm_torch_cli_") as workdir:
        option["export_dir"] = os.path.join(workdir, "export")
        opts = parse_options(option, require_input_infos=False)
        start = time.perf_counter()
        with torch.no_grad():
            replacement = partition_with_options(model, inputs, opts)
        compile_s = time.perf_counter() - start
        try:
            save_module(replacement, args.output)  # a complete file or none
        except OSError as err:
            raise CliError(f"cannot write {args.output}: {err.strerror or err}") from err
    with torch.no_grad():
        before = measure(lambda: model(*inputs), args.repeat)[0]
        after = measure(lambda: replacement(*inputs), args.repeat)[0]
    print(f"compiled {args.model} -> {args.output} in {compile_s:.1f} s")
    print(partition_report(replacement).summary())
    print(f"latency: TorchScript {before:.2f} ms, TVM {after:.2f} ms ({before / after:.2f}x)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m tvm.contrib.torch",
        description="Compile saved TorchScript models with TVM into drop-in replacements.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser(
        "compile", help="compile a saved TorchScript model",
        description="Write a saved TorchScript model with the same forward signature as MODEL "
                    "whose operators run as TVM-compiled code where TVM supports them (the "
                    "rest, control flow included, stays TorchScript). Load it with "
                    "`import tvm.contrib.torch` (or the runtime library in C++) first.")
    comp.add_argument("model", help="the saved TorchScript model (torch.jit.save)")
    comp.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE",
                      help="one per forward argument, in order, e.g. x:1x3x224x224")
    comp.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                      help="compute and input/output dtype (default float32)")
    comp.add_argument("--trials", type=int, default=0, help=cli_help("tuning_n_trials"))
    comp.add_argument("--tuning-log", help=cli_help("tuning_log_file"))
    comp.add_argument("--tuning-rpc", metavar="HOST:PORT",
                      help="measure tuning candidates on the RPC servers of the TVM tracker at "
                           "HOST:PORT (python -m tvm.exec.rpc_tracker); needs --tuning-key "
                           "(default: measure on this machine)")
    comp.add_argument("--tuning-key", metavar="KEY",
                      help="the key the RPC servers registered under (rpc_server --key)")
    comp.add_argument("--tuning-workers", type=int, metavar="N",
                      help="measurements at once on the RPC servers (default: one per server "
                           "registered under the key)")
    comp.add_argument("--tuning-timeout", type=float, metavar="SECONDS",
                      help="the most one RPC measurement may take, waiting for a free server "
                           "included; also the tracker's time to answer (default 60)")
    comp.add_argument("--tuning-builders", type=int, metavar="N",
                      help=cli_help("tuning_builders"))
    comp.add_argument("--tuning-kernels", choices=("all", "heavy"), default="all",
                      help=cli_help("tuning_kernels"))
    comp.add_argument("--tuning-compare-vendor", action="store_true",
                      help=cli_help("tuning_compare_vendor"))
    comp.add_argument("--import-module", action="append", metavar="MODULE",
                      help="a Python module to import first, e.g. one registering the model's "
                           "custom operators with torch.library (repeatable)")
    comp.add_argument("--load-library", action="append", metavar="PATH",
                      help="a custom-operator library to load first with "
                           "torch.ops.load_library (repeatable)")
    comp.add_argument("--min-block-size", type=int, default=3, help=cli_help("min_block_size"))
    comp.add_argument("--torch-executed-op", action="append", metavar="KIND",
                      help=cli_help("torch_executed_ops", "; one per flag (repeatable)"))
    comp.add_argument("--require-full-compilation", action="store_true",
                      help=cli_help("require_full_compilation"))
    comp.add_argument("--no-verify", action="store_true",
                      help="do not check the result against the model on the example inputs "
                           "(for models that are not deterministic)")
    comp.add_argument("--repeat", type=int, default=10,
                      help="timed calls for the before/after report (default 10)")
    comp.add_argument("-o", "--output", required=True, help="where to save the result")
    prof = sub.add_parser(
        "profile", help="print where a compiled model's time goes, kernel by kernel",
        description="Run a saved model holding TVM programs (a compile() or partition() "
                    "result, or the output of the compile command) and print each kernel's "
                    "time: TVM kernels, vendor kernels (oneDNN, MKL, ATen) and the Relax VM, "
                    "with their share of the model's latency.")
    prof.add_argument("model", help="the saved model (torch.jit.save)")
    prof.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE[:DTYPE]",
                      help="one per forward input, in order, e.g. x:1x3x224x224 or "
                           "input_ids:1x128:int64 (random values: floats in [0, 1), integers "
                           "0 or 1)")
    prof.add_argument("--repeat", type=int, default=20, help="timed calls (default 20)")
    prof.add_argument("--top", type=int, default=30,
                      help="kernels to list, heaviest first (default 30; 0: all)")
    tri = sub.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository for a model",
        description="Lay out a model repository for NVIDIA Triton's PyTorch (libtorch) "
                    "backend: config.pbtxt (inputs INPUT__i, outputs OUTPUT__j with the shapes "
                    "and dtypes of the given inputs and the model's outputs) and 1/model.pt.")
    tri.add_argument("model", help="the saved model holding TVM programs (torch.jit.save)")
    tri.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE[:DTYPE]",
                     help="one per forward input, in order, e.g. x:1x3x224x224")
    tri.add_argument("--name", default="model", help="the model's name (default: model)")
    tri.add_argument("-o", "--output", required=True, help="the model repository directory")
    tdb = sub.add_parser(
        "tuning-db", help="list or merge MetaSchedule tuning logs",
        description="List the kernels a tuning log (tuning_log_file) holds records for, or "
                    "merge logs (from several runs or machines) into one, so that no kernel "
                    "is tuned twice.")
    tdb.add_argument("action", choices=["list", "merge"])
    tdb.add_argument("logs", nargs="+", metavar="LOG", help="tuning log(s)")
    tdb.add_argument("-o", "--output", help="the merged log (merge; created if missing)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    # TorchScript is this tool's input and output format: its deprecation notices are noise here.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tuning-db" and (args.action == "merge") != bool(args.output):
            raise CliError("tuning-db merge takes -o MERGED; list takes no -o")
        if args.command == "tuning-db" and args.action == "list" and len(args.logs) != 1:
            raise CliError(f"tuning-db list takes one log, got {len(args.logs)}")
        {"compile": compile_command, "profile": profile_command,
         "triton-repo": triton_repo_command, "tuning-db": tuning_db_command}[args.command](args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConversionError, TuningError) as err:
        # Every line is useful: the operators, or the tracker's queue status.
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # pylint: disable=broad-except
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        return 1
    return 0
