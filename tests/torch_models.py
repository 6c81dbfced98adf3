"""PyTorch modules shared by the torch test files."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn


class Net(nn.Module):
    """Conv (no bias), depthwise conv, grouped ConvTranspose, Linear on (N, F): 4 BN, all foldable.
    Both the feature map and the logits are outputs (the logits alone are dominated by the last
    BN's shift and would hide a 1% weight error)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.features(x)
        return y, self.bn(self.fc(y.mean((2, 3))))
