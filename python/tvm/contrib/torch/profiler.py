"""Where a compiled model's time goes: per-kernel time of its TVM programs.

:func:`profile` runs a model (a ``compile()`` result, a partitioned model, any module holding
TVM engines, or a saved ``.pt``) with the runtime library's kernel profile switched on: every
call a compiled program makes — TVM-generated kernels, vendor kernels (oneDNN, MKL, ATen,
cuDNN, cuBLAS through libtorch) and the Relax VM's builtins — is timed. The report shows each
kernel's share of the model's latency, with the VM's own overhead and the time spent outside
TVM (TorchScript operators of a partitioned model) as rows of their own. The
``python -m tvm.contrib.torch profile`` command prints it for a saved model.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Sequence, Union

import torch
import tvm

from .module import takes_input_list
from .timing import measure

#: Library behind each vendor kernel of :mod:`.vendor_kernels` (named in the report).
_VENDOR_LIBRARY = {
    "tvm_torch.conv2d_nhwc": "oneDNN",
    "tvm_torch.conv2d_nchw_input": "oneDNN",
    "tvm_torch.conv2d_add_nhwc": "oneDNN",
    "tvm_torch.conv2d_nhwc_prepack": "oneDNN",
    "tvm_torch.conv2d_nhwc_out": "oneDNN",
    "tvm_torch.conv2d_nchw_input_out": "oneDNN",
    "tvm_torch.conv2d_add_nhwc_out": "oneDNN",
    "tvm_torch.linear": "MKL / oneDNN",
    "tvm_torch.linear_add": "MKL / oneDNN",
    "tvm_torch.linear_prepack": "MKL / oneDNN",
    "tvm_torch.conv2d_nchw": "ATen conv (cuDNN on CUDA)",
    "tvm_torch.conv2d_add_nchw": "ATen conv (cuDNN on CUDA)",
    "tvm_torch.matmul_bias": "ATen addmm (MKL / cuBLAS)",
    "tvm_torch.matmul": "ATen matmul (MKL / cuBLAS)",
    "tvm_torch.attention": "ATen scaled_dot_product_attention",
    "tvm_torch.attention_masked": "ATen scaled_dot_product_attention",
    "tvm_torch.attention_views": "ATen scaled_dot_product_attention",
    "tvm_torch.attention_views_masked": "ATen scaled_dot_product_attention",
}

#: Rows that are not kernels.
VM_OVERHEAD = "(Relax VM: dispatch between calls)"
OUTSIDE_TVM = "(outside TVM programs: TorchScript ops, input checks)"


@dataclasses.dataclass
class KernelTime:
    """One row of a :class:`ProfileReport`.

    Attributes
    ----------
    name : str
        The callee: a TVM kernel's name, a vendor kernel's ``tvm_torch.*`` name, a
        ``vm.builtin.*`` function, or one of :data:`VM_OVERHEAD` / :data:`OUTSIDE_TVM`.
    kind : str
        ``"TVM"``, ``"vendor: <library>"``, ``"VM builtin"`` or ``"other"``.
    program : str
        The input signature of the compiled program that made the calls ("" for
        :data:`OUTSIDE_TVM`).
    calls : float
        Calls per model call.
    ms : float
        Milliseconds per model call.
    share : float
        Fraction of the model's (profiled) latency.
    """

    name: str
    kind: str
    program: str
    calls: float
    ms: float
    share: float


@dataclasses.dataclass
class ProfileReport:
    """Result of :func:`profile`.

    Attributes
    ----------
    latency_ms : float
        Median latency of the model without profiling.
    profiled_ms : float
        Mean latency with every kernel timed (the rows add up to it).
    rows : list of KernelTime
        Kernels, heaviest first.
    """

    latency_ms: float
    profiled_ms: float
    rows: List[KernelTime]

    def by_kind(self) -> dict:
        """Milliseconds per model call for each kind ("TVM", "vendor: ...", ...)."""
        totals: dict = {}
        for row in self.rows:
            kind = row.kind.split(":")[0]
            totals[kind] = totals.get(kind, 0.0) + row.ms
        return totals

    def table(self, top: int | None = 30) -> str:
        """The report as text: one line per kernel, heaviest first."""
        lines = [f"latency {self.latency_ms:.3f} ms (median, unprofiled); "
                 f"{self.profiled_ms:.3f} ms per call while profiled",
                 "  ".join(f"{kind} {ms:.3f} ms ({ms / self.profiled_ms:.0%})"
                           for kind, ms in sorted(self.by_kind().items(),
                                                  key=lambda kv: -kv[1])),
                 f"{'share':>6} {'ms':>9} {'calls':>6}  {'kind':<38} kernel"]
        rows = self.rows if top is None else self.rows[:top]
        for row in rows:
            calls = f"{row.calls:g}" if row.kind != "other" else ""
            lines.append(f"{row.share:>6.1%} {row.ms:>9.3f} {calls:>6}  {row.kind:<38} "
                         f"{row.name}")
        if top is not None and len(self.rows) > top:
            rest = self.rows[top:]
            lines.append(f"{sum(r.share for r in rest):>6.1%} {sum(r.ms for r in rest):>9.3f} "
                         f"{'':>6}  {'':<38} ({len(rest)} more)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def kind_of(name: str) -> str:
    """What kind of code a program's callee is."""
    if name.startswith("tvm_torch."):
        return "vendor: " + _VENDOR_LIBRARY.get(name, "ATen")
    if name.startswith("vm.builtin.") or name.startswith("relax.") or name.startswith("vm."):
        return "VM builtin"
    return "TVM"


