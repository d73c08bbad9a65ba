"""The dtypes the package compiles, in one place (options, partitioning and contract tests)."""
from __future__ import annotations

#: Tensor dtypes TVM programs take and return (``input_infos`` dtypes; tensors a partitioned
#: subgraph may read or compute).
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32",
                    "int64", "uint8", "bool")

#: Dtypes a model may compute in (the ``default_dtype`` option); floating inputs and outputs
#: take this dtype.
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")

__all__ = ["COMPUTE_DTYPES", "SUPPORTED_DTYPES"]
