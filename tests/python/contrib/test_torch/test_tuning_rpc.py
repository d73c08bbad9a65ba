"""Tuning through TVM's RPC tracker: a tracker and RPC servers started here on localhost.

The measurements run on the servers (seen in their logs), a second compile measures nothing,
an unreachable tracker or a key without servers fails fast, and a tracker killed mid-tuning
ends the run with an error and a tuning log that still loads.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from tvm import rpc

from tvm.contrib.torch import PyTorchTVMModule, TuningError, compile
from tvm.contrib.torch import tuning, tuning_db
from tvm.contrib.torch.options import TuningRPC, parse_options

# The tracker needs tornado (the test extra installs it); clients and servers do not.
pytest.importorskip("tornado", reason="python -m tvm.exec.rpc_tracker needs tornado")

KEY = "tvm-torch-test"
#: Seconds the tracker and servers may take to start (each imports TVM).
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A tracker and ``servers`` RPC servers on localhost, each in its own process group
    (the tracker runs in a child process of its own: killing the group kills both), with
    their output in ``directory``."""

    def __init__(self, directory: str, servers: int):
        self.directory = directory
        self.port = _free_port()
        self.procs = []
        self.logs = []
        self.tracker = self._start("tracker.log", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                                   "--port", str(self.port),
                                                   "--port-end", str(self.port + 1)])
        try:
            self._wait(self._tracker_listens, "the tracker to listen")
            self.server_logs = []
            for index in range(servers):
                port = _free_port()
                name = f"server{index}.log"
                self._start(name, ["tvm.exec.rpc_server", "--tracker", self.address, "--key",
                                   KEY, "--host", "127.0.0.1", "--port", str(port),
                                   "--port-end", str(port + 1)])
                self.server_logs.append(os.path.join(directory, name))
            self._wait(lambda: self._servers() == servers, f"{servers} server(s) to register")
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, log_name: str, args) -> subprocess.Popen:
        log = open(os.path.join(self.directory, log_name), "w", encoding="utf-8")
        self.logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m"] + args, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args} exited ({proc.returncode}) while waiting "
                                       f"for {what}; see {self.directory}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; see {self.directory}")
            time.sleep(0.2)

    def _tracker_listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _servers(self) -> int:
        summary = rpc.connect_tracker("127.0.0.1", self.port).summary()
        return int(summary["queue_info"].get(KEY, {}).get("free", 0))

    def measurements(self):
        """Modules each server loaded to measure (its log's ``load_module`` lines)."""
        counts = []
        for path in self.server_logs:
            with open(path, encoding="utf-8") as f:
                counts.append(f.read().count("load_module"))
        return counts

    def kill_tracker(self) -> None:
        os.killpg(self.tracker.pid, signal.SIGKILL)
        self.tracker.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tracker with two servers under :data:`KEY`, shared by this module's tests."""
    started = Cluster(str(tmp_path_factory.mktemp("rpc_cluster")), servers=2)
    yield started
    started.close()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()).eval()


def _option(tmp_path, log: str, tracker: str, key: str = KEY, **rpc_extra):
    return {"input_infos": [("x", (4, 32))], "export_dir": str(tmp_path / "export"),
            "tuning_n_trials": 4, "tuning_log_file": log,
            "tuning_rpc": {"tracker": tracker, "key": key, **rpc_extra},
            "tuning_builders": 2,
            "vendor_kernels": False}  # leave the matmul to TVM so that there is a kernel


