"""Small real models for the compile tests (deterministic weights, CI-sized shapes)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """conv-bn-relu stem, one residual block, global pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Two linear layers with a GELU."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TwoInTwoOut(nn.Module):
    """Two inputs, two outputs (a tuple)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, a, b) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.proj(a) + b.sum(dim=-1, keepdim=True), torch.tanh(a) * 2.0


def transformer_layer() -> nn.Module:
    """A batch-first transformer encoder layer (attention, layer norm, GELU)."""
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                      activation="gelu", batch_first=True)


def _init(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return module.eval()


#: name -> (factory, example input shapes)
MODELS = {
    "cnn": (lambda: _init(ResidualCNN()), [(1, 3, 16, 16)]),
    "mlp": (lambda: _init(MLP()), [(4, 16)]),
    "transformer": (lambda: _init(transformer_layer()), [(2, 5, 32)]),
    "two_in_two_out": (lambda: _init(TwoInTwoOut()), [(3, 6), (3, 5)]),
}


def make(name: str):
    """(model, example inputs, input_infos) for a model name."""
    factory, shapes = MODELS[name]
    torch.manual_seed(1)
    model = factory()
    inputs = [torch.randn(*s) for s in shapes]
    infos = [(f"in{i}", s) for i, s in enumerate(shapes)]
    return model, inputs, infos


def reference(model: nn.Module, inputs):
    """The model's outputs as a flat list (no grad)."""
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]
