"""The default CPU schedule (build.ParallelVectorizeFallback) of TVM's own kernels."""
from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from tvm.contrib.torch import build
from conftest import scheduled_kernels


def _window_partition() -> tvm.IRModule:
    """Swin's window partition: [1, 56, 56, 96] -> [64, 7, 7, 96], one fused TVM kernel."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 56, 56, 96], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.reshape(x, [1, 8, 7, 8, 7, 96]))
            t = bb.emit(relax.op.permute_dims(r, [0, 1, 3, 2, 4, 5]))
            out = bb.emit_output(relax.op.reshape(t, [64, 7, 7, 96]))
        bb.emit_func_output(out)
    return bb.get()


def test_transpose_keeps_inner_loops_nested_and_matches_torch():
    """Only the outer loops that give the thread pool enough chunks are fused into the
    parallel loop: fusing them all recomputes every index with divisions per vector."""
    target = build.host_cpu_target()
    kernels = [f.script() for f in scheduled_kernels(_window_partition(), target)]
    assert len(kernels) == 1
    assert "T.parallel(T.int64(448))" in kernels[0]  # 64 windows x 7 rows; 7 x 96 inside
    assert "T.vectorized(" in kernels[0]  # the channels, by the CPU's vector width

    executable = tvm.compile(_window_partition(), target=target,
                             relax_pipeline=build.build_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = torch.randn(1, 56, 56, 96)
    actual = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    expected = x.reshape(1, 8, 7, 8, 7, 96).permute(0, 1, 3, 2, 4, 5).reshape(64, 7, 7, 96)
    np.testing.assert_array_equal(actual, expected.numpy())
