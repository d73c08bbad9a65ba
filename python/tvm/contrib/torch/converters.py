"""Converters of ATen operators that replace those of TVM's importer where it is inexact.

Each function has the signature TVM's ``custom_convert_map`` expects,
``(node, importer) -> relax.Expr``, and is installed for the op overload named in
:data:`CUSTOM_CONVERTERS`.

* ``scaled_dot_product_attention``: TVM's converter rejects boolean masks and drops an explicit
  ``scale``. Here a boolean mask becomes an additive one (0 / -inf), masks of any rank
  broadcast to ``(B, H, L, S)``, ``scale`` and ``is_causal`` are kept, grouped-query attention
  (``enable_gqa``) repeats key/value heads, and rows that a boolean mask masks entirely give
  0, as PyTorch does (its softmax over no keys would be NaN).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import tvm
import tvm_ffi
from tvm import relax

from .errors import ConversionError


def _arg(node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(expr: relax.Expr) -> int:
    return len(expr.ty.shape.values)


def scaled_dot_product_attention(node, importer) -> relax.Expr:
    """``aten.scaled_dot_product_attention`` as ``relax.nn.attention``."""
    emit = importer.block_builder.emit
    query, key, value = (importer.env[a] for a in node.args[:3])
    mask_node = _arg(node, 3, "attn_mask", None)
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = bool(_arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    enable_gqa = bool(node.kwargs.get("enable_gqa", False))
    if dropout_p:
        raise ConversionError(
            f"tvm.contrib.torch: scaled_dot_product_attention with dropout_p={dropout_p} is "
            "random; compile the model in eval mode (model.eval()) or with dropout_p=0")
    rank = _rank(query)
    if rank not in (3, 4) or _rank(key) != rank or _rank(value) != rank:
        raise ConversionError(
            "tvm.contrib.torch: scaled_dot_product_attention takes (B, H, L, E) or (B, L, E) "
            f"query/key/value, got ranks {_rank(query)}, {_rank(key)}, {_rank(value)}")
    if rank == 3:
        query, key, value = (emit(relax.op.expand_dims(t, 1)) for t in (query, key, value))
    heads_q = query.ty.shape.values[1]
    heads_kv = key.ty.shape.values[1]
    if enable_gqa and not tvm_ffi.structural_equal(heads_q, heads_kv):
        if not isinstance(heads_q, tvm.tirx.IntImm) or not isinstance(heads_kv, tvm.tirx.IntImm):
            raise ConversionError("tvm.contrib.torch: scaled_dot_product_attention with "
                                  "enable_gqa needs static head counts")
        repeats = int(heads_q) // int(heads_kv)
        key = emit(relax.op.repeat(key, repeats, axis=1))
        value = emit(relax.op.repeat(value, repeats, axis=1))
    dtype = query.ty.dtype
    bias = None
    row_valid = None
    if mask_node is not None:
        mask = importer.env[mask_node]
        while _rank(mask) < 4:
            mask = emit(relax.op.expand_dims(mask, 0))
        if str(mask.ty.dtype) == "bool":
            bias = emit(relax.op.where(mask, relax.const(0.0, dtype),
                                       relax.const(float("-inf"), dtype)))
            row_valid = emit(relax.op.max(relax.op.astype(mask, dtype), axis=-1,
                                          keepdims=True))
        else:
            bias = mask if mask.ty.dtype == dtype else emit(relax.op.astype(mask, dtype))
    heads_second = [0, 2, 1, 3]  # (B, H, L, E) <-> relax.nn.attention's (B, L, H, E)
    out = emit(relax.op.nn.attention(
        emit(relax.op.permute_dims(query, heads_second)),
        emit(relax.op.permute_dims(key, heads_second)),
        emit(relax.op.permute_dims(value, heads_second)),
        bias=bias,
        scale=None if scale is None else tvm.tirx.FloatImm("float32", float(scale)),
        causal_mask="TopLeft" if is_causal else None))
    out = emit(relax.op.permute_dims(out, heads_second))
    if row_valid is not None:
        # A query row with no key to attend to gives 0 in PyTorch, NaN in a plain softmax.
        out = emit(relax.op.where(relax.op.greater(row_valid, relax.const(0.0, dtype)), out,
                                  relax.const(0.0, dtype)))
    if rank == 3:
        out = emit(relax.op.squeeze(out, [1]))
    return out


#: Op overload name (as TVM's importer keys its map) -> converter.
CUSTOM_CONVERTERS: Dict[str, Callable] = {
    "scaled_dot_product_attention.default": scaled_dot_product_attention,
}

__all__ = ["CUSTOM_CONVERTERS", "scaled_dot_product_attention"]
