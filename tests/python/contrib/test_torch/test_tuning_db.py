"""Tuning logs: listing what they hold and merging them (tuning_db.py and the CLI)."""
from __future__ import annotations

import pytest
import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms

from tvm.contrib.torch import cli, tuning_db
from tvm.contrib.torch.tuning import open_database

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _kernel(name: str, n: int) -> tvm.IRModule:
    a = te.placeholder((n,), name="A")
    b = te.compute((n,), lambda i: a[i] + 1.0, name="B")
    return tvm.IRModule({"main": te.create_prim_func([a, b]).with_attr("global_symbol", name)})


def _write(log: str, records) -> None:
    """Real MetaSchedule records (the kernel's schedule trace) with the given timings."""
    database = open_database(log)
    for mod, seconds in records:
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            tvm.s_tir.Schedule(mod).trace, workload, seconds, TARGET,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


@pytest.fixture
def logs(tmp_path):
    a, b = str(tmp_path / "a.log"), str(tmp_path / "b.log")
    _write(a, [(_kernel("add_one", 8), [2e-6, 2e-6]), (_kernel("add_one", 8), [1e-6])])
    _write(b, [(_kernel("add_two", 16), [3e-6]), (_kernel("add_one", 8), [1e-6])])
    return a, b


def test_summary_groups_records_per_kernel_with_the_best_time(logs):
    rows = tuning_db.summarize(logs[0])
    assert [(r.kernel, r.records, r.target) for r in rows] == [("add_one", 2, "llvm -mcpu=x86-64")]
    assert rows[0].best_us == pytest.approx(1.0)


def test_merge_adds_each_record_once(logs, tmp_path):
    merged = str(tmp_path / "merged.log")
    # b's add_one record is the same schedule, timing and target as one of a's: not added.
    assert tuning_db.merge(logs, merged) == 3
    assert tuning_db.merge(logs, merged) == 0
    rows = {r.kernel: r for r in tuning_db.summarize(merged)}
    assert set(rows) == {"add_one", "add_two"}
    assert rows["add_one"].records == 2 and rows["add_two"].best_us == pytest.approx(3.0)
    # The merged log is a database the tuner reads: it has both workloads.
    database = open_database(merged)
    assert database.has_workload(_kernel("add_two", 16))


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tuning log at .*nothing\.log"):
        tuning_db.summarize(str(tmp_path / "nothing.log"))


def test_tuning_db_command(logs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tuning-db", "merge", *logs, "-o", "merged.log"]) == 0
    assert "3 record(s) added" in capsys.readouterr().out
    assert cli.main(["tuning-db", "list", "merged.log"]) == 0
    out = capsys.readouterr().out
    assert "2 kernel(s), 3 record(s)" in out and "add_two (llvm -mcpu=x86-64)" in out
    assert cli.main(["tuning-db", "merge", *logs]) == 2
    assert "tuning-db merge takes -o MERGED" in capsys.readouterr().err
    assert cli.main(["tuning-db", "list", "missing.log"]) == 2
    assert "no tuning log at missing.log" in capsys.readouterr().err
