"""PyTorch modules and helpers shared by the torch test files: ``Net``, ``randomize`` (BN
statistics far from the identity) and ``seeded_torch`` (an autouse fixture once imported)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import onnx
from torch import nn

from bnfold.report import Folded, FoldReport, Skipped
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


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``timm.layers.norm_act.BatchNormAct2d`` written out (timm 1.0): a BatchNorm2d
    subclass whose own forward is the BN (``F.batch_norm``, cut and pasted from torch), then
    ``drop`` and ``act`` (used by EfficientNet, MobileNetV3, RegNet, CSPNet, DenseNet...)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: type = nn.ReLU,
        inplace: bool = True,
        drop_layer: type | None = None,
    ) -> None:
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:  # noqa: SIM102 (timm's code as written)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = nn.functional.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


# --------------------------------------------------------------------------- checks

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = ref.detach().double(), out.detach().double()
    return float((ref64 - out64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def assert_same_outputs(ref_module: nn.Module, folded: nn.Module, *xs: torch.Tensor, rtol: float) -> None:
    """Every output within ``rtol`` of its magnitude, same shape and dtype."""
    with torch.no_grad():
        refs, outs = as_tuple(ref_module(*xs)), as_tuple(folded(*xs))
    assert len(refs) == len(outs)
    for ref, out in zip(refs, outs):
        assert ref.shape == out.shape and ref.dtype == out.dtype
        err = rel_err(ref, out)
        assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def bn_modules(m: nn.Module) -> list[str]:
    kinds = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
    return [name for name, x in m.named_modules() if isinstance(x, kinds)]


def only_folded(report: FoldReport) -> Folded:
    assert not report.skipped, report.skipped
    assert len(report.folded) == 1, report.folded
    return report.folded[0]


def only_skipped(report: FoldReport) -> Skipped:
    assert not report.folded, report.folded
    assert len(report.skipped) == 1, report.skipped
    return report.skipped[0]


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, written out: statistics and affine as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Pair(nn.Module):
    """producer -> bn, nothing else."""

    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = producer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def assert_unchanged(model: nn.Module, folded: nn.Module, *xs: torch.Tensor) -> None:
    """A refused fold changed nothing: the same BN modules, state dict and bit-identical outputs."""
    assert bn_modules(folded) == bn_modules(model)
    state, after = model.state_dict(), folded.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k
    with torch.no_grad():
        refs, outs = as_tuple(model(*xs)), as_tuple(folded(*xs))
    assert len(refs) == len(outs) and all(torch.equal(r, o) for r, o in zip(refs, outs))


def assert_refused(
    model: nn.Module, x: torch.Tensor, reason: object, words: str, *, example: bool = False
) -> Skipped:
    """fold_module leaves the model's one BN ``bn`` with ``reason`` and ``words`` in the detail,
    and changes nothing; ``example`` passes ``x`` as the example inputs."""
    from bnfold.torch import fold_module

    folded, report = fold_module(model, example_inputs=(x,) if example else None)
    s = only_skipped(report)
    assert s.bn == "bn" and s.reason is reason and words in s.detail, s
    assert_unchanged(model, folded, x)
    return s
