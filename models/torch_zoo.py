"""Seeded PyTorch builders of the reference models (small by default, eval mode, BN statistics randomized).

Every builder is ``build_<name>(seed) -> nn.Module``: it seeds its own RNG (without touching
the caller's global torch RNG), builds the module with PyTorch's default initialisation, then
gives every BatchNorm non-trivial affine parameters and running statistics
(:func:`randomize_bn`), so that no fold is close to the identity:

    gamma ~ U(0.5, 1.5), sign flipped for ~20% of channels    beta ~ N(0, 0.5)
    running_mean ~ N(0, 0.5)                                  running_var ~ U(0.5, 2.0)

``eps`` is 1e-5 (PyTorch's default) except where the original architecture uses 1e-3
(MobileNetV3, EfficientNet, Inception). No torchvision: everything is written out here.

This module imports torch at import time; ``models.registry`` only imports it inside functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

EPS_DEFAULT = 1e-5
EPS_TF = 1e-3
"""The eps of TensorFlow-born architectures (MobileNetV3, EfficientNet, Inception)."""


def randomize_bn(module: nn.Module, *, seed: int) -> nn.Module:
    """Give every BatchNorm in ``module`` random affine parameters and running statistics, in place.

    Deterministic in ``seed`` and in the module order; returns ``module`` for chaining.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.affine:
                gamma = torch.rand(c, generator=gen) + 0.5
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_(gamma * sign)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return module


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build ``make()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    randomize_bn(module, seed=seed + 1)
    return module.eval()


def conv_bn(
    cin: int,
    cout: int,
    k: int | tuple[int, ...],
    *,
    stride: int | tuple[int, ...] = 1,
    groups: int = 1,
    dilation: int = 1,
    bias: bool = False,
    act: Callable[[], nn.Module] | None = nn.ReLU,
    eps: float = EPS_DEFAULT,
    dims: int = 2,
) -> nn.Sequential:
    """Conv -> BN (-> activation), 'same' padding for odd kernels."""
    ks = (k,) * dims if isinstance(k, int) else k
    pad = tuple(dilation * (kk - 1) // 2 for kk in ks)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers: list[nn.Module] = [
        conv_cls(cin, cout, ks, stride=stride, padding=pad, groups=groups, dilation=dilation, bias=bias),
        bn_cls(cout, eps=eps),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, + (1x1 conv-BN) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride=stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, each with BN, + projection shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride=stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, blocks, global average pool, Linear."""

    def __init__(self, blocks: list[nn.Module], stem: int, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem, 3)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_resnet_basic(seed: int) -> nn.Module:
    """Stem + a basic block with identity shortcut + a strided one with a 1x1 conv-BN shortcut.

    The shortcut BN has ``running_var`` equal to its ``weight`` (both random, positive): the
    legacy exporter deduplicates equal initializers, so in ONNX that BN's variance comes from an
    ``Identity`` node reading the weight initializer. That is what an untrained BN (ones/ones)
    looks like in exported models, and a fold must treat Identity-of-constant as constant.
    """
    model = _seeded(seed, lambda: ResNet([BasicBlock(16, 16), BasicBlock(16, 32, stride=2)], 16, 32))
    shortcut_bn = model.layers[1].downsample[1]
    with torch.no_grad():
        shortcut_bn.weight.abs_()
        shortcut_bn.running_var.copy_(shortcut_bn.weight)
    return model


def build_resnet_bottleneck(seed: int) -> nn.Module:
    """Stem + two bottleneck blocks, both with projection shortcuts (the second strided)."""
    return _seeded(seed, lambda: ResNet([Bottleneck(16, 8, 32), Bottleneck(32, 16, 64, stride=2)], 16, 64))


# --------------------------------------------------------------------------- MobileNet / EfficientNet


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 conv (bias) -> act -> 1x1 conv (bias) -> gate -> scale. No BN inside."""

    def __init__(
        self, c: int, squeeze: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet MBConv: [1x1 expand-BN-act], kxk depthwise-BN-act, [SE],
    1x1 project-BN (linear bottleneck), residual when shapes allow."""

    def __init__(
        self,
        cin: int,
        expanded: int,
        cout: int,
        *,
        kernel: int = 3,
        stride: int = 1,
        act: Callable[[], nn.Module] = nn.ReLU6,
        se: Callable[[int], nn.Module] | None = None,
        eps: float = EPS_DEFAULT,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn(cin, expanded, 1, act=act, eps=eps))
        layers.append(conv_bn(expanded, expanded, kernel, stride=stride, groups=expanded, act=act, eps=eps))
        if se is not None:
            layers.append(se(expanded))
        layers.append(conv_bn(expanded, cout, 1, act=None, eps=eps))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class Classifier(nn.Module):
    """features -> global average pool -> flatten -> head."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _mobilenet_v2() -> nn.Module:
    features = nn.Sequential(
        conv_bn(3, 16, 3, stride=2, act=nn.ReLU6),
        InvertedResidual(16, 16, 16),  # t=1: no expand conv
        InvertedResidual(16, 64, 24, stride=2),
        InvertedResidual(24, 96, 24),
        conv_bn(24, 64, 1, act=nn.ReLU6),
    )
    return Classifier(features, nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10)))


