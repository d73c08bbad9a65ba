"""Port of TVM 0.19's apps/pt_tvmdsoop/tests/test_boolean_tensor.py (bool tensors through
``optimize_torch`` and ``as_torch``).

Changes from upstream, each forced by TVM 0.27 or this project:

* ``optimize_torch`` calls pass ``max_trials_global`` (a required keyword in upstream's own
  signature, which its test omitted); ``0`` builds with the default schedules (tuning is
  tested in test_optimize_torch.py).
* ``torch.load(..., weights_only=False)``: torch >= 2.6 loads only tensors by default.
* TVMScript: ``tirx`` for ``tir``, ``T.sblock`` for ``T.block`` (with
  ``@T.prim_func(s_tir=True)``).
"""
import tempfile

import torch

import tvm
import tvm.testing
from tvm.contrib.torch import as_torch, optimize_torch
from tvm.script import tirx as T  # upstream: from tvm.script import tir as T


def negate(x):
    return x.logical_not()


def sum_up_tensor(x):
    return x.size(dim=0) - torch.sum(x.int())


def tensor_boolean_operation(x):
    arr1 = (x + 0.3).floor().bool()
    arr2 = (~((x + 0.7).int().bool())).bool()
    ret = ((arr1 & arr2).byte() + 0.5).half()
    return ~(ret.bool())


def test_bool_tensor_negate():
    input = torch.ones(1, dtype=torch.bool)
    optimized_negate = optimize_torch(
        negate,
        input,
        max_trials_global=0,
    )
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        torch.save(optimized_negate, tmp.name)
        loaded_mod = torch.load(tmp.name, weights_only=False)
        output = loaded_mod(negate(input))
    tvm.testing.assert_allclose(input.numpy(), output.numpy(), atol=1e-5, rtol=1e-5)


def test_sum_up_tensor():
    x = torch.randint(0, 2, (16,))
    y = x.bool()
    optimized_func = optimize_torch(
        sum_up_tensor,
        (y,),
        max_trials_global=0,
    )
    ret1 = (x[x == 0]).size(dim=0)
    ret2 = optimized_func(y).numpy()
    tvm.testing.assert_allclose(ret1, ret2, atol=1e-5, rtol=1e-5)


def test_tensor_boolean_operation():
    input = torch.rand(200)
    model = optimize_torch(
        tensor_boolean_operation,
        input,
        max_trials_global=0,
    )
    ret1 = tensor_boolean_operation(input)
    ret2 = model(input)
    tvm.testing.assert_allclose(ret1, ret2, atol=1e-5, rtol=1e-5)


@as_torch
@T.prim_func(s_tir=True)
def negate_tvmscript(
    X: T.Buffer((8, 8), "bool"),
    Y: T.Buffer((8, 8), "float32"),
    Z: T.Buffer((8, 8), "bool"),
    U: T.Buffer((8, 8), "float32"),
) -> None:
    for i, j in T.grid(8, 8):
        with T.sblock():
            if Y[i, j] > 0.0:
                Z[i, j] = X[i, j]
                U[i, j] = Y[i, j]
            else:
                Z[i, j] = not X[i, j]
                U[i, j] = 0.0 - Y[i, j]


def negate_vanila(x, y):
    z = torch.zeros(8, 8).bool()
    for i in range(8):
        for j in range(8):
            if y[i, j] > 0:
                z[i, j] = x[i, j]
            else:
                z[i, j] = ~x[i, j]
    return z


def test_tvmscript_torch_decorator():
    q1 = (torch.rand(8, 8) + 0.5).int().bool()
    q2 = torch.rand(8, 8) - 0.5
    q3 = torch.zeros(8, 8).bool()
    q4 = torch.zeros(8, 8)

    std1 = negate_vanila(q1, q2)
    std2 = torch.abs(q2)

    negate_tvmscript(q1, q2, q3, q4)

    tvm.testing.assert_allclose(std1.numpy(), q3.numpy(), atol=1e-5, rtol=1e-5)
    tvm.testing.assert_allclose(std2.numpy(), q4.numpy(), atol=1e-5, rtol=1e-5)


# ---- This project's own checks (not in upstream) ----


def test_bool_outputs_keep_their_dtype_and_script():
    """Bool in, bool out through the runtime class (DLPack kDLBool both ways), scripted too."""
    def masks(x, m):
        return x > 0.5, m & (x < 0.9)

    x, m = torch.rand(6, 5), torch.rand(6, 5) > 0.3
    module = optimize_torch(masks, (x, m), max_trials_global=0)
    for runner in (module, torch.jit.script(module)):
        got = runner(x, m)
        assert [t.dtype for t in got] == [torch.bool, torch.bool]
        torch.testing.assert_close(got[0], x > 0.5)
        torch.testing.assert_close(got[1], m & (x < 0.9))
