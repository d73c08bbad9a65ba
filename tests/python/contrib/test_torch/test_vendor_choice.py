"""``tuning_compare_vendor``: tuned TVM kernels raced against oneDNN per CPU convolution, the
times recorded next to the tuning log and the choices applied by later compiles."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tvm.contrib.torch import (PyTorchTVMModule, build, compile, passes, profile, tuning,
                               vendor_choice)
from tvm.contrib.torch.options import TuningRPC
from tvm.contrib.torch.vendor_kernels import offload_pass

SHAPE = (1, 8, 16, 16)


class _Block(torch.nn.Module):
    """A depthwise convolution with hardswish, then a 1x1 one with a residual add and ReLU."""

    def __init__(self):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.nn.functional.hardswish(self.depthwise(x))
        return torch.relu(self.pointwise(y) + x)


def _model():
    torch.manual_seed(0)
    return _Block().eval()


def _offloaded(tvm_wins=None):
    """The model's main after the offload, and the convolution sites put on oneDNN."""
    ptm = PyTorchTVMModule()
    ptm.from_pytorch(torch.jit.trace(_model(), torch.randn(SHAPE)), [("x", SHAPE)])
    bucket, sites = ptm.buckets[0], []
    mod = passes.prepare_for_build(bucket.mod, bucket.params, [list(SHAPE)], "float32",
                                   [offload_pass(tvm_wins=tvm_wins, sites=sites)])[0]
    return mod["main"].script(), sites


def _onednn_convs(text: str) -> int:
    return text.count('"tvm_torch.conv2d_nhwc"') + text.count('"tvm_torch.conv2d_add_nhwc"')


def test_kept_convolution_stays_tvm_code():
    text, sites = _offloaded()
    assert [s.key for s in sites] == [
        "conv2d x=1,16,16,8:float32 w=8,1,3,3 s=1,1 p=1,1,1,1 d=1,1 g=8 float32",
        "conv2d x=1,16,16,8:float32 w=8,8,1,1 s=1,1 p=0,0,0,0 d=1,1 g=1 float32"]
    # Each site is its chain as the model has it (hardswish: torch's two clamps), on fresh
    # inputs (the residual one on two).
    assert [len(s.inputs) for s in sites] == [1, 2]
    alone = [vendor_choice._module([site])[0]["main"].script() for site in sites]
    assert "R.nn.conv2d" in alone[0] and alone[0].count("R.clip(") == 2, alone[0]
    assert "R.nn.relu" in alone[1] and alone[1].count("R.add(") == 2, alone[1]
    assert _onednn_convs(text) == 2 and "R.nn.conv2d" not in text
    text, again = _offloaded(tvm_wins={sites[0].variant: True, sites[1].variant: False})
    assert _onednn_convs(text) == 1 and text.count("R.nn.conv2d(") == 1
    assert [s.variant for s in again] == [s.variant for s in sites]
    # A chain without a race keeps oneDNN (it has no tuned kernel).
    text, _ = _offloaded(tvm_wins={sites[0].key + " | another chain": True})
    assert _onednn_convs(text) == 2


def _conv_calls(module, x) -> float:
    """oneDNN convolution calls per model call, from the kernel profile."""
    report = profile(module, [x], repeat=2, warmup=1)
    return sum(row.calls for row in report.rows
               if row.name in ("tvm_torch.conv2d_nhwc_out", "tvm_torch.conv2d_nchw_input_out",
                               "tvm_torch.conv2d_add_nhwc_out"))


def test_race_is_recorded_and_its_choices_applied(tmp_path):
    model, x = _model(), torch.randn(SHAPE)
    log = str(tmp_path / "tuning.log")
    option = {"input_infos": [("x", SHAPE)], "export_dir": str(tmp_path / "e"),
              "tuning_log_file": log, "tuning_n_trials": 2, "tuning_compare_vendor": True}
    tuned = compile(model, option)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(tuned([x])[0], expected, rtol=1e-4, atol=1e-4)
    path = vendor_choice.record_path(log)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    races = vendor_choice.load(log, build.host_cpu_target())
    _, sites = _offloaded()
    assert sorted(races) == sorted(s.variant for s in sites)
    assert all(0 < r.vendor_us < 1e5 and 0 < r.tvm_us < 1e5 for r in races.values()), races

    # Tuning again with the log measures nothing new.
    stamp = os.stat(path).st_mtime_ns
    compile(model, option)
    assert os.stat(path).st_mtime_ns == stamp

    # A compile with the log applies the recorded choices: here the depthwise convolution's
    # TVM kernel is made the winner and the 1x1's the loser.
    depthwise, pointwise = sites[0].variant, sites[1].variant
    entries = next(iter(record["targets"].values()))
    entries[depthwise] = {"vendor_us": 100.0, "tvm_us": 10.0}
    entries[pointwise] = {"vendor_us": 10.0, "tvm_us": 100.0}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)
    applied = compile(model, dict(option, tuning_n_trials=0, tuning_compare_vendor=False))
    torch.testing.assert_close(applied([x])[0], expected, rtol=1e-4, atol=1e-4)
    assert _conv_calls(applied, x) == 1
    # Without the log, both are oneDNN's.
    plain = compile(model, {"input_infos": [("x", SHAPE)], "export_dir": str(tmp_path / "p")})
    assert _conv_calls(plain, x) == 2


def test_foreign_record_file_is_refused(tmp_path):
    log = str(tmp_path / "tuning.log")
    for path, text in ((log, ""), (log + ".workloads", ""),
                       (vendor_choice.record_path(log), '{"something": "else"}')):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with pytest.raises(ValueError, match=r"tuning.log.vendor.json is not a vendor-kernel race "
                                         r"record \(ValueError: format None, expected 1\)"):
        compile(_model(), {"input_infos": [("x", SHAPE)], "export_dir": str(tmp_path / "e"),
                           "tuning_log_file": log})


def test_race_runs_on_this_cpu(tmp_path):
    with pytest.raises(ValueError, match="races CPU convolutions against oneDNN; the target "
                                         "is CUDA"):
        vendor_choice.race([], build.cuda_target("sm_80"), str(tmp_path / "t.log"), 4)
    rpc = TuningRPC(host="127.0.0.1", port=9190, key="k")
    with pytest.raises(ValueError, match="times both kernels on this machine; with tuning_rpc"):
        vendor_choice.race([], build.host_cpu_target(), str(tmp_path / "t.log"), 4,
                           tuning.TuneSettings(rpc=rpc))
