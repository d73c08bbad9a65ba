"""``python -m tvm.contrib.torch compile MODEL.pt --input x:1x3x224x224 -o MODEL_tvm.pt``.

Takes a saved TorchScript model and writes a drop-in replacement: a saved TorchScript model
with the same ``forward`` signature (tensor arguments in, a tensor or a tuple of tensors out)
whose body calls the TVM-compiled module. Prints a short report.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import List, Sequence, Tuple

import torch

from .timing import measure

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


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


def _signature(model: torch.jit.ScriptModule) -> Tuple[List[str], int]:
    """Tensor argument names of forward and the number of tensors it returns (0: one tensor)."""
    schema = model.forward.schema
    names = []
    for arg in schema.arguments[1:]:
        if str(arg.type) != "Tensor":
            raise CliError(f"forward argument '{arg.name}' is {arg.type}; only Tensor arguments "
                           "are supported")
        names.append(arg.name)
    ret = str(schema.returns[0].type)
    if ret == "Tensor":
        return names, 0
    if ret.startswith("Tuple[") and all(t.strip() == "Tensor" for t in ret[6:-1].split(",")):
        return names, len(ret[6:-1].split(","))
    raise CliError(f"forward returns {ret}; only a Tensor or a tuple of Tensors is supported")


_WRAPPER = '''
from typing import List, Tuple
import torch


class TvmDropIn(torch.nn.Module):
    def __init__(self, tvm_module):
        super().__init__()
        self.tvm_module = tvm_module

    def forward(self, {args}) -> {ret}:
        out: List[torch.Tensor] = self.tvm_module([{names}])
        return {result}
'''


def _drop_in(tvm_module: torch.nn.Module, names: Sequence[str], num_tuple: int,
             workdir: str) -> torch.jit.ScriptModule:
    """Script a wrapper whose forward has the original signature (TorchScript needs source)."""
    ret = "torch.Tensor" if num_tuple == 0 else \
        "Tuple[" + ", ".join(["torch.Tensor"] * num_tuple) + "]"
    result = "out[0]" if num_tuple == 0 else \
        "(" + ", ".join(f"out[{i}]" for i in range(num_tuple)) + ",)"
    source = _WRAPPER.format(args=", ".join(f"{n}: torch.Tensor" for n in names),
                             names=", ".join(names), ret=ret, result=result)
    path = os.path.join(workdir, "tvm_drop_in.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("tvm_drop_in", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch.jit.script(module.TvmDropIn(tvm_module))


def compile_command(args: argparse.Namespace) -> None:
    """The ``compile`` subcommand."""
    from . import compile as tvm_compile  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(args.model):
        raise CliError(f"no such model file: {args.model}")
    try:
        model = torch.jit.load(args.model, map_location="cpu").eval()
    except Exception as err:  # pylint: disable=broad-except
        raise CliError(f"cannot load {args.model} as TorchScript: {err}") from err
    names, num_tuple = _signature(model)
    infos = [_parse_input(text) for text in args.input]
    if len(infos) != len(names):
        raise CliError(f"the model's forward takes {len(names)} tensor(s) ({', '.join(names)}) "
                       f"but {len(infos)} --input given")
    dtype = _DTYPES[args.dtype]
    inputs = [torch.rand(shape).to(dtype) for _, shape in infos]
    option = {"input_infos": list(infos), "default_dtype": args.dtype,
              "tuning_n_trials": args.trials}
    if args.tuning_log:
        option["tuning_log_file"] = args.tuning_log
    with tempfile.TemporaryDirectory(prefix="tvm_torch_cli_") as workdir:
        option["export_dir"] = os.path.join(workdir, "export")
        start = time.perf_counter()
        with torch.no_grad():
            tvm_module = tvm_compile(model, option)
        compile_s = time.perf_counter() - start
        drop_in = _drop_in(tvm_module, names, num_tuple, workdir)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        tmp_out = os.path.join(out_dir, f".{os.path.basename(args.output)}.partial")
        drop_in.save(tmp_out)
        os.replace(tmp_out, args.output)  # a complete file or none
    with torch.no_grad():
        float_inputs = [x.float() for x in inputs]
        before = measure(lambda: model(*float_inputs), args.repeat)[0]
        after = measure(lambda: drop_in(*inputs), args.repeat)[0]
    print(f"compiled {args.model} -> {args.output} in {compile_s:.1f} s")
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
                    "whose computation runs as TVM-compiled code. Load it with "
                    "`import tvm.contrib.torch` (or the runtime library in C++) first.")
    comp.add_argument("model", help="the saved TorchScript model (torch.jit.save)")
    comp.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE",
                      help="one per forward argument, in order, e.g. x:1x3x224x224")
    comp.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                      help="compute and input/output dtype (default float32)")
    comp.add_argument("--trials", type=int, default=0,
                      help="MetaSchedule tuning trials (default 0: no tuning)")
    comp.add_argument("--tuning-log", help="MetaSchedule log to write and re-use")
    comp.add_argument("--repeat", type=int, default=10,
                      help="timed calls for the before/after report (default 10)")
    comp.add_argument("-o", "--output", required=True, help="where to save the result")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    # TorchScript is this tool's input and output format: its deprecation notices are noise here.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated")
    args = build_parser().parse_args(argv)
    try:
        compile_command(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # pylint: disable=broad-except
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        return 1
    return 0
