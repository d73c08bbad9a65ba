"""The exceptions the package raises for a model it cannot take and for tuning that cannot go on."""
from __future__ import annotations


class ConversionError(RuntimeError):
    """A model could not be converted or compiled; the message names the operators and places.

    Errors raised by TVM's importer, passes or build are re-raised as this type with the
    original exception attached as ``__cause__``.
    """


class TuningError(RuntimeError):
    """Tuning could not go on: the message names the RPC tracker (``host:port``), the key and
    the cause.

    Raised before tuning when the tracker is unreachable or has no free server for the key
    (the message then holds the tracker's queue status), and during tuning when the tracker
    became unreachable or every measurement of a batch failed on the servers. Records measured
    before the failure stay in the tuning log.
    """


__all__ = ["ConversionError", "TuningError"]
