"""Rebuild scripted ``torch.nn`` transformer modules as eager modules.

``torch.jit.script`` keeps every branch of ``nn.TransformerEncoderLayer.forward`` and
``nn.MultiheadAttention.forward``: checks of devices, grad mode, nested tensors and fast-path
flags that torch's TorchScript-to-ExportedProgram converter cannot take (it fails an internal
assert). A scripted module of one of these classes carries everything needed to rebuild the
eager module: its hyperparameters as attributes and its weights in its state dict. The eager
module then goes through ``torch.export``, which resolves those branches for the example inputs.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn


def _encoder_layer(script: torch.jit.ScriptModule) -> nn.Module:
    attn = script.self_attn
    activation = "gelu" if int(script.activation_relu_or_gelu) == 2 else "relu"
    layer = nn.TransformerEncoderLayer(
        d_model=int(attn.embed_dim), nhead=int(attn.num_heads),
        dim_feedforward=int(script.linear1.out_features), dropout=0.0,
        activation=activation, layer_norm_eps=float(script.norm1.eps),
        batch_first=bool(attn.batch_first), norm_first=bool(script.norm_first),
        bias=script.linear1.bias is not None)
    return layer


def _multi_head_attention(script: torch.jit.ScriptModule) -> nn.Module:
    return nn.MultiheadAttention(
        embed_dim=int(script.embed_dim), num_heads=int(script.num_heads), dropout=0.0,
        bias=script.in_proj_bias is not None, batch_first=bool(script.batch_first),
        kdim=int(script.kdim), vdim=int(script.vdim))


#: ``original_name`` of a scripted module -> builder of the equivalent eager module.
_BUILDERS: Dict[str, Callable[[torch.jit.ScriptModule], nn.Module]] = {
    "TransformerEncoderLayer": _encoder_layer,
    "MultiheadAttention": _multi_head_attention,
}


def rebuild_eager(script: torch.jit.ScriptModule) -> Optional[nn.Module]:
    """The eager equivalent of a scripted ``torch.nn`` transformer module, or None.

    The rebuilt module gets the scripted module's weights (``load_state_dict`` is strict, so a
    module whose structure differs is not silently accepted) and is put in eval mode.
    """
    builder = _BUILDERS.get(getattr(script, "original_name", ""))
    if builder is None:
        return None
    try:
        module = builder(script)
        module.load_state_dict(script.state_dict(), strict=True)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return module.eval()
