"""Build: targets and the Relax-to-executable pipelines for CPU and CUDA.

The CPU pipeline is TVM's generic CPU pipeline with a default schedule for every TIR
function (TVM 0.27 leaves CPU kernels unscheduled: single-threaded scalar loops): dlight's
CPU GEMV and reduction rules, then :class:`ParallelVectorizeFallback` for the rest. The CUDA
pipeline is TVM's CUDA pipeline, whose dlight rules give every kernel a GPU schedule.
Functions already scheduled (tuned with MetaSchedule) are left as they are.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Dict, Optional, Union

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, get_extent
from tvm.target.codegen import llvm_get_vector_width

from .export import target_cpu_features

logger = logging.getLogger(__name__)


def host_cpu_target(num_cores: Optional[int] = None) -> tvm.target.Target:
    """The LLVM target for this machine: its CPU model, the features it has, its core count.

    LLVM names the CPU model from CPUID's family and model numbers and gives it every feature
    of that model, but a hypervisor or the kernel can hide some (AMX on a virtual Emerald
    Rapids). Code using those would stop with an illegal instruction, and the runtime would
    refuse the library, so the features this CPU does not have (by the runtime's own CPUID
    check) are switched off in ``mattr``.
    """
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    cores = num_cores or len(os.sched_getaffinity(0))
    attrs = {"kind": "llvm", "mcpu": cpu, "num-cores": int(cores)}
    missing = tvm.get_global_func("tvm_torch.missing_cpu_features")
    hidden = [str(f) for f in missing(target_cpu_features(tvm.target.Target(attrs)))]
    if hidden:
        logger.info("CPU model %s without %s (not enabled on this machine)", cpu,
                    ", ".join(hidden))
        attrs["mattr"] = [f"-{f}" for f in hidden]
    return tvm.target.Target(attrs)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions oneDNN computes with (AVX-512 BF16 or AMX)."""
    import torch  # pylint: disable=import-outside-toplevel

    return bool(torch.backends.mkldnn.is_available() and
                torch.ops.mkldnn._is_mkldnn_bf16_supported())  # pylint: disable=protected-access


@functools.lru_cache(maxsize=None)
def bfloat16_matmul_speedup() -> float:
    """How many times faster a bfloat16 matrix product runs than a float32 one on this CPU
    (< 1: slower), measured once per process.

    The product is a BERT-base layer's (128 x 768 by 768 x 768) through
    ``torch.nn.functional.linear``: oneDNN's bfloat16 GEMM against MKL's float32 one, best of
    5 calls each, on the current thread count. Some CPUs have the instructions but no speed
    from them: on a 2-vCPU Emerald Rapids virtual machine (AVX-512 BF16, AMX hidden) the
    bfloat16 product takes 1.5-1.7x as long.
    """
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 768, generator=generator)
    w = torch.randn(768, 768, generator=generator)

    def best(a, b) -> float:
        with torch.no_grad():
            for _ in range(2):
                F.linear(a, b)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                F.linear(a, b)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(x, w) / best(x.bfloat16(), w.bfloat16())


def bfloat16_slowdown_warning(speedup: float) -> Optional[str]:
    """The warning a bfloat16 CPU program gets when :func:`bfloat16_matmul_speedup` measured
    bfloat16 slower than float32 (by more than 10%, past timing noise), else None."""
    if speedup >= 0.9:
        return None
    return (f"bfloat16 matrix products run {1 / speedup:.1f}x slower than float32 ones on this "
            "CPU (measured at compile time): the bfloat16 program is built as asked, but "
            "default_dtype='float32' is likely faster here")


def cuda_target(arch: Optional[str] = None) -> tvm.target.Target:
    """A CUDA target for ``arch`` (``"sm_90"``), by default the current GPU's.

    The limits MetaSchedule's GPU rules need (threads and shared memory per block) are set as
    TVM's NVIDIA tags set them; the L2 size comes from the GPU when it is the one targeted.
    """
    import torch  # pylint: disable=import-outside-toplevel

    current = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        current = f"sm_{major}{minor}"
    arch = arch or current or "sm_80"
    attrs = {"kind": "cuda", "arch": arch, "max_num_threads": 1024,
             "max_threads_per_block": 1024, "thread_warp_size": 32,
             "max_shared_memory_per_block": 49152, "registers_per_block": 65536}
    if arch == current:
        attrs["l2_cache_size_bytes"] = int(torch.cuda.get_device_properties().L2_cache_size)
    return tvm.target.Target(attrs, host=host_cpu_target())


def resolve_target(target: Union[None, str, Dict[str, Any], tvm.target.Target],
                   device: str) -> tvm.target.Target:
    """Turn the ``target`` option into a Target (default: from ``device``)."""
    if target is None:
        return cuda_target() if device.startswith("cuda") else host_cpu_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target in ("llvm", "cpu"):
            return host_cpu_target()
        if target == "cuda":
            return cuda_target()
        return tvm.target.Target(target)  # a kind ("c") or a tag ("nvidia/nvidia-a100")
    return tvm.target.Target(target)


