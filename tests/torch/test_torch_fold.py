"""bnfold.torch.fold_module: module-level folding, checked against the unfolded module.

Every positive test checks the structure (the BN is gone, the producer absorbed it), the report,
and the numbers: folded vs unfolded outputs within ``rtol`` of the output's magnitude (float32
1e-5, float64 1e-12, float16 1e-2, bfloat16 5e-2). BN statistics are never near the identity.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from bnfold.report import FoldReport, SkipReason
from bnfold.torch import fold_module
from torch_models import (  # noqa: F401 (seeded_torch: autouse fixture)
    RTOL,
    FrozenBatchNorm2d,
    Net,
    Pair,
    assert_refused,
    assert_same_outputs,
    bn_modules,
    only_folded,
    only_skipped,
    randomize,
    rel_err,
    seeded_torch,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 3)}


def check_pair(model: nn.Module, x: torch.Tensor, *, producer_op: str, rtol: float, example: bool = False):
    """Fold ``model`` (a Pair), check structure, report and numbers; return the folded module."""
    folded, report = fold_module(model, example_inputs=(x,) if example else None)
    f = only_folded(report)
    assert (f.bn, f.producer, f.producer_op, f.output) == ("bn", "conv", producer_op, "")
    assert bn_modules(folded) == [], "the BN module is still in the result"
    assert isinstance(folded.bn, nn.Identity) and type(folded) is type(model)
    assert not folded.training
    assert_same_outputs(model, folded, x, rtol=rtol)
    return folded


# --------------------------------------------------------------------------- what folds

CONV_CASES = [(d, bias, groups) for d in (1, 2, 3) for bias in (True, False) for groups in (1, 4)]


@pytest.mark.parametrize(
    ("dims", "bias", "groups"),
    CONV_CASES,
    ids=[
        f"conv{d}d-{'bias' if b else 'nobias'}-{'depthwise' if g > 1 else 'dense'}" for d, b, g in CONV_CASES
    ],
)
def test_conv_bn_folds(dims, bias, groups):
    model = randomize(
        Pair(
            CONV[dims](4, 4 if groups > 1 else 6, 3, groups=groups, bias=bias),
            BN[dims](4 if groups > 1 else 6),
        )
    )
    x = torch.randn(2, 4, *SPATIAL[dims])
    check_pair(model, x, producer_op=CONV[dims].__name__, rtol=RTOL[torch.float32])


@pytest.mark.parametrize("dims", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_bn_folds_float64_tightly(dims):
    model = randomize(Pair(CONV[dims](3, 5, 3, padding=1), BN[dims](5))).double()
    x = torch.randn(2, 3, *SPATIAL[dims], dtype=torch.float64)
    folded = check_pair(model, x, producer_op=CONV[dims].__name__, rtol=RTOL[torch.float64])
    assert folded.conv.weight.dtype == torch.float64


CONVT_CASES = [(d, g) for d in (1, 2, 3) for g in (1, 2, 6)]


@pytest.mark.parametrize(
    ("dims", "groups"), CONVT_CASES, ids=[f"convtranspose{d}d-groups{g}" for d, g in CONVT_CASES]
)
def test_conv_transpose_bn_folds_with_groups(dims, groups):
    """The weight is (C_in, C_out/g, k...): the scale runs along axis 1 within each group.
    Scaling axis 1 as if it held all C_out channels breaks every groups > 1 case."""
    model = randomize(
        Pair(
            CONV_T[dims](6, 12 if groups < 6 else 6, 3, stride=2, groups=groups),
            BN[dims](12 if groups < 6 else 6),
        )
    ).double()
    x = torch.randn(2, 6, *SPATIAL[dims], dtype=torch.float64)
    check_pair(model, x, producer_op=CONV_T[dims].__name__, rtol=RTOL[torch.float64])
    check_pair(model.float(), x.float(), producer_op=CONV_T[dims].__name__, rtol=RTOL[torch.float32])


def test_fusion_helper_is_wrong_for_grouped_conv_transpose():
    """Why bnfold.torch has its own grouped ConvTranspose path: torch's helper cannot scale
    (C_in, C_out/g, k) by a (C_out,) vector (it raises, or broadcasts to a wrong shape)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = nn.ConvTranspose2d(4, 8, 3, groups=2).eval(), randomize(nn.BatchNorm2d(8))
    with pytest.raises(RuntimeError):
        fuse_conv_bn_eval(conv, bn, transpose=True)


