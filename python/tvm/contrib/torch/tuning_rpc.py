"""Measuring tuning candidates on the RPC servers of a TVM tracker (the ``tuning_rpc`` option).

Candidates are built here and measured by MetaSchedule's ``RPCRunner`` on the servers that
registered with the tracker (``python -m tvm.exec.rpc_tracker``; ``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key KEY``) under the option's key. Every wait is
bounded: :func:`check_tracker` asks the tracker before tuning starts and fails within
``timeout_s`` seconds, and :func:`rpc_runner` gives each measurement ``timeout_s`` seconds,
waiting for a free server included (TVM's own client retries a refused tracker for a minute
and waits for a server without limit).
"""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any, Dict, Optional

from tvm import rpc
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor

from .errors import TuningError
from .options import TuningRPC

#: The most seconds a tracker may take to accept a connection before it counts as unreachable.
CONNECT_TIMEOUT_S = 5.0


@dataclasses.dataclass
class TrackerStatus:
    """What the tracker said about the option's key before tuning.

    Attributes
    ----------
    servers : int
        Servers registered under the key.
    free : int
        Of those, the ones not serving a session.
    pending : int
        Requests for the key waiting in the tracker's queue.
    text : str
        The tracker's whole queue status, as ``python -m tvm.exec.query_rpc_tracker`` prints it.
    """

    servers: int
    free: int
    pending: int
    text: str


def unreachable(config: TuningRPC) -> Optional[str]:
    """Why the tracker does not accept connections (``None`` when it does), within
    :data:`CONNECT_TIMEOUT_S` or ``timeout_s``, whichever is less."""
    try:
        socket.create_connection((config.host, config.port),
                                 timeout=min(CONNECT_TIMEOUT_S, config.timeout_s)).close()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def _ask(config: TuningRPC) -> Dict[str, Any]:
    """The tracker's summary and text summary, or the error, within ``timeout_s``.

    TVM's client has no timeout of its own: it runs in a daemon thread that is left behind
    when the tracker does not answer in time.
    """
    answer: Dict[str, Any] = {}

    def ask() -> None:
        try:
            tracker = rpc.connect_tracker(config.host, config.port)
            try:
                answer["summary"] = tracker.summary()
                answer["text"] = tracker.text_summary()
            finally:
                tracker.close()
        except Exception as err:  # pylint: disable=broad-except
            answer["error"] = err

    thread = threading.Thread(target=ask, name="tvm-torch-tracker-query", daemon=True)
    thread.start()
    thread.join(config.timeout_s)
    if thread.is_alive():
        answer["error"] = TimeoutError(f"no answer in {config.timeout_s:g} s")
    return answer


def _status(config: TuningRPC) -> TrackerStatus:
    """The tracker's status for ``config.key``, within ``timeout_s``."""
    answer = _ask(config)
    if "error" in answer:
        err = answer["error"]
        raise TuningError(f"tvm.contrib.torch tuning: the RPC tracker at {config.tracker} did "
                          f"not answer as a tracker ({type(err).__name__}: {err})")
    summary = answer["summary"]
    servers = sum(1 for item in summary.get("server_info", [])
                  if item.get("key", "").split(":", 1)[-1] == config.key)
    queue = summary.get("queue_info", {}).get(config.key, {})
    return TrackerStatus(servers, int(queue.get("free", 0)), int(queue.get("pending", 0)),
                         answer["text"])


def check_tracker(config: TuningRPC, poll_s: float = 0.5) -> TrackerStatus:
    """Ask the tracker for its servers under ``config.key``; fail unless one is free.

    When servers are registered but all busy (another run measuring), waits up to
    ``timeout_s`` for one to be free.

    Raises
    ------
    TuningError
        When the tracker is unreachable or does not answer in ``timeout_s`` (naming the
        address and the cause), or has no free server for the key (with its queue status).
    """
    cause = unreachable(config)
    if cause is not None:
        raise TuningError(f"tvm.contrib.torch tuning: cannot reach the RPC tracker at "
                          f"{config.tracker} ({cause}); start it with `python -m "
                          f"tvm.exec.rpc_tracker --host HOST --port {config.port}` or fix "
                          "tuning_rpc['tracker']")
    deadline = time.monotonic() + config.timeout_s
    status = _status(config)
    while status.servers and not status.free and time.monotonic() + poll_s < deadline:
        time.sleep(poll_s)
        status = _status(config)
    if status.free == 0:
        why = (f"no server registered under key {config.key!r}" if status.servers == 0 else
               f"all {status.servers} server(s) under key {config.key!r} stayed busy for "
               f"{config.timeout_s:g} s ({status.pending} request(s) pending)")
        raise TuningError(
            f"tvm.contrib.torch tuning: the RPC tracker at {config.tracker} has no free server "
            f"for key {config.key!r}: {why}; start one with `python -m tvm.exec.rpc_server "
            f"--tracker {config.tracker} --key {config.key}`. The tracker's queue status:\n"
            f"{status.text}")
    return status


def rpc_runner(config: TuningRPC, workers: int) -> Any:
    """MetaSchedule's ``RPCRunner`` for the tracker, ``workers`` measurements at once, each
    bounded by ``config.timeout_s`` (the worker measuring it is killed past that).

    Call ``.pool.shutdown()`` when done with it.
    """
    rpc_config = ms.runner.RPCConfig(tracker_host=config.host, tracker_port=config.port,
                                     tracker_key=config.key,
                                     session_timeout_sec=max(1, int(config.timeout_s)))
    runner = ms.runner.RPCRunner(rpc_config=rpc_config, max_workers=workers)
    # TVM 0.27's RPCRunner gives its worker pool no timeout (its futures expect one): a
    # measurement waiting on a lost tracker or a busy server would wait for ever.
    runner.pool.shutdown()
    runner.pool = PopenPoolExecutor(max_workers=workers, timeout=config.timeout_s)
    return runner


def describe(config: TuningRPC) -> str:
    """``"the RPC servers under key K of the tracker at HOST:PORT"``."""
    return f"the RPC servers under key {config.key!r} of the tracker at {config.tracker}"


__all__ = ["CONNECT_TIMEOUT_S", "TrackerStatus", "check_tracker", "describe", "rpc_runner",
           "unreachable"]