def is_cuda(target: tvm.target.Target) -> bool:
    """Whether the target generates CUDA kernels."""
    return target.kind.name == "cuda"


#: Blocks with fewer iterations than this run single-threaded (a parallel launch costs more).
PARALLEL_MIN_ITERATIONS = 16384

#: Outer iterations a parallel loop is given (enough for any core count to balance).
PARALLEL_CHUNKS = 256


class ParallelVectorizeFallback(ScheduleRule):
    """Default CPU schedule for functions no other rule took.

    Elementwise producers are inlined into their consumers; in every remaining block the
    leading spatial loops are fused and parallelised (when the block is big enough to pay for
    a parallel launch) and, in purely spatial blocks, the innermost loop is vectorised.
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for info in infos[:-1]:
            if info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # pylint: disable=broad-except
                    pass  # not inlinable (e.g. read with a stride): keep it as its own loop nest
        infos = normalize_prim_func(sch) or []
        lanes = max(llvm_get_vector_width(target) // 32, 4)
        for info in infos:
            try:
                _parallel_vectorize(sch, info, lanes)
            except Exception:  # pylint: disable=broad-except
                logger.debug("fallback schedule skipped block %s", info.name, exc_info=True)
        return sch


def _parallel_vectorize(sch: s_tir.Schedule, info, lanes: int) -> None:
    kinds = info.dom_kind()
    leading = len(kinds) - len(kinds.lstrip("S"))
    loops = sch.get_loops(info.block_rv)
    if leading == 0 or not loops or len(loops) != len(kinds):
        return
    extents = [get_extent(sch, loop) for loop in loops]
    static = all(isinstance(e, int) for e in extents)
    total = 1
    for e in extents:
        total *= e if isinstance(e, int) else PARALLEL_MIN_ITERATIONS
    pure_spatial = leading == len(loops)
    # A vector loop with a masked tail is fast only inside one fused loop (measured).
    nested = not (pure_spatial and isinstance(extents[-1], int) and extents[-1] >= lanes
                  and extents[-1] % lanes)
    if pure_spatial:
        inner = loops[-1]
        if isinstance(extents[-1], int) and extents[-1] >= lanes:
            inner_outer, vec = sch.split(inner, factors=[None, lanes])
            sch.vectorize(vec)
            loops = loops[:-1] + [inner_outer]
    if total >= PARALLEL_MIN_ITERATIONS or not static:
        # Fuse only the outer loops that give the thread pool enough chunks: the loops
        # inside stay nested, so their index arithmetic is not recomputed (with divisions
        # and remainders of the fused index) on every iteration (transposes run 2-3x faster).
        count, chunks = 0, 1
        while count < leading and (chunks < PARALLEL_CHUNKS or not nested):
            extent = extents[count]
            chunks *= extent if isinstance(extent, int) else PARALLEL_CHUNKS
            count += 1
        outer = sch.fuse(*loops[:count]) if count > 1 else loops[0]
        sch.parallel(outer)


def cpu_schedule_pass() -> tvm.transform.Pass:
    """dlight's CPU rules, then the fallback, for every unscheduled TIR function."""
    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction(), ParallelVectorizeFallback())


def default_schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """The default schedules for ``target``'s TIR functions: dlight's GPU rules for CUDA, else
    :func:`cpu_schedule_pass`."""
    if is_cuda(target):
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return cpu_schedule_pass()


def build_pipeline(target: tvm.target.Target, database=None) -> tvm.transform.Pass:
    """The Relax-to-VM pipeline for ``target``.

    Parameters
    ----------
    target : tvm.target.Target
        CPU (llvm) or CUDA.
    database : tvm.s_tir.meta_schedule.Database, optional
        Tuning records to apply to the kernels before default schedules.
    """
    backend = relax.backend.cuda.pipeline if is_cuda(target) else relax.backend.cpu_generic.pipeline
    schedule = [default_schedule_pass(target)]
    tuned = [relax.transform.MetaScheduleApplyDatabase()] if database is not None else []

    @tvm.transform.module_pass(opt_level=0, name="TvmTorchBuildPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target)
                # The generic legalization (the CUDA one applies dlight inside it, before
                # tuning records could be applied).
                + relax.backend.cpu_generic.pipeline.legalize_passes(target)
                + tuned
                + schedule
                + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target))
            if database is not None:
                with database:
                    return seq(mod)
            return seq(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> relax.Executable:
    """Compile a prepared Relax module (see :mod:`tvm.contrib.torch.passes`) for ``target``."""
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target, database))