def test_linear_bn1d_on_2d_input_folds():
    model = randomize(Pair(nn.Linear(10, 7), nn.BatchNorm1d(7))).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    check_pair(model, x, producer_op="Linear", rtol=RTOL[torch.float64], example=True)


@pytest.mark.parametrize(
    "make_bn",
    [
        lambda c: nn.BatchNorm2d(c, affine=False),
        lambda c: nn.SyncBatchNorm(c),
        lambda c: FrozenBatchNorm2d(c),
        lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=None),
    ],
    ids=["affine-false", "syncbatchnorm-eval", "frozen-batchnorm", "eps-1e-3"],
)
def test_bn_variants_fold(make_bn):
    model = randomize(Pair(nn.Conv2d(3, 6, 3), make_bn(6)))
    x = torch.randn(2, 3, 8, 8)
    check_pair(model, x, producer_op="Conv2d", rtol=RTOL[torch.float32])


def test_bn_in_train_mode_is_folded_with_running_stats_and_result_is_eval():
    """fold_module folds inference behaviour: the result is in eval mode."""
    model = randomize(Pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))).train()
    folded, report = fold_module(model)
    assert only_folded(report).bn == "bn"
    assert not folded.training and model.training, "the caller's module keeps its mode"
    x = torch.randn(2, 3, 8, 8)
    assert_same_outputs(copy.deepcopy(model).eval(), folded, x, rtol=RTOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_folds_in_float64_and_keeps_dtype(dtype):
    model = randomize(Pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).to(dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    folded = check_pair(model, x, producer_op="Conv2d", rtol=RTOL[dtype])
    assert folded.conv.weight.dtype == dtype and folded.conv.bias.dtype == dtype
    # The folded weights are the float64 fold rounded once.
    ref = model.float()
    scale = (ref.bn.weight / (ref.bn.running_var.double() + ref.bn.eps).sqrt()).double()
    expected = (ref.conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype)
    assert torch.equal(folded.conv.weight, expected)


def test_float16_scale_above_65504_folds_when_the_product_fits():
    """gamma/sqrt(var+eps) = 6e4/sqrt(0.01) ~ 6e5 overflows float16 on its own, but
    weight*scale ~ 600 does not: a fold computed in float16 writes inf; float64 math and one
    cast get it right."""
    conv, bn = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.fill_(1e-3)
        bn.weight.fill_(6e4)
        bn.bias.fill_(0.25)
        bn.running_mean.fill_(0.01)
        bn.running_var.fill_(0.01)
    model = Pair(conv, bn).eval().half()
    scale16 = model.bn.weight * torch.rsqrt(model.bn.running_var + model.bn.eps)
    assert torch.isinf(scale16).all(), "the premise: the scale alone overflows float16"
    folded, report = fold_module(model)
    only_folded(report)
    assert torch.isfinite(folded.conv.weight).all()
    expected = 1e-3 * 6e4 / (float(model.bn.running_var[0]) + 1e-5) ** 0.5
    assert float(folded.conv.weight.detach()[0, 0]) == pytest.approx(expected, rel=1e-3)
    x = torch.randn(1, 2, 3, 3).half()
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float16])


def test_float16_overflowing_fold_is_skipped_not_representable():
    conv, bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.fill_(10.0)
        bn.weight.fill_(1e4)
    model = randomize(Pair(conv, bn)).half()
    with torch.no_grad():
        bn.weight.fill_(1e4)
    folded, report = fold_module(model)
    s = only_skipped(report)
    assert s.reason is SkipReason.NOT_REPRESENTABLE and "overflows float16" in s.detail
    assert (s.producer, s.producer_op) == ("conv", "Conv2d")
    assert bn_modules(folded) == ["bn"] and torch.equal(folded.conv.weight, model.conv.weight)


# --------------------------------------------------------------------------- dataflow, not registration order