def _caller(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """How to call ``model`` with ``inputs``: as one list for a ``forward(List[Tensor])``
    (what ``compile`` returns), positionally otherwise."""
    inputs = list(inputs)
    if takes_input_list(model):
        return lambda: model(inputs)
    return lambda: model(*inputs)


def profile(model: Union[torch.nn.Module, str, os.PathLike], inputs: Sequence[torch.Tensor],
            repeat: int = 20, warmup: int = 3) -> ProfileReport:
    """Time every kernel the model's TVM programs run.

    Parameters
    ----------
    model : nn.Module, ScriptModule or path
        A ``compile()`` or ``partition()`` result, any module that calls them, or the path of
        one saved with ``torch.jit.save`` (loaded on CPU).
    inputs : list of Tensor
        The model's inputs (a model whose ``forward`` takes ``List[Tensor]`` gets them as one
        list).
    repeat : int
        Model calls measured (unprofiled, then profiled).
    warmup : int
        Calls before measuring.

    Returns
    -------
    report : ProfileReport
        Rows heaviest first; ``str(report)`` is a readable table.

    Raises
    ------
    ValueError
        If ``repeat`` is not positive, or the model ran no TVM program.
    """
    if repeat <= 0:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    if isinstance(model, (str, os.PathLike)):
        model = torch.jit.load(os.fspath(model), map_location="cpu")
    model.eval()
    call = _caller(model, inputs)
    start_fn = tvm.get_global_func("tvm_torch.profile_start")
    stop_fn = tvm.get_global_func("tvm_torch.profile_stop")
    with torch.no_grad():
        latency_ms = measure(call, repeat, warmup)[0]
        start_fn()
        try:
            begin = time.perf_counter()
            for _ in range(repeat):
                call()
            profiled_ms = (time.perf_counter() - begin) * 1e3 / repeat
        finally:
            raw = stop_fn()
    return _report(latency_ms, profiled_ms, repeat, raw)


def _report(latency_ms: float, profiled_ms: float, repeat: int, raw) -> ProfileReport:
    program_ms: dict = {}
    callee_ms: dict = {}
    rows = []
    for program, callee, calls, nanoseconds in raw:
        program, callee = str(program), str(callee)
        ms = int(nanoseconds) / 1e6 / repeat
        if callee == "":
            program_ms[program] = program_ms.get(program, 0.0) + ms
            continue
        callee_ms[program] = callee_ms.get(program, 0.0) + ms
        rows.append(KernelTime(callee, kind_of(callee), program, int(calls) / repeat, ms, 0.0))
    if not program_ms:
        raise ValueError("the model ran no TVM program: is it a compile() or partition() result "
                         "(or a module that calls one)?")
    for program, total in program_ms.items():
        rows.append(KernelTime(VM_OVERHEAD, "other", program, 0,
                               max(total - callee_ms.get(program, 0.0), 0.0), 0.0))
    rows.append(KernelTime(OUTSIDE_TVM, "other", "", 0,
                           max(profiled_ms - sum(program_ms.values()), 0.0), 0.0))
    for row in rows:
        row.share = row.ms / profiled_ms if profiled_ms > 0 else 0.0
    rows.sort(key=lambda r: -r.ms)
    return ProfileReport(latency_ms, profiled_ms, rows)