def _records(log: str):
    with open(log, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_tuning_measures_on_both_servers_and_a_second_compile_measures_nothing(
        cluster, tmp_path, caplog):
    model = _model()
    x = torch.randn(4, 32)
    log = str(tmp_path / "db" / "tuning.log")
    option = _option(tmp_path, log, cluster.address, workers=2, timeout_s=60)
    with caplog.at_level(logging.INFO, logger="tvm.contrib.torch.tuning"):
        tuned = compile(model, option)
    torch.testing.assert_close(tuned([x])[0], model(x), rtol=1e-4, atol=1e-4)
    records = _records(log)
    assert len(records) == 4, records
    loads = cluster.measurements()
    assert all(n >= 1 for n in loads), f"measurements per server {loads}; see {cluster.directory}"
    assert sum(loads) >= 4
    assert "4 trial(s) (0 failed) measured on the RPC servers under key " \
           f"'{KEY}' of the tracker at {cluster.address}" in caplog.text

    caplog.clear()
    with open(log, encoding="utf-8") as f:
        before = f.read()
    with caplog.at_level(logging.INFO, logger="tvm.contrib.torch.tuning"):
        again = compile(model, option)
    with open(log, encoding="utf-8") as f:
        assert f.read() == before
    assert cluster.measurements() == loads  # nothing was sent to the servers
    assert "0 kernel(s) tuned (1 taken from the log), 0 trial(s)" in caplog.text
    torch.testing.assert_close(again([x])[0], model(x), rtol=1e-4, atol=1e-4)


def test_unreachable_tracker_fails_fast(tmp_path):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TuningError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port} "
                                          r"\(ConnectionRefusedError"):
        compile(_model(), _option(tmp_path, str(tmp_path / "tuning.log"), f"127.0.0.1:{port}"))
    assert time.monotonic() - started < 30  # conversion included; TVM's client retries 60 s
    assert not os.path.exists(tmp_path / "tuning.log") or not _records(str(tmp_path / "tuning.log"))


def test_optimize_torch_takes_tuning_rpc(tmp_path):
    """optimize_torch passes tuning_rpc through (an unreachable tracker fails fast), and
    rejects it next to a runner of its own."""
    from tvm.contrib.torch import optimize_torch

    port = _free_port()
    x = torch.rand(4, 16)
    with pytest.raises(TuningError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port}"):
        optimize_torch(lambda t: (t * 2 + 1).clamp(0, 1), x, max_trials_global=4,
                       work_dir=str(tmp_path), tuning_rpc={"tracker": f"127.0.0.1:{port}",
                                                           "key": KEY})
    with pytest.raises(ValueError, match="give either a runner or tuning_rpc"):
        optimize_torch(lambda t: t * 2, x, max_trials_global=4, runner=object(),
                       tuning_rpc={"tracker": f"127.0.0.1:{port}", "key": KEY})


def test_key_without_servers_fails_with_the_queue_status(cluster, tmp_path):
    option = _option(tmp_path, str(tmp_path / "tuning.log"), cluster.address, key="nobody")
    with pytest.raises(TuningError) as info:
        compile(_model(), option)
    text = str(info.value)
    assert f"the RPC tracker at {cluster.address} has no free server for key 'nobody'" in text
    assert "no server registered under key 'nobody'" in text
    assert "Queue Status" in text and KEY in text  # the tracker's own status table


def test_busy_servers_are_waited_for_then_fail_with_the_queue_status(cluster):
    from tvm.contrib.torch import tuning_rpc

    config = TuningRPC("127.0.0.1", cluster.port, KEY, timeout_s=2)
    tracker = rpc.connect_tracker("127.0.0.1", cluster.port)
    sessions = [tracker.request(KEY, session_timeout=60) for _ in range(2)]  # both servers
    started = time.monotonic()
    busy = rf"(?s)all 2 server\(s\) under key '{KEY}' stayed busy for 2 s .*Queue Status"
    with pytest.raises(TuningError, match=busy):
        tuning_rpc.check_tracker(config)
    assert time.monotonic() - started < 10
    del sessions  # closes them: the servers register as free again
    status = tuning_rpc.check_tracker(TuningRPC("127.0.0.1", cluster.port, KEY, timeout_s=30))
    assert status.servers == 2 and status.free >= 1