class RegistrationOrderTrap(nn.Module):
    """Registered conv_a, bn, conv_b, but the BN normalizes conv_b's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        return self.bn(self.conv_b(torch.relu(self.conv_a(x))))


def test_pairs_come_from_dataflow_not_registration_order():
    model = randomize(RegistrationOrderTrap())
    folded, report = fold_module(model)
    f = only_folded(report)
    assert (f.bn, f.producer) == ("bn", "conv_b")
    assert torch.equal(folded.conv_a.weight, model.conv_a.weight)
    assert_same_outputs(model, folded, torch.randn(2, 3, 6, 6), rtol=RTOL[torch.float32])


class ReusedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)), self.conv(x)


def test_reused_conv_second_call_is_not_corrupted():
    """A conv called twice, once followed by BN: torch.fx's fuse scales the shared module in
    place and the second call changes. The folded call must get its own module."""
    model = randomize(ReusedConv())
    x = torch.randn(2, 4, 6, 6)
    folded, report = fold_module(model)
    f = only_folded(report)
    assert (f.bn, f.producer, f.producer_op) == ("bn", "conv_bnfolded", "Conv2d")
    assert isinstance(folded, torch.fx.GraphModule)
    assert torch.equal(folded.conv.weight, model.conv.weight) and torch.equal(
        folded.conv.bias, model.conv.bias
    )
    assert bn_modules(folded) == []
    with torch.no_grad():
        (r1, r2), (o1, o2) = model(x), folded(x)
    assert torch.equal(r2, o2), "the unfolded second call changed"
    assert rel_err(r1, o1) <= RTOL[torch.float32]


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn(torch.relu(y))


def test_bn_called_twice_folds_only_where_it_can():
    model = randomize(SharedBN())
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_module(model)
    s = only_skipped(report)
    assert s.bn == "bn" and s.reason is SkipReason.UNSUPPORTED_PRODUCER
    assert "relu" in s.detail and "folded at 1 of its 2 calls" in s.detail
    calls = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn"], "the first call folded into conv, the second BN call stays"
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float32])


# --------------------------------------------------------------------------- what must not fold


class LinearBN(nn.Module):
    def __init__(self, f: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, f)
        self.bn = nn.BatchNorm1d(f)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn1d_on_3d_input_is_not_folded():
    """On (N, L, F) BatchNorm1d normalizes axis 1 = L, not the features; with L == F the
    shapes line up and a fold (torch.fx, torch.ao) scales features by L's statistics."""
    model = randomize(LinearBN(6))
    x = torch.randn(3, 6, 6)
    folded, report = fold_module(model, example_inputs=(x,))
    s = only_skipped(report)
    assert s.reason is SkipReason.CHANNEL_AXIS_MISMATCH and "rank 3" in s.detail
    assert (s.bn, s.producer, s.producer_op) == ("bn", "fc", "Linear")
    assert bn_modules(folded) == ["bn"]
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_linear_bn1d_without_example_inputs_is_skipped():
    model = randomize(LinearBN(6))
    folded, report = fold_module(model)
    s = only_skipped(report)
    assert s.reason is SkipReason.CHANNEL_AXIS_MISMATCH
    assert s.detail == "rank of the Linear's input is unknown; pass example_inputs"
    assert bn_modules(folded) == ["bn"]


def test_conv1d_on_unbatched_input_is_not_folded():
    """Conv1d on (C, L) gives (C_out, L): BatchNorm1d then normalizes L, not channels."""
    model = randomize(Pair(nn.Conv1d(3, 5, 3, padding=1), nn.BatchNorm1d(5)))
    x = torch.randn(3, 5)
    folded, report = fold_module(model, example_inputs=x)
    s = only_skipped(report)
    assert s.reason is SkipReason.CHANNEL_AXIS_MISMATCH and "unbatched" in s.detail
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_conv2d_then_batchnorm1d_is_not_folded_without_shapes():
    """BatchNorm1d cannot take a batched Conv2d output (rank 4): it only runs on unbatched input."""
    _, report = fold_module(randomize(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4))))
    assert only_skipped(report).reason is SkipReason.CHANNEL_AXIS_MISMATCH


class ReluBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class InputBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.bn(x))


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class CatBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class StandardizedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardization): not a plain conv."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return nn.functional.conv2d(x, w, self.bias)


def _no_running_stats():
    return Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


def _weight_norm():
    return Pair(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))


def _hooked():
    model = Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.conv.register_forward_hook(lambda m, i, o: o * 2)
    return model


