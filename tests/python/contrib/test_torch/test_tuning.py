"""MetaSchedule tuning: records written to the log, re-used by a second compile."""
from __future__ import annotations

import os

import pytest
import torch

from tvm.contrib.torch import compile


def test_tuning_writes_log_and_second_compile_reuses_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()).eval()
    x = torch.randn(4, 32)
    log = str(tmp_path / "tuning.log")
    option = {"input_infos": [("x", (4, 32))], "export_dir": str(tmp_path / "export"),
              "tuning_n_trials": 2, "tuning_log_file": log,
              "vendor_kernels": False}  # leave the matmul to TVM so that there is a kernel
    tuned = compile(model, option)
    torch.testing.assert_close(tuned([x])[0], model(x), rtol=1e-4, atol=1e-4)
    with open(log, encoding="utf-8") as f:
        records = f.read()
    assert records.strip(), "no tuning record was written"
    assert os.path.exists(log + ".workloads")
    stamp = os.stat(log).st_mtime_ns

    again = compile(model, option)  # every kernel has a record: nothing new is measured
    assert os.stat(log).st_mtime_ns == stamp
    with open(log, encoding="utf-8") as f:
        assert f.read() == records
    torch.testing.assert_close(again([x])[0], model(x), rtol=1e-4, atol=1e-4)


def test_meta_schedule_logging_tolerates_foreign_handlers(tmp_path):
    """TVM 0.27's MetaSchedule fails to configure its logger when a handler it did not make
    is on it (pytest's capture, an application's); tuning detaches them for the call."""
    import logging

    import pytest
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from tvm.contrib.torch.tuning import meta_schedule_logging

    log = logging.getLogger("tvm.s_tir.meta_schedule")
    mine = logging.NullHandler()
    log.addHandler(mine)
    try:
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'format'"):
            get_loggers_from_work_dir(str(tmp_path / "a"), ["main"])  # TVM's own behaviour
        with meta_schedule_logging():
            assert mine not in log.handlers
            get_loggers_from_work_dir(str(tmp_path / "b"), ["main"])
        assert mine in log.handlers
    finally:
        log.removeHandler(mine)


def test_a_kernel_tuned_for_one_model_is_reused_by_another(tmp_path):
    """The log is shared across models: a second model with the same layer (same workload,
    same target) measures only its own new kernel."""
    from tvm.contrib.torch import PyTorchTVMModule

    torch.manual_seed(0)
    shared = torch.nn.Linear(32, 32)
    first = torch.nn.Sequential(shared, torch.nn.ReLU()).eval()
    second = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    log = str(tmp_path / "shared.log")

    def tune(model):
        ptm = PyTorchTVMModule()
        ptm.vendor_kernels = False  # the linear layers are TVM kernels, so there is work
        ptm.from_pytorch(torch.jit.trace(model, torch.randn(4, 32)), [("x", (4, 32))])
        return ptm.tune_tvm(log, n_trial=4)[0]

    first_run = tune(first)
    assert first_run.trials > 0 and first_run.reused == 0
    second_run = tune(second)
    # Its first layer (with the ReLU) is the first model's kernel: found in the log.
    assert second_run.reused >= 1
    assert second_run.trials > 0  # its own last layer was tuned
    tuned_names = {t.name for t in second_run.tasks}
    assert not tuned_names & {t.name for t in first_run.tasks}, tuned_names


def test_heavy_kernels_only_are_tuned_when_asked(tmp_path):
    """``tuning_kernels="heavy"``: a profile of the untuned program picks the kernels to
    tune; a light kernel is left to the default schedule and counted as left untuned."""
    from tvm.contrib.torch import PyTorchTVMModule
    from tvm.contrib.torch.tuning import heavy_kernels

    class HeavyAndLight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Linear(256, 256)

        def forward(self, x, small):
            return torch.relu(self.big(x)), small * 2.0 + 1.0

    torch.manual_seed(0)
    model = HeavyAndLight().eval()
    x, small = torch.randn(256, 256), torch.randn(2, 3)
    ptm = PyTorchTVMModule()
    ptm.vendor_kernels = False  # the linear layer is a TVM kernel: the heavy one
    ptm.from_pytorch(torch.jit.trace(model, (x, small)), [("x", (256, 256)), ("small", (2, 3))])
    profile = ptm._tvm_kernel_times()[0]  # pylint: disable=protected-access
    assert len(profile) >= 2, profile
    heavy = heavy_kernels(profile)
    assert len(heavy) == 1 and "matmul" in heavy[0], profile

    summary = ptm.tune_tvm(str(tmp_path / "t.log"), n_trial=2, kernels="heavy")[0]
    assert [t.name for t in summary.tasks] == heavy
    assert summary.light >= 1 and "light one(s) left untuned" in summary.text()
    with pytest.raises(ValueError, match=r"tuning_kernels must be one of \['all', 'heavy'\]"):
        ptm.tune_tvm(str(tmp_path / "t.log"), n_trial=2, kernels="some")


def test_heavy_kernels_cover_the_share_heaviest_first():
    from tvm.contrib.torch.tuning import heavy_kernels

    assert heavy_kernels({"a": 1.0, "b": 8.0, "c": 1.0}) == ["b", "a"]  # 80% < 90%: one more
    assert heavy_kernels({"a": 1.0, "b": 9.0}) == ["b"]
    assert heavy_kernels({}) == []