def test_tracker_killed_mid_tuning_ends_with_an_error_and_a_valid_log(tmp_path):
    log = str(tmp_path / "db" / "tuning.log")
    lost = Cluster(str(tmp_path), servers=1)
    try:
        ptm = PyTorchTVMModule(vendor_kernels=False)
        ptm.from_pytorch(_model(), [("x", (4, 32))])

        def kill_after_first_batch():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if os.path.exists(log) and os.path.getsize(log) > 0:
                    lost.kill_tracker()
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_after_first_batch, daemon=True)
        killer.start()
        started = time.monotonic()
        expected = (rf"the RPC tracker at {lost.address} became unreachable during tuning "
                    r"\(ConnectionRefusedError: .*\) after 4 trial\(s\), 2 measured\. The "
                    r"records measured before are in ")
        with pytest.raises(TuningError, match=expected):
            ptm.tune_tvm(log, 6, tuning.TuneSettings(num_trials_per_iter=2),
                         rpc={"tracker": lost.address, "key": KEY, "workers": 2,
                              "timeout_s": 5})
        assert time.monotonic() - started < 240
        killer.join(timeout=5)
        assert lost.tracker.poll() is not None
    finally:
        lost.close()
    # The records measured before the loss are in a log that still loads; the failed
    # candidates are recorded too, at MetaSchedule's 1e10 s (so that none is measured again).
    records = _records(log)
    seconds = [record[1][1][0] for record in records]
    assert len(records) == 4
    assert sum(s < 1 for s in seconds) == 2 and sum(s == 1e10 for s in seconds) == 2
    database = tuning.open_database(log)
    all_records = database.get_all_tuning_records()
    assert len(all_records) == 4
    assert len(database.get_top_k(all_records[0].workload, 10)) == 2
    (entry,) = tuning_db.summarize(log)
    assert entry.records == 4
    assert entry.best_us == pytest.approx(1e6 * min(seconds))


@pytest.mark.parametrize("value, message", [
    (0, "tuning_builders must be an int >= 1, got 0"),
    (True, "tuning_builders must be an int >= 1, got True"),
    ("4", "tuning_builders must be an int >= 1, got '4'"),
])
def test_tuning_builders_rejects_non_positive_ints(value, message):
    with pytest.raises(ValueError, match=message):
        parse_options({"input_infos": [("x", (1,))], "tuning_builders": value})


def test_tuning_builders_and_rpc_parse_into_typed_options():
    opts = parse_options({"input_infos": [("x", (1,))], "tuning_builders": 3,
                          "tuning_rpc": {"tracker": "tuner.local:9190", "key": "xeon",
                                         "workers": 4, "timeout_s": 30}})
    assert opts.tuning_builders == 3
    assert opts.tuning_rpc == TuningRPC("tuner.local", 9190, "xeon", 4, 30.0)
    assert opts.tuning_rpc.tracker == "tuner.local:9190"
    default = parse_options({"input_infos": [("x", (1,))]})
    assert default.tuning_rpc is None and default.tuning_builders is None


@pytest.mark.parametrize("rpc_value, message", [
    ({"tracker": "localhost", "key": "k"},
     r"""tuning_rpc\['tracker'\] must be "host:port" with a port in 1..65535, got 'localhost'"""),
    ({"tracker": "h:70000", "key": "k"}, r"got 'h:70000'"),
    ({"tracker": "h:9190"}, r"missing \['key'\]"),
    ({"tracker": "h:9190", "key": "k", "worker": 2}, r"unknown key\(s\) \['worker'\]"),
    ({"tracker": "h:9190", "key": ""}, r"tuning_rpc\['key'\] must be the non-empty key"),
    ({"tracker": "h:9190", "key": "k", "workers": 0},
     r"tuning_rpc\['workers'\] must be an int >= 1, got 0"),
    ({"tracker": "h:9190", "key": "k", "timeout_s": 0},
     r"tuning_rpc\['timeout_s'\] must be a number of seconds > 0, got 0"),
    ("h:9190", r"tuning_rpc must be a dict .* got str 'h:9190'"),
])
def test_tuning_rpc_rejects_bad_values(rpc_value, message):
    with pytest.raises(ValueError, match=message):
        parse_options({"input_infos": [("x", (1,))], "tuning_rpc": rpc_value})


def test_tuning_settings_reject_runner_and_rpc_together():
    with pytest.raises(ValueError, match="give either a runner or tuning_rpc"):
        tuning.TuneSettings(runner=object(), rpc=TuningRPC("h", 1, "k"))
    with pytest.raises(ValueError, match="give either a builder or tuning_builders"):
        tuning.TuneSettings(builder=object(), builders=2)