SKIP_CASES = [
    ("bn-after-relu", ReluBN, SkipReason.UNSUPPORTED_PRODUCER, "relu"),
    ("bn-after-concat", CatBN, SkipReason.UNSUPPORTED_PRODUCER, "cat"),
    ("bn-on-model-input", InputBN, SkipReason.NO_PRODUCER, "model input"),
    ("conv-output-shared", SharedOutput, SkipReason.PRODUCER_OUTPUT_SHARED, "model output"),
    ("track-running-stats-false", _no_running_stats, SkipReason.TRAINING_MODE, "batch statistics"),
    (
        "conv-subclass-own-forward",
        lambda: Pair(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4)),
        SkipReason.UNSUPPORTED_PRODUCER,
        "own forward",
    ),
    ("weight-norm-parametrized", _weight_norm, SkipReason.NON_CONSTANT_WEIGHT, "computed at run time"),
    ("forward-hook-on-conv", _hooked, SkipReason.NON_CONSTANT_WEIGHT, "hooks"),
]


@pytest.mark.parametrize(
    ("make", "reason", "words"), [c[1:] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES]
)
def test_unfoldable_bn_is_skipped_and_module_unchanged(make, reason, words):
    assert_refused(randomize(make()), torch.randn(2, 3, 7, 7), reason, words)


# --------------------------------------------------------------------------- untraceable models


class DataDependent(nn.Module):
    """torch.fx cannot trace the data-dependent ``if``; its children can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:
            return self.head(y)
        return self.bn(self.conv(y))


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-example-inputs", "example-inputs"])
def test_untraceable_model_folds_traceable_children(with_inputs):
    model = randomize(DataDependent())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_module(model, example_inputs=(x,) if with_inputs else None)
    assert type(folded) is DataDependent
    assert sorted((f.bn, f.producer) for f in report.folded) == [("head.1", "head.0"), ("stem.1", "stem.0")]
    s = only_skipped(FoldReport(skipped=report.skipped))
    assert s.bn == "bn" and s.reason is SkipReason.UNTRACEABLE
    assert "DataDependent.forward" in s.detail and "TraceError" in s.detail
    assert bn_modules(folded) == ["bn"]
    for sample in (x, -x, torch.randn(1, 3, 5, 5)):  # both branches
        with torch.no_grad():
            ref, out = model(sample), folded(sample)
        assert rel_err(ref, out) <= RTOL[torch.float32]


class ReachesIntoChild(nn.Module):
    """Untraceable, and its forward calls a grandchild BN directly: swapping that BN for an
    Identity inside the traceable child would change this second call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.block(x)
        if y.mean() > 100:
            return y
        return self.block[1](self.conv(y))


def test_untraceable_parent_calling_child_bn_blocks_the_swap_when_inputs_prove_it():
    model = randomize(ReachesIntoChild())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_module(model, example_inputs=(x,))
    s = only_skipped(report)
    assert s.bn == "block.1" and s.reason is SkipReason.UNTRACEABLE and "also called outside" in s.detail
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


# --------------------------------------------------------------------------- the result


def test_inplace_false_leaves_the_callers_module_bit_identical():
    model = randomize(Net()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(m) for k, m in model.named_modules()}
    folded, report = fold_module(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert len(report.folded) == 4 and not report.skipped
    assert model.training and all(m.training for m in model.modules())
    assert {k: id(m) for k, m in model.named_modules()} == ids
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert folded is not model


def test_inplace_true_returns_the_same_module_when_folds_are_swaps():
    model = randomize(Net())
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, example_inputs=(x,), inplace=True)
    assert folded is model and len(report.folded) == 4
    assert_same_outputs(ref, folded, x, rtol=RTOL[torch.float32])


def test_folded_result_keeps_class_and_state_dict_names():
    model = randomize(Net())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, example_inputs=(x,))
    assert type(folded) is Net
    assert [(f.bn, f.producer, f.producer_op) for f in report.folded] == [
        ("features.1", "features.0", "Conv2d"),
        ("features.4", "features.3", "Conv2d"),
        ("features.7", "features.6", "ConvTranspose2d"),
        ("bn", "fc", "Linear"),
    ]
    assert not any(".running_" in k for k in folded.state_dict())
    assert {"features.0.weight", "features.0.bias", "fc.weight"} <= folded.state_dict().keys()
    assert_same_outputs(model, folded, x, rtol=RTOL[torch.float32])


