"""fold_module on the module shapes real models use beyond Conv -> BatchNorm (issue 12):
BatchNorm subclasses with their own forward (timm's BatchNormAct2d), and no BN module left
without a report entry.

Every positive test checks the structure, the report and the numbers against the unfolded
module; every refusal checks the reason and that the outputs are bit-identical.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from bnfold.report import SkipReason
from bnfold.torch import fold_module
from torch_models import (  # noqa: F401 (seeded_torch: autouse fixture)
    RTOL,
    BatchNormAct2d,
    Pair,
    assert_refused,
    assert_same_outputs,
    assert_unchanged,
    bn_modules,
    only_folded,
    only_skipped,
    randomize,
    seeded_torch,
)

# --------------------------------------------------------------------------- BatchNormAct2d

BN_ACT = [
    ("relu", lambda: BatchNormAct2d(6)),
    ("silu-inplace", lambda: BatchNormAct2d(6, act_layer=nn.SiLU)),
    ("hardswish-dropout", lambda: BatchNormAct2d(6, act_layer=nn.Hardswish, drop_layer=nn.Dropout)),
    ("no-act", lambda: BatchNormAct2d(6, apply_act=False)),
    ("eps-1e-3-no-affine", lambda: BatchNormAct2d(6, eps=1e-3, affine=False)),
    ("momentum-none", lambda: BatchNormAct2d(6, momentum=None, act_layer=nn.ReLU6)),
]


@pytest.mark.parametrize("make", [b[1] for b in BN_ACT], ids=[b[0] for b in BN_ACT])
def test_batchnorm_act_folds_and_keeps_its_activation(make):
    """timm's BatchNormAct2d overrides forward, so it used to be traced through and left with no
    report entry at all (efficientnet_b0: folded=0, skipped=0 for 49 BN). Its BN part folds into
    the conv; the rest of its forward (drop, act) replaces it."""
    model = randomize(Pair(nn.Conv2d(3, 6, 3, padding=1, bias=False), make()))
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_module(model)
    f = only_folded(report)
    assert (f.bn, f.producer, f.producer_op) == ("bn", "conv", "Conv2d")
    assert bn_modules(folded) == [] and type(folded) is Pair
    assert isinstance(folded.bn, torch.fx.GraphModule)
    assert type(folded.bn.act) is type(model.bn.act) and type(folded.bn.drop) is type(model.bn.drop)
    assert folded.conv.bias is not None and not folded.training
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float32])


def test_batchnorm_act_folds_in_a_rewritten_forward():
    """The conv is called twice (once before the BatchNormAct2d): the folded call gets its own
    conv, and the BatchNormAct2d call becomes the rest of its forward."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = BatchNormAct2d(4, act_layer=nn.SiLU, inplace=False)

        def forward(self, x):
            return self.bn(self.conv(x)), self.conv(x)

    model = randomize(Twice())
    x = torch.randn(2, 4, 6, 6)
    folded, report = fold_module(model)
    f = only_folded(report)
    assert (f.bn, f.producer) == ("bn", "conv_bnfolded")
    assert isinstance(folded, torch.fx.GraphModule) and bn_modules(folded) == []
    assert torch.equal(folded.conv.weight, model.conv.weight)
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float32])


class BNActAfterRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = BatchNormAct2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class ResidualBN(nn.BatchNorm2d):
    """Own forward that also reads its input: ``x + bn(x)``; the fold would change ``x``."""

    def forward(self, x):
        return x + super().forward(x)


class OwnStatsTwice(nn.BatchNorm2d):
    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean * 2, self.running_var, self.weight, self.bias)


class AlwaysBatchStats(nn.BatchNorm2d):
    def forward(self, x):
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True)


class Untraceable(nn.BatchNorm2d):
    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return x


