"""MetaSchedule tuning: records written to the log, re-used by a second compile."""
from __future__ import annotations

import os

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
