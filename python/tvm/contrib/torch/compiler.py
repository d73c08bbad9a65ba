"""``compile()``: a PyTorch model in, a scriptable module out.

The steps live in :mod:`.pipeline` (whole models) and :mod:`.partitioning` (partial
offload); ``PyTorchTVMModule`` is re-exported here for code that imported it from this module.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch

from .options import BACKEND_KEYS, PARTITION_KEYS, CompileOptions, example_tensor, parse_options
from .partitioning import partition_with_options
from .pipeline import PyTorchTVMModule, compile_program, model_device

logger = logging.getLogger(__name__)


def compile(module: Any, option: Optional[Dict[str, Any]] = None) -> torch.nn.Module:  # pylint: disable=redefined-builtin
    """Compile a PyTorch model with TVM into a scriptable module.

    Parameters
    ----------
    module : torch.jit.ScriptModule, torch.nn.Module or torch.export.ExportedProgram
        A ``torch.jit.trace``/``torch.jit.script`` module, a plain module or an exported
        program, computing in float32.
    option : dict
        See :data:`tvm.contrib.torch.options.OPTIONS`; ``input_infos`` is required.

    Returns
    -------
    torch.nn.Module
        ``forward(inputs: List[Tensor]) -> List[Tensor]``; works with ``torch.jit.script``
        and saves into one self-contained file. With ``"partition": True``: a
        ``torch.jit.ScriptModule`` with the model's own ``forward`` signature (see
        :func:`tvm.contrib.torch.partition`).
    """
    opts = parse_options(option)
    backend_keys = sorted(opts.given & set(BACKEND_KEYS))
    if backend_keys:
        raise ValueError(f"tvm.contrib.torch.compile: {backend_keys} apply only to the "
                         "torch.compile backend (torch.compile(m, backend=\"tvm_contrib_torch\", "
                         "options={...}))")
    if opts.partition:
        return _compile_partitioned(module, opts)
    misplaced = sorted(opts.given & set(PARTITION_KEYS))
    if misplaced:
        raise ValueError(f"tvm.contrib.torch.compile: {misplaced} apply only with "
                         "'partition': True")
    started = time.perf_counter()
    result = compile_program(module, opts.buckets, opts, opts.export_dir)
    logger.info("compiled in %.1fs", time.perf_counter() - started)
    return result


def _compile_partitioned(module: Any, opts: CompileOptions) -> torch.jit.ScriptModule:
    """``compile(..., {"partition": True})``: example inputs made from ``input_infos``."""
    if len(opts.buckets) != 1 or opts.dynamic:
        raise ValueError("tvm.contrib.torch.compile: partition takes one input_infos set with "
                         "static shapes (the shapes inside the model are recorded from it)")
    device = opts.device or model_device(module)
    examples = [example_tensor(info, {}, device) for info in opts.buckets[0]]
    return partition_with_options(module, examples, opts)


__all__ = ["PyTorchTVMModule", "compile"]
