"""Decompositions of PyTorch's fused inference fast-path operators into core ATen ops.

A ``nn.TransformerEncoderLayer`` or ``nn.MultiheadAttention`` run under ``torch.no_grad()`` in
eval mode takes PyTorch's "fast path": one fused kernel per layer
(``aten::_transformer_encoder_layer_fwd``, ``aten::_native_multi_head_attention``). A trace
records those kernels, which neither ``ExportedProgram.run_decompositions()`` nor TVM's frontend
can take apart. The functions here express them in ordinary ops with the same semantics; they
are added to the decomposition table used before conversion to Relax.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _attention_mask(mask: Optional[torch.Tensor], mask_type: Optional[int], batch: int,
                    heads: int) -> Optional[torch.Tensor]:
    """Broadcast a fast-path mask to (B, H, L, S) semantics."""
    if mask is None:
        return None
    if mask.dim() == 2:
        # mask_type 1: key padding mask (B, S); otherwise an attention mask (L, S).
        mask = mask[:, None, None, :] if mask_type == 1 else mask[None, None, :, :]
    elif mask.dim() == 3:
        mask = mask.view(batch, heads, mask.shape[-2], mask.shape[-1])
    return mask


def native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias,
                                proj_weight, proj_bias, mask=None, need_weights=True,
                                average_attn_weights=True, mask_type=None):
    """``aten::_native_multi_head_attention`` (batch-first inputs) in core ops."""
    batch, tgt_len, _ = query.shape
    src_len = key.shape[1]
    head_dim = embed_dim // num_head
    if query is key and key is value:
        # Self-attention: one matrix product for q, k and v (as the fused kernel does).
        q, k, v = F.linear(query, qkv_weight, qkv_bias).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = qkv_weight.chunk(3, dim=0)
        b_q, b_k, b_v = qkv_bias.chunk(3, dim=0)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q = q.reshape(batch, tgt_len, num_head, head_dim).transpose(1, 2)
    k = k.reshape(batch, src_len, num_head, head_dim).transpose(1, 2)
    v = v.reshape(batch, src_len, num_head, head_dim).transpose(1, 2)
    full_mask = _attention_mask(mask, mask_type, batch, num_head)
    if full_mask is None and not need_weights:
        # One fused attention call (TVM: relax.nn.attention, offloaded to ATen's kernel).
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tgt_len, embed_dim)
        return F.linear(out, proj_weight, proj_bias), query.new_empty((0,))
    scores = torch.matmul(q, k.transpose(-2, -1)) * (float(head_dim) ** -0.5)
    if full_mask is not None:
        if full_mask.dtype == torch.bool:
            scores = scores.masked_fill(full_mask, float("-inf"))
        else:
            scores = scores + full_mask
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tgt_len, embed_dim)
    out = F.linear(out, proj_weight, proj_bias)
    if not need_weights:
        return out, query.new_empty((0,))
    return out, weights.mean(dim=1) if average_attn_weights else weights


def transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                  proj_bias, use_gelu, norm_first, eps, norm_weight_1,
                                  norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1,
                                  ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None,
                                  mask_type=None):
    """``aten::_transformer_encoder_layer_fwd`` (batch-first) in core ops."""

    def attention(x):
        return native_multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias,
                                           proj_weight, proj_bias, mask, False, True,
                                           mask_type)[0]

    def feed_forward(x):
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    shape = (embed_dim,)
    x = src
    if norm_first:
        x = x + attention(F.layer_norm(x, shape, norm_weight_1, norm_bias_1, eps))
        x = x + feed_forward(F.layer_norm(x, shape, norm_weight_2, norm_bias_2, eps))
    else:
        x = F.layer_norm(x + attention(x), shape, norm_weight_1, norm_bias_1, eps)
        x = F.layer_norm(x + feed_forward(x), shape, norm_weight_2, norm_bias_2, eps)
    return x


def fast_path_decompositions() -> Dict[torch._ops.OpOverload, callable]:
    """Decompositions for the fused fast-path ops, keyed by op overload."""
    return {
        aten._native_multi_head_attention.default: native_multi_head_attention,
        aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer_fwd,
    }


def decomposition_table() -> Dict[torch._ops.OpOverload, callable]:
    """PyTorch's default export decompositions (attention kept whole) plus
    :func:`fast_path_decompositions`."""
    table = torch.export.default_decompositions()
    # Attention reaches TVM whole (relax.nn.attention), not as matmul / softmax / matmul.
    for op in (aten.scaled_dot_product_attention.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten._scaled_dot_product_attention_math.default):
        table.pop(op, None)
    table.update(fast_path_decompositions())
    return table