def build_mobilenetv2(seed: int) -> nn.Module:
    """Stem, inverted residuals (depthwise 3x3, ReLU6, linear bottleneck, residual), 1x1 head conv."""
    return _seeded(seed, _mobilenet_v2)


def _mobilenet_v3() -> nn.Module:
    def se(c: int) -> nn.Module:
        return SqueezeExcite(c, max(8, c // 4), nn.ReLU, nn.Hardsigmoid)

    features = nn.Sequential(
        conv_bn(3, 16, 3, stride=2, act=nn.Hardswish, eps=EPS_TF),
        InvertedResidual(16, 16, 16, stride=2, act=nn.ReLU, se=se, eps=EPS_TF),
        InvertedResidual(16, 64, 24, stride=2, act=nn.ReLU, eps=EPS_TF),
        InvertedResidual(24, 72, 24, kernel=5, act=nn.Hardswish, se=se, eps=EPS_TF),
        conv_bn(24, 96, 1, act=nn.Hardswish, eps=EPS_TF),
    )
    head = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, 10))
    return Classifier(features, head)


def build_mobilenetv3(seed: int) -> nn.Module:
    """MobileNetV3-style: hardswish, squeeze-excite (hardsigmoid gate), 5x5 depthwise, eps=1e-3."""
    return _seeded(seed, _mobilenet_v3)


