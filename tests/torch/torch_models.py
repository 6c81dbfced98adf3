"""PyTorch modules and helpers shared by the torch test files: ``Net``, ``randomize`` (BN
statistics far from the identity) and ``seeded_torch`` (an autouse fixture once imported)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import onnx
from torch import nn

from tests.conftest import assert_close, run_ort


@pytest.fixture(autouse=True)
def seeded_torch():
    """Module initialisation draws from torch's global RNG: seed it, and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261121)
        yield


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics for every BN-like module: gamma ~ ±U(0.5, 1.5), beta ~ N(0, .5),
    mean ~ N(0, .5), var ~ U(.5, 2); returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            mean = getattr(m, "running_mean", None)
            if not isinstance(mean, torch.Tensor) or not hasattr(m, "running_var"):
                continue
            c = mean.numel()
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * sign)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return module.eval()


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


def check_saved(path: str, module: nn.Module, x: torch.Tensor, *, rtol: float = 1e-5) -> onnx.ModelProto:
    """The saved model, run by onnxruntime at ORT_DISABLE_ALL, matches the unfolded module's torch output."""
    model = onnx.load(path)
    with torch.no_grad():
        ref = module(x)
    refs = [t.numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
    assert_close(refs, run_ort(path, {model.graph.input[0].name: x.numpy()}), rtol=rtol)
    return model