CUSTOM_SKIPS = [
    ("bnact-after-relu", BNActAfterRelu, SkipReason.UNSUPPORTED_PRODUCER, "relu"),
    (
        "reads-its-input",
        lambda: Pair(nn.Conv2d(3, 4, 3), ResidualBN(4)),
        SkipReason.UNTRACEABLE,
        "uses its input",
    ),
    (
        "other-statistics",
        lambda: Pair(nn.Conv2d(3, 4, 3), OwnStatsTwice(4)),
        SkipReason.NON_CONSTANT_BN_PARAM,
        "running_mean",
    ),
    (
        "batch-statistics",
        lambda: Pair(nn.Conv2d(3, 4, 3), AlwaysBatchStats(4)),
        SkipReason.TRAINING_MODE,
        "training=True",
    ),
    (
        "untraceable-forward",
        lambda: Pair(nn.Conv2d(3, 4, 3), Untraceable(4)),
        SkipReason.UNTRACEABLE,
        "cannot trace",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason", "words"), [c[1:] for c in CUSTOM_SKIPS], ids=[c[0] for c in CUSTOM_SKIPS]
)
def test_custom_batchnorm_that_cannot_fold_has_a_reason(make, reason, words):
    assert_refused(randomize(make()), torch.randn(2, 3, 7, 7), reason, words)


# --------------------------------------------------------------------------- no silent skip


class UnusedAndDirect(nn.Module):
    """One BN registered but never called, one whose tensors are used by ``F.batch_norm``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.direct = nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        bn = self.direct
        return nn.functional.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-example-inputs", "example-inputs"])
def test_every_bn_module_has_a_report_entry(with_inputs):
    """A BN module the traced forward never calls as a module used to get no entry at all."""
    model = randomize(UnusedAndDirect())
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_module(model, example_inputs=(x,) if with_inputs else None)
    assert not report.folded
    assert sorted(s.bn for s in report.skipped) == ["direct", "unused"]
    assert {s.reason for s in report.skipped} == {SkipReason.UNTRACEABLE}
    assert all("never calls it as a module" in s.detail for s in report.skipped)
    assert report.bn_total == len(bn_modules(model))
    assert_unchanged(model, folded, x)


# --------------------------------------------------------------------------- linear in module count


class LayerScaleBlock(nn.Module):
    """Conv -> BN with a learned per-channel scale read in the forward (ConvNeXt-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.gamma * torch.relu(self.bn(self.conv(x)))


def test_parameter_reads_do_not_search_every_parameter(monkeypatch):
    """torch.fx's tracer looked a parameter read in a forward (``self.gamma``) up by walking
    ``root.named_parameters()`` each time: tracing 1600 such blocks took 5.3 ms per block against
    1.2 ms for 100. The tracer now finds the name in a dict built once per trace."""
    calls = []
    real = nn.Module.named_parameters

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    model = randomize(nn.Sequential(*[LayerScaleBlock() for _ in range(40)]))
    x = torch.randn(1, 4, 6, 6)
    monkeypatch.setattr(nn.Module, "named_parameters", counting)
    folded, report = fold_module(model, example_inputs=(x,))
    monkeypatch.undo()
    assert len(report.folded) == 40 and not report.skipped and bn_modules(folded) == []
    assert calls.count("Sequential") <= 2, f"named_parameters walked {calls.count('Sequential')} times"
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float32])


# --------------------------------------------------------------------------- through flatten/reshape


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: Linear on (B, N, C), BatchNorm1d on (B*N, C), shape restored."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearReshapeNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(c, c), nn.BatchNorm1d(c)

    def forward(self, x):
        b, n, c = x.shape
        return self.bn(torch.reshape(self.fc(x), (-1, c))).view(b, n, c)


class ConvFlattenNorm(nn.Module):
    """Conv2d -> flatten(2) -> BatchNorm1d on (N, C, H*W): axis 1 is still the channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.conv(x).flatten(2))


THROUGH = [
    ("levit-linear-norm", lambda: LinearNorm(6, 8), (2, 5, 6), "linear", "flatten"),
    ("linear-reshape", lambda: LinearReshapeNorm(6), (3, 4, 6), "fc", "reshape"),
    ("conv-flatten-spatial", ConvFlattenNorm, (2, 3, 6, 6), "conv", "flatten"),
]


@pytest.mark.parametrize(
    ("make", "shape", "producer", "op"), [t[1:] for t in THROUGH], ids=[t[0] for t in THROUGH]
)
def test_bn_after_a_reshape_that_keeps_the_channel_axis_folds(make, shape, producer, op):
    """LeViT's linear-norm blocks flatten (B, N, C) to (B*N, C) before BatchNorm1d: the channel
    axis is the Linear's feature axis on both sides, so the fold is exact; no peer folds it."""
    model = randomize(make()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    folded, report = fold_module(model, example_inputs=(x,))
    f = only_folded(report)
    assert (f.bn, f.producer, f.through, f.direction) == ("bn", producer, (op,), "backward")
    assert bn_modules(folded) == [] and isinstance(folded.bn, nn.Identity)
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float64])
    assert_same_outputs(
        model, folded, torch.randn(1, *shape[1:], dtype=torch.float64), rtol=RTOL[torch.float64]
    )


