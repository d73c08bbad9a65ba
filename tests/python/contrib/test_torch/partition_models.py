"""Models for the partition tests: a custom operator, control flow, loops over lists.

Importing this module registers the custom operator ``tvm_test::scale_shift`` (a fresh
process that loads a saved model using it imports this module first).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

_LIBRARY = torch.library.Library("tvm_test", "DEF")
_LIBRARY.define("scale_shift(Tensor x) -> Tensor")
_LIBRARY.impl("scale_shift", lambda x: x * 0.5 + 0.25, "CompositeExplicitAutograd")

CUSTOM_OP = "tvm_test::scale_shift"


class CustomOpCNN(nn.Module):
    """conv-bn-relu-conv-relu, a custom operator TVM cannot take, conv-relu-pool-linear."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.tail(torch.ops.tvm_test.scale_shift(self.head(x)))


class BranchAndLoop(nn.Module):
    """A data-dependent ``if`` choosing between two conv stacks, then a loop over rows."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU())
        self.positive = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1))
        self.negative = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Conv2d(8, 8, 1))
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        y = self.features(x)
        if bool(x.mean() > 0):
            y = self.positive(y)
        else:
            y = self.negative(y)
        rows: List[torch.Tensor] = []
        for row in torch.unbind(y.mean([2, 3]), 0):
            rows.append(torch.tanh(self.proj(row * 2.0 + 1.0)))
        return torch.stack(rows)


class VaryingLoop(nn.Module):
    """A loop whose body sees a different shape on every iteration."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        total = torch.zeros(x.shape[1])
        for chunk in torch.split(x, [1, 2, 3], 0):
            total = total + torch.relu(chunk * self.scale + 1.0).sum(0)
        return total


def init(module: nn.Module) -> nn.Module:
    """Deterministic weights and BN statistics; eval mode."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return module.eval()


class Attention(nn.Module):
    """Self-attention written out: shapes read from the input, SDPA with dropout_p=0."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        shape = [batch, tokens, self.heads, dim // self.heads]
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, dim))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


class MixedSignature(nn.Module):
    """Integer ids, a float tensor and a bool in; a dict of tensor lists out."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([_Residual(), _Residual()])

    def forward(self, ids, x, use_ids: bool) -> Dict[str, List[torch.Tensor]]:
        h = self.embedding(ids) if use_ids else x
        for block in self.blocks:
            h = block(h)
        return {"tokens": [h], "pooled": [h.mean(1), h.amax(1)]}


class RaggedLoop(nn.Module):
    """A loop over chunks of different lengths: its body sees a new shape every iteration."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, sizes: List[int]):
        outs: List[torch.Tensor] = []
        for chunk in torch.split(x, sizes, 0):
            outs.append(torch.tanh(self.proj(chunk) * 2.0).sum(0))
        return torch.stack(outs)
