"""The exception every step of the compile pipeline raises for a model it cannot take."""
from __future__ import annotations


class ConversionError(RuntimeError):
    """A model could not be converted or compiled; the message names the operators and places.

    Errors raised by TVM's importer, passes or build are re-raised as this type with the
    original exception attached as ``__cause__``.
    """


__all__ = ["ConversionError"]