class FlattenAllNorm(nn.Module):
    """Linear(6, 6) on (B, 6, 6), flattened to (B, 36): BatchNorm1d(36) mixes L and F."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(36)

    def forward(self, x):
        return self.bn(self.fc(x).flatten(1))


class ReshapeShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)), y


THROUGH_SKIPS = [
    ("no-example-inputs", LinearNorm, None, SkipReason.AXIS_NOT_PRESERVED, "pass example_inputs"),
    (
        "flatten-merges-the-channel-axis",
        FlattenAllNorm,
        (2, 6, 6),
        SkipReason.AXIS_NOT_PRESERVED,
        "[2, 6, 6] to [2, 36]",
    ),
    (
        "linear-output-also-returned",
        ReshapeShared,
        (2, 3, 6),
        SkipReason.PRODUCER_OUTPUT_SHARED,
        "model output",
    ),
]


@pytest.mark.parametrize(
    ("make", "shape", "reason", "words"), [t[1:] for t in THROUGH_SKIPS], ids=[t[0] for t in THROUGH_SKIPS]
)
def test_bn_after_a_reshape_that_is_not_proven_is_left(make, shape, reason, words):
    model = randomize(make() if make is not LinearNorm else LinearNorm(6, 6))
    assert_refused(model, torch.randn(*(shape or (2, 3, 6))), reason, words, example=shape is not None)


# --------------------------------------------------------------------------- forward into a Linear


class InputNormLinear(nn.Module):
    """BatchNorm1d on the model input, then a Linear: nothing before the BN can absorb it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.bn(x))


class ReluNormLinear(nn.Module):
    """Linear -> ReLU -> BatchNorm1d -> Linear (bias-less): the BN folds into the second Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc2(self.bn(torch.relu(self.fc1(x))))


@pytest.mark.parametrize(
    ("make", "c_in", "linear"),
    [(InputNormLinear, 6, "fc"), (ReluNormLinear, 5, "fc2")],
    ids=["on-input", "after-relu"],
)
def test_bn_before_a_linear_folds_forward(make, c_in, linear):
    """BN before Linear: W' = W diag(s), b' = b + W t, exact on (N, F) input."""
    model = randomize(make()).double()
    x = torch.randn(7, c_in, dtype=torch.float64)
    folded, report = fold_module(model, example_inputs=(x,))
    f = only_folded(report)
    assert (f.bn, f.producer, f.producer_op, f.direction) == ("bn", linear, "Linear", "forward")
    assert bn_modules(folded) == [] and isinstance(folded.bn, nn.Identity)
    assert getattr(folded, linear).bias is not None
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float64])
    model32, x32 = randomize(make()), torch.randn(7, c_in)
    assert_same_outputs(
        model32, fold_module(model32, example_inputs=(x32,))[0], x32, rtol=RTOL[torch.float32]
    )


class FaceHead(nn.Module):
    """Face-recognition head (ArcFace/InsightFace): BatchNorm2d -> Dropout -> Flatten -> Linear,
    the BN after a ReLU so nothing before it can absorb it."""

    def __init__(self, flatten: str = "module") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn, self.drop, self.flat, self.fc = (
            nn.BatchNorm2d(4),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(4 * 25, 6),
        )
        self.how = flatten

    def forward(self, x):
        y = self.drop(self.bn(torch.relu(self.conv(x))))
        y = self.flat(y) if self.how == "module" else y.reshape(y.shape[0], -1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["module", "reshape"], ids=["nn-flatten", "reshape-batch-minus-one"])
def test_bn2d_folds_forward_through_dropout_and_flatten(how):
    """Flattening (N, C, H, W) puts channel c on features c*H*W ... (c+1)*H*W - 1: the Linear
    takes each channel's scale and shift repeated H*W times."""
    model = randomize(FaceHead(how)).double()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    folded, report = fold_module(model, example_inputs=(x,))
    f = only_folded(report)
    through = ("Dropout", "Flatten") if how == "module" else ("Dropout", "reshape")
    assert (f.bn, f.producer, f.direction, f.through) == ("bn", "fc", "forward", through)
    assert bn_modules(folded) == [] and isinstance(folded.drop, nn.Dropout)
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float64])