@pytest.mark.filterwarnings("ignore:The TorchScript type system")
@pytest.mark.parametrize("make", [Net, ReusedConv], ids=["swapped-module", "graph-module"])
def test_folded_result_works_with_jit_and_torch_export(make):
    model = randomize(make())
    x = torch.randn(2, 3 if make is Net else 4, 8, 8)
    folded, _ = fold_module(model, example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(folded, (x,))
        scripted = torch.jit.script(folded)
        exported = torch.export.export(folded, (x,)).module()
        for runner in (traced, scripted, exported):
            out = runner(x)
            for r, o in zip(
                ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)
            ):
                assert rel_err(r, o) <= RTOL[torch.float32]


def test_module_without_bn_is_returned_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    folded, report = fold_module(model)
    assert report == FoldReport() and type(folded) is nn.Sequential


def test_bad_arguments_raise_input_errors():
    from bnfold.errors import InputError

    with pytest.raises(InputError, match="expected a torch.nn.Module"):
        fold_module("model.pt")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="example_inputs"):
        fold_module(Net(), example_inputs={"x": torch.randn(1)})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="fails on them"):
        fold_module(randomize(Net()), example_inputs=(torch.randn(2, 5, 8, 8),))
    with pytest.raises(InputError, match="TorchScript"):
        fold_module(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()))


# --------------------------------------------------------------------------- against torch.fx's fuse


def _fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model))


FX_CASES = [
    ("reused-conv", ReusedConv, lambda: torch.randn(2, 4, 6, 6)),
    ("linear-on-3d-input-L-equals-F", lambda: LinearBN(6), lambda: torch.randn(3, 6, 6)),
]


@pytest.mark.parametrize(("make", "make_x"), [c[1:] for c in FX_CASES], ids=[c[0] for c in FX_CASES])
def test_fx_fuse_is_wrong_where_fold_module_is_right(make, make_x):
    """torch.fx.experimental.optimization.fuse scales the shared conv in place (the second
    call changes) and folds Linear->BatchNorm1d on (N, L, F) input with the wrong axis.
    fold_module matches the unfolded module on both. If fx gets fixed, only ours is asserted."""
    model = randomize(make())
    x = make_x()
    with torch.no_grad():
        ref = model(x)
        ours = fold_module(model, example_inputs=(x,))[0](x)
        theirs = _fx_fuse(model)(x)
    flat = lambda t: torch.cat([v.reshape(-1) for v in (t if isinstance(t, tuple) else (t,))])
    assert rel_err(flat(ref), flat(ours)) <= RTOL[torch.float32]
    fx_err = rel_err(flat(ref), flat(theirs))
    if fx_err <= RTOL[torch.float32]:
        pytest.skip(f"torch.fx fuse is right here now (error {fx_err:.3g}); ours was checked")
    assert fx_err > 1e-2


# --------------------------------------------------------------------------- the model zoo


def _zoo_names() -> list[str]:
    try:
        from models import registry
    except ImportError:
        return []
    return [n for n in registry.names() if registry.get(n).source == "torch"]


MODULE_LEVEL_SKIPS = {
    "densenet": (7, {SkipReason.UNSUPPORTED_PRODUCER}),  # pre-activation BN after Concat
    "linear-bn1d-3d": (2, {SkipReason.CHANNEL_AXIS_MISMATCH}),  # BN1d on (N, L, F)
    "linear-transpose-bn1d": (1, {SkipReason.UNSUPPORTED_PRODUCER}),  # BN after transpose
    "demo": (1, {SkipReason.UNSUPPORTED_PRODUCER}),  # BN after Concat
}


@pytest.mark.parametrize("name", _zoo_names() or ["(no registry)"])
def test_zoo_models_fold_exactly(name):
    if name == "(no registry)":
        pytest.skip("models.registry is not available")
    from models import registry

    model, args = registry.build_torch(name), registry.example_inputs(name)
    folded, report = fold_module(model, example_inputs=args)
    n_skip, reasons = MODULE_LEVEL_SKIPS.get(name, (0, set()))
    assert report.bn_total == len(bn_modules(model)) == registry.get(name).bn_count
    assert len(report.skipped) == n_skip and {s.reason for s in report.skipped} <= reasons, report.skipped
    assert len(bn_modules(folded)) == n_skip
    with torch.no_grad():
        ref, out = model(*args), folded(*args)
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert rel_err(r, o) <= 1e-4