def _efficientnet() -> nn.Module:
    def se_for(cin: int) -> Callable[[int], nn.Module]:
        # EfficientNet squeezes relative to the block's *input* channels.
        return lambda c: SqueezeExcite(c, max(4, cin // 4), nn.SiLU, nn.Sigmoid)

    features = nn.Sequential(
        conv_bn(3, 16, 3, stride=2, act=nn.SiLU, eps=EPS_TF),
        InvertedResidual(16, 16, 16, act=nn.SiLU, se=se_for(16), eps=EPS_TF),
        InvertedResidual(16, 96, 24, stride=2, act=nn.SiLU, se=se_for(16), eps=EPS_TF),
        InvertedResidual(24, 144, 24, kernel=5, act=nn.SiLU, se=se_for(24), eps=EPS_TF),
        conv_bn(24, 80, 1, act=nn.SiLU, eps=EPS_TF),
    )
    return Classifier(features, nn.Sequential(nn.Dropout(0.2), nn.Linear(80, 10)))


def build_efficientnet(seed: int) -> nn.Module:
    """EfficientNet-style MBConv: SiLU (exported as Sigmoid*Mul), SE with sigmoid gate, eps=1e-3."""
    return _seeded(seed, _efficientnet)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """Pre-activation: cat(inputs) -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv.

    The first BN follows a Concat (and is followed by ReLU), so no conv can absorb it.
    The second BN follows the 1x1 conv directly and is foldable.
    """

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu(self.norm1(x)))
        return self.conv2(self.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """conv-BN-ReLU-maxpool stem, dense block, transition (BN-ReLU-1x1 conv-avgpool), dense block,
    final BN-ReLU after the last Concat, pool, Linear."""

    def __init__(self, stem: int = 16, growth: int = 8, bn_size: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, 3), nn.MaxPool2d(3, stride=2, padding=1))
        c = stem
        self.block1 = DenseBlock(3, c, growth, bn_size)
        c += 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        c //= 2
        self.block2 = DenseBlock(2, c, growth, bn_size)
        c += 2 * growth
        self.norm_final = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = self.relu(self.norm_final(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_densenet(seed: int) -> nn.Module:
    """DenseNet-style: 13 BN, of which 7 are pre-activation BNs after Concat (not foldable)."""
    return _seeded(seed, DenseNet)


# --------------------------------------------------------------------------- Inception


class InceptionA(nn.Module):
    """Four branches concatenated: 1x1 | 1x1->3x3 | 1x1->1x3->3x1 | maxpool->1x1."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 8, 1, eps=EPS_TF)
        self.b2 = nn.Sequential(conv_bn(cin, 8, 1, eps=EPS_TF), conv_bn(8, 12, 3, eps=EPS_TF))
        self.b3 = nn.Sequential(
            conv_bn(cin, 4, 1, eps=EPS_TF),
            conv_bn(4, 6, (1, 3), eps=EPS_TF),
            conv_bn(6, 6, (3, 1), eps=EPS_TF),
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(cin, 6, 1, eps=EPS_TF))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionReduction(nn.Module):
    """Grid reduction: strided 3x3 | 1x1->3x3->strided 3x3 | strided maxpool, concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 16, 3, stride=2, eps=EPS_TF)
        self.b2 = nn.Sequential(
            conv_bn(cin, 8, 1, eps=EPS_TF),
            conv_bn(8, 12, 3, eps=EPS_TF),
            conv_bn(12, 12, 3, stride=2, eps=EPS_TF),
        )
        self.b3 = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


def build_inception(seed: int) -> nn.Module:
    """Inception-style: parallel branches, asymmetric 1x3/3x1 kernels, Concat, eps=1e-3."""

    def make() -> nn.Module:
        features = nn.Sequential(conv_bn(3, 16, 3, eps=EPS_TF), InceptionA(16), InceptionReduction(32))
        return Classifier(features, nn.Linear(16 + 12 + 32, 10))

    return _seeded(seed, make)


# --------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """Two-level UNet. Encoder convs carry a bias (as in the original UNet) before their BN.

    Decoder upsampling: ConvTranspose2d(k3, s2, p1, output_padding 1, bias) -> BN, and a
    grouped ConvTranspose2d(groups=4, k2, s2, no bias) -> BN, each concatenated with the skip.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, 8, 3, bias=True), conv_bn(8, 8, 3, bias=True))
        self.enc2 = nn.Sequential(
            nn.MaxPool2d(2), conv_bn(8, 16, 3, bias=True), conv_bn(16, 16, 3, bias=True)
        )
        self.bottom = nn.Sequential(nn.MaxPool2d(2), conv_bn(16, 32, 3, bias=True))
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, bias=True),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.dec2 = conv_bn(32, 16, 3)
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 2, stride=2, groups=4, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.dec1 = conv_bn(16, 8, 3)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def build_unet(seed: int) -> nn.Module:
    """UNet-style segmentation net with ConvTranspose2d+BN, one of them grouped (groups=4)."""
    return _seeded(seed, UNet)


# --------------------------------------------------------------------------- 1-D and 3-D


class AudioNet(nn.Module):
    """Raw-waveform Conv1d net: strided conv, depthwise-separable conv, dilated residual conv
    (with bias), a ConvTranspose1d upsampler (vocoder-style), pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.front = conv_bn(1, 16, 9, stride=2, dims=1)
        self.dw = conv_bn(16, 16, 5, groups=16, dims=1)
        self.pw = conv_bn(16, 32, 1, dims=1)
        self.dilated = conv_bn(32, 32, 3, dilation=2, bias=True, act=None, dims=1)
        self.relu = nn.ReLU()
        self.up = nn.Sequential(
            nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.front(x)))
        x = self.relu(x + self.dilated(x))
        x = self.up(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build_conv1d_audio(seed: int) -> nn.Module:
    """Conv1d + BatchNorm1d on (N, C, T) audio, including depthwise, dilated and ConvTranspose1d."""
    return _seeded(seed, AudioNet)


class VideoNet(nn.Module):
    """Conv3d net on (N, C, T, H, W): full 3x3x3, (2+1)D factorised spatial/temporal, depthwise 3-D."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, dims=3),
            conv_bn(8, 16, (1, 3, 3), stride=(1, 2, 2), dims=3),
            conv_bn(16, 16, (3, 1, 1), dims=3),
            conv_bn(16, 16, 3, groups=16, dims=3),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_conv3d_video(seed: int) -> nn.Module:
    """Conv3d + BatchNorm3d video net."""
    return _seeded(seed, VideoNet)


# --------------------------------------------------------------------------- Linear + BatchNorm1d