class NormLinearNorm(nn.Module):
    """ReLU -> BatchNorm1d -> Linear -> BatchNorm1d: the Linear can absorb both BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.bn1, self.fc, self.bn2 = (
            nn.Linear(5, 6),
            nn.BatchNorm1d(6),
            nn.Linear(6, 4),
            nn.BatchNorm1d(4),
        )

    def forward(self, x):
        return self.bn2(self.fc(self.bn1(torch.relu(self.fc0(x)))))


def test_linear_between_two_bns_absorbs_both_without_losing_one():
    """Both BNs' folds were computed from the original Linear: applying the second replaced the
    first, so bn1 was dropped with its map nowhere (outputs off). One map per layer per round;
    the next round folds the other into the already folded Linear."""
    model = randomize(NormLinearNorm()).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    folded, report = fold_module(model, example_inputs=(x,))
    assert not report.skipped, report.skipped
    assert {(f.bn, f.producer, f.direction) for f in report.folded} == {
        ("bn2", "fc", "backward"),
        ("bn1", "fc", "forward"),
    }
    assert bn_modules(folded) == []
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float64])


class NormOn3D(nn.Module):
    """BatchNorm1d(6) on (N, 6, 6) normalizes axis 1; the Linear mixes the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.bn(x))


FORWARD_SKIPS = [
    ("no-example-inputs", InputNormLinear, None, "rank of the BatchNorm's input is unknown"),
    ("bn-on-rank-3", NormOn3D, (2, 6, 6), "rank 3"),
]


@pytest.mark.parametrize(
    ("make", "shape", "words"), [c[1:] for c in FORWARD_SKIPS], ids=[c[0] for c in FORWARD_SKIPS]
)
def test_bn_before_a_linear_is_left_when_the_axis_is_not_proven(make, shape, words):
    x = torch.randn(*(shape or (4, 6)))
    s = assert_refused(randomize(make()), x, SkipReason.NO_PRODUCER, words, example=shape is not None)
    assert "folding it forward into fc" in s.detail, s.detail


# --------------------------------------------------------------------------- a forward's own x @ W + b


class OwnMatmul(nn.Module):
    """A layer written out in the forward: ``x @ W + b`` with W (K, N), b (N,), then BatchNorm1d."""

    def __init__(self, k: int = 5, n: int = 6, share: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n))
        self.b = nn.Parameter(torch.randn(n)) if bias else None
        self.bn = nn.BatchNorm1d(n)
        self.share = share

    def forward(self, x):
        y = x @ self.w + self.b if self.b is not None else x @ self.w
        return (self.bn(y), x @ self.w) if self.share else self.bn(y)


class OwnLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(6))
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(nn.functional.linear(x, self.weight, self.bias))


@pytest.mark.parametrize(
    ("make", "weight", "op"),
    [(OwnMatmul, "w", "matmul"), (OwnLinear, "weight", "linear")],
    ids=["matmul-add", "f-linear"],
)
def test_bn_after_a_forwards_own_layer_folds_into_its_tensors(make, weight, op):
    """``x @ W + b`` (W, b parameters of the module) then BN: W and b absorb it in place."""
    model = randomize(make()).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    folded, report = fold_module(model, example_inputs=(x,))
    f = only_folded(report)
    assert (f.bn, f.producer, f.producer_op) == ("bn", weight, op)
    assert bn_modules(folded) == [] and isinstance(folded.bn, nn.Identity)
    assert isinstance(getattr(folded, weight), nn.Parameter)
    assert not torch.equal(getattr(folded, weight), getattr(model, weight)), (
        "the caller's module is untouched"
    )
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float64])


OWN_SKIPS = [
    ("no-example-inputs", lambda: OwnMatmul(), None, SkipReason.CHANNEL_AXIS_MISMATCH, "unknown rank"),
    ("rank-3", lambda: OwnMatmul(6, 6), (2, 6, 6), SkipReason.CHANNEL_AXIS_MISMATCH, "rank 3"),
    (
        "weight-read-twice",
        lambda: OwnMatmul(share=True),
        (4, 5),
        SkipReason.NON_CONSTANT_WEIGHT,
        "w is also read elsewhere",
    ),
    ("no-bias", lambda: OwnMatmul(bias=False), (4, 5), SkipReason.UNSUPPORTED_PRODUCER, "matmul"),
]


@pytest.mark.parametrize(
    ("make", "shape", "reason", "words"), [c[1:] for c in OWN_SKIPS], ids=[c[0] for c in OWN_SKIPS]
)
def test_bn_after_a_forwards_own_layer_is_left_when_not_provably_exact(make, shape, reason, words):
    x = torch.randn(*(shape or (4, 5)))
    assert_refused(randomize(make()), x, reason, words, example=shape is not None)