def build_mlp_bn1d(seed: int) -> nn.Module:
    """MLP on (N, F): Linear+BN1d (exported as Gemm), Linear(bias=False)+BN1d (exported as
    MatMul whose weight is Transpose(initializer)), and Linear+BN1d(affine=False) (exported with
    the BN scale/bias as Constant nodes)."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(32, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 64, bias=False),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32, affine=False),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    return _seeded(seed, make)


def build_linear_bn1d_3d(seed: int) -> nn.Module:
    """Linear on (N, L, F) with L == F, then BatchNorm1d(L), twice (with and without bias).

    BatchNorm1d on a 3-D tensor normalizes axis 1 (= L, the sequence axis), while the Linear's
    output features are on the last axis. The shapes line up only because L == F; folding the BN
    into the Linear would scale features by per-position statistics. Must NOT be folded.
    The biased Linear exports as MatMul -> Add -> BN, the bias-free one as MatMul -> BN.
    """

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 16, bias=False),
            nn.BatchNorm1d(16),
        )

    return _seeded(seed, make)


class LinearTransposeBN(nn.Module):
    """Linear on (N, L, F) -> transpose to (N, F', L) -> BatchNorm1d(F') -> transpose back -> Linear.

    BN normalizes the Linear's output features, so it is foldable in principle, but only by
    tracking the channel axis through the Transpose (MatMul -> Transpose -> BN).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.bn = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc1(x).transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.relu(y))


def build_linear_transpose_bn1d(seed: int) -> nn.Module:
    """Linear (MatMul+Add) -> Transpose -> BatchNorm1d -> Transpose: the channel axis moves."""
    return _seeded(seed, LinearTransposeBN)


# --------------------------------------------------------------------------- detection head


class DetectionNet(nn.Module):
    """Tiny backbone + FPN-lite + a detection head shared across three scales.

    ``tower`` is ONE conv module applied at every level: at P3 it is followed by ``bn_p3``, at
    P4 by ``bn_p4`` (per-level BN, as in EfficientDet), at P5 by no BN at all. In ONNX that is
    one weight initializer read by three Conv nodes; a fold that scales it in place changes the
    other levels. The ``cls``/``box`` convs are shared too (with bias, no BN).
    """

    def __init__(self, anchors: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.c3 = conv_bn(16, 24, 3, stride=2)
        self.c4 = conv_bn(24, 32, 3, stride=2)
        self.c5 = conv_bn(32, 32, 3, stride=2)
        self.lat3 = nn.Conv2d(24, 16, 1)
        self.lat4 = nn.Conv2d(32, 16, 1)
        self.lat5 = nn.Conv2d(32, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.tower = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_p3 = nn.BatchNorm2d(16)
        self.bn_p4 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.cls = nn.Conv2d(16, anchors * classes, 3, padding=1)
        self.box = nn.Conv2d(16, anchors * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat5(c5)
        p4 = self.lat4(c4) + self.up(p5)
        p3 = self.lat3(c3) + self.up(p4)
        t3 = self.relu(self.bn_p3(self.tower(p3)))
        t4 = self.relu(self.bn_p4(self.tower(p4)))
        t5 = self.relu(self.tower(p5))
        return self.cls(t3), self.box(t3), self.cls(t4), self.box(t4), self.cls(t5), self.box(t5)


def build_detection_head(seed: int) -> nn.Module:
    """Detection-style net whose shared tower conv is followed by BN at two scales, not at the third."""
    return _seeded(seed, DetectionNet)


# --------------------------------------------------------------------------- demo


class DemoNet(nn.Module):
    """MobileNet-ish classifier used by the README: 17 foldable BN, plus one BN after a Concat.

    The last stage concatenates a 1x1 and a 3x3 branch and normalizes the result (as in
    DenseNet/PeleeNet), so ``bnfold`` has one BN to explain rather than fold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, stride=2, act=nn.ReLU6),
            InvertedResidual(16, 16, 16),
            InvertedResidual(16, 64, 24, stride=2),
            InvertedResidual(24, 96, 24),
            InvertedResidual(24, 96, 32, stride=2),
            InvertedResidual(32, 128, 32),
        )
        self.branch1 = conv_bn(32, 32, 1, act=nn.ReLU6)
        self.branch3 = conv_bn(32, 32, 3, act=nn.ReLU6)
        self.norm = nn.BatchNorm2d(64)
        self.relu = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.relu(self.norm(torch.cat([self.branch1(x), self.branch3(x)], 1)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_demo(seed: int) -> nn.Module:
    """The committed demo model (models/demo.onnx)."""
    return _seeded(seed, DemoNet)
