"""Undecided folds (issue 14): a large fold into a weight in a file skips the decision's read
pass and is checked where it is written (``bnfold.fold_optimistic``); when the check fails the
file fold runs again deciding every fold first. Either way the output must be the decided
fold's, bit for bit, with the same report -- these tests run both side by side on the same
files (zoo, converter models, large-100, hostile weights) and count the second runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from zoo_layouts import CONV_MODELS, read_files, write_layouts

import bnfold.api
import bnfold.onnx.absorb
from bnfold import fold_math, fold_optimistic
from bnfold.api import fold_onnx, fold_path
from bnfold.onnx.io import load, load_model, read_array, save_model, scaled_of, sink
from conftest import bn_stats

registry = pytest.importorskip("models.registry")
pytest.importorskip("torch")

NAMES = registry.names(large=False) + registry.converter_names()
UNDECIDES = CONV_MODELS
"""Models whose Conv folds must be left undecided (the test proves something)."""


class Spy:
    """Counts undecided recipes made and the runs of the pass, with their ``optimistic`` flag."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.undecided = 0
        self.runs: list[bool] = []
        self.frozen = False
        make, fold = bnfold.onnx.absorb.scale_weight_undecided, bnfold.api.fold_model

        def counting_make(*args, **kwargs):
            out = make(*args, **kwargs)
            self.undecided += out is not None
            return out

        def counting_fold(*args, **kwargs):
            if not self.frozen:
                self.runs.append(kwargs.get("optimistic", False))
            return fold(*args, **kwargs)

        monkeypatch.setattr(bnfold.onnx.absorb, "scale_weight_undecided", counting_make)
        monkeypatch.setattr(bnfold.api, "fold_model", counting_fold)

    def freeze(self) -> None:
        """Count no more runs (the decided reference's)."""
        self.frozen = True

    @property
    def fallbacks(self) -> int:
        """Decided runs after an undecided one."""
        return sum(1 for prev, cur in zip(self.runs, self.runs[1:]) if prev and not cur)


@pytest.fixture
def small_thresholds(monkeypatch):
    """Every payload a stub, every fold deferrable and left undecided."""
    monkeypatch.setattr(load, "LAZY_THRESHOLD", 0)
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    monkeypatch.setattr(fold_optimistic, "OPTIMISTIC_MIN_BYTES", 0)


def _both(src: str, tmp_path, monkeypatch, **kwargs):
    """``(files, result, spy)`` of the undecided fold and ``(files, result)`` of the decided one."""
    spy = Spy(monkeypatch)
    folder = tmp_path / "undecided"
    folder.mkdir()
    result = fold_path(src, str(folder / "out.onnx"), **kwargs)
    files = read_files(str(folder))
    spy.freeze()
    with monkeypatch.context() as m:
        m.setattr(fold_optimistic, "OPTIMISTIC_MIN_BYTES", 1 << 62)  # nothing left undecided
        before = spy.undecided
        ref_folder = tmp_path / "decided"
        ref_folder.mkdir()
        reference = fold_path(src, str(ref_folder / "out.onnx"), **kwargs)
        assert spy.undecided == before
    return (files, result, spy), (read_files(str(ref_folder)), reference)


def _assert_same(undecided, decided) -> None:
    files, result, _ = undecided
    ref_files, reference = decided
    assert result.report == reference.report
    assert files.keys() == ref_files.keys()
    for name in files:
        assert files[name] == ref_files[name], name


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each model as a file with embedded weights and as one with every tensor in a data file."""
    return write_layouts(tmp_path_factory.mktemp("optimistic"), NAMES)


@pytest.mark.parametrize("layout", ["embedded", "external", "external-row-blocks", "external-row-checks"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_undecided_fold_is_bit_identical_to_the_decided_fold(
    name, layout, sources, tmp_path, monkeypatch, small_thresholds
):
    """Without the checks where values are written, a fold the decision refuses would be
    written; without the same multiply, a last bit would differ. Ordinary weights never need
    the second run. ``row-blocks``: one row per block, every tensor checked in many blocks;
    ``row-checks``: blocks as usual, each computed and checked a row at a time."""
    src = sources[name][0 if layout == "embedded" else 1]
    if layout == "external-row-blocks":
        monkeypatch.setattr(sink, "SCALE_BLOCK", 1)
    if layout == "external-row-checks":
        monkeypatch.setattr(sink, "CHECK_BLOCK", 1)
    undecided, decided = _both(src, tmp_path, monkeypatch, verify=False)
    _assert_same(undecided, decided)
    spy = undecided[2]
    assert spy.fallbacks == 0
    if name in UNDECIDES:
        assert spy.undecided, "no fold was left undecided"
        assert any(scaled_of(t) is not None for t in undecided[1].model.graph.initializer)


def test_large_model_with_default_thresholds(tmp_path, monkeypatch):
    """large-100 (2.4 MB Conv weights) takes the undecided path as shipped: same bytes, same
    report, one run of the pass; the folded tensors read back as the decided values."""
    src = str(registry.build_onnx("large-100"))
    undecided, decided = _both(src, tmp_path, monkeypatch, verify=False)
    _assert_same(undecided, decided)
    spy = undecided[2]
    assert spy.undecided >= 40 and spy.runs == [True]
    model = undecided[1].model
    written = {t.name: t for t in load_model(str(tmp_path / "decided" / "out.onnx")).graph.initializer}
    deferred = [t for t in model.graph.initializer if scaled_of(t) is not None]
    assert deferred
    for t in deferred[:3]:
        np.testing.assert_array_equal(read_array(t, os.path.dirname(src)), read_array(written[t.name]))


# --------------------------------------------------------------------------- hostile weights

C, K = 64, 16
TINY = {
    np.dtype(np.float16): (1e-7, 1e-4),
    np.dtype(np.float32): (1e-30, 1e-20),
    np.dtype(np.float64): (1e-200, 1e-200),
}
"""A weight and a scale, each representable, whose product rounds to zero in the dtype."""


def _conv_bn(dtype, rng, case: str) -> onnx.ModelProto:
    """Conv (C, K, 3, 3) + BN, with one channel made hostile by ``case``."""
    dtype = np.dtype(dtype)
    w = rng.standard_normal((C, K, 3, 3)).astype(dtype)
    gamma, beta, mean, var = (a.astype(np.float64) for a in bn_stats(rng, C, np.float64))
    shared = case.endswith("-shared")  # a second Conv reads the weight: the fold gets a copy
    double = case.endswith("-double")  # a second BN: its fold reads the first one's result
    case = case.removesuffix("-shared").removesuffix("-double")
    if case == "overflow":  # channel 3 overflows float16
        w[3] = 60000.0
        gamma[3] = 4.0
    elif case == "flush-channel":  # channel 5 rounds to zero entirely
        w[5] = TINY[dtype][0]
        gamma[5], var[5] = TINY[dtype][1], 1.0
    elif case == "flush-partly":  # one value of channel 5 rounds to zero, the rest does not
        w[5] = 1.0
        w[5, 0, 0, 0] = TINY[dtype][0]
        gamma[5], var[5] = TINY[dtype][1], 1.0
    elif case == "nan":
        w[2, 1, 1, 1] = np.nan
    elif case == "inf":
        w[2, 1, 1, 1] = np.inf
    elif case == "zero-scale":
        gamma[4] = 0.0
    elif case == "negative-scale":
        gamma = -np.abs(gamma)
    elif case == "overflow-bias":  # weight and bias of channel 3 overflow float16
        w[3] = 60000.0
        gamma[3], beta[3], mean[3] = 4.0, 60000.0, -20000.0
    stats = [a.astype(dtype) for a in (gamma, beta, mean, var)]
    bias = rng.standard_normal(C).astype(dtype)
    inits = [numpy_helper.from_array(a, n) for a, n in zip((w, bias, *stats), ["w", "c", "g", "b", "m", "v"])]
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    nodes = [
        helper.make_node("Conv", ["x", "w", "c"], ["y0"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["y0", "g", "b", "m", "v"], ["y1" if double else "y"], name="bn"
        ),
    ]
    if double:
        second = [a.astype(dtype) for a in bn_stats(rng, C, np.float64)]
        inits += [numpy_helper.from_array(a, n) for a, n in zip(second, ["g2", "b2", "m2", "v2"])]
        nodes.append(
            helper.make_node("BatchNormalization", ["y1", "g2", "b2", "m2", "v2"], ["y"], name="bn2")
        )
    outputs = [helper.make_tensor_value_info("y", elem, [1, C, 6, 6])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", elem, [1, C, 6, 6]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, [1, K, 8, 8])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


HOSTILE = [
    # (dtype, case, the second run is needed)
    (np.float16, "ordinary", False),
    (np.float32, "ordinary", False),
    (np.float64, "ordinary", False),
    (np.float16, "overflow", True),
    (np.float16, "overflow-bias", True),
    (np.float32, "flush-channel", True),
    (np.float32, "flush-partly", True),
    (np.float16, "flush-partly", True),
    (np.float32, "nan", True),
    (np.float16, "inf", True),
    (np.float32, "zero-scale", True),
    (np.float64, "negative-scale", False),
    (np.float16, "overflow-shared", True),  # decided where the copy is made: ScaledWeight.apply
    (np.float32, "flush-partly-shared", False),  # ... by the decision itself, which accepts it
    (np.float32, "ordinary-double", False),
    (np.float32, "flush-partly-double", False),  # read back (and decided) by the second fold
    (np.float16, "overflow-double", True),
]


@pytest.mark.parametrize("layout", ["embedded", "external", "external-row-checks"])
@pytest.mark.parametrize("dtype,case,again", HOSTILE, ids=[f"{np.dtype(d).name}-{c}" for d, c, _ in HOSTILE])
def test_hostile_weights_give_the_decided_report_and_bytes(
    dtype, case, again, layout, rng, tmp_path, monkeypatch, small_thresholds
):
    """Overflow, whole and partial flush to zero, NaN/inf in the weight, zero and negative
    scales: the report (reasons included) and the bytes are the decided fold's. A partly
    flushed channel, which the decision accepts, fails the stricter check where it is written
    and is folded again (counted); ordinary weights are folded once. ``overflow-bias``: the
    bias refuses the plan before the weight is computed, so only the check at the end of the
    pass sees that the decision refuses the weight too (and reports it first)."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    model = _conv_bn(dtype, rng, case)
    if layout == "external-row-checks":  # the failing rows are checked alone, after others passed
        monkeypatch.setattr(sink, "CHECK_BLOCK", 1)
    if layout != "embedded":
        onnx.save(model, str(src), save_as_external_data=True, location="w.bin", size_threshold=0)
    else:
        onnx.save(model, str(src))
    undecided, decided = _both(str(src), tmp_path, monkeypatch, verify=False)
    _assert_same(undecided, decided)
    spy = undecided[2]
    assert spy.undecided >= 1
    assert spy.fallbacks == (1 if again else 0), spy.runs
    report = decided[1].report
    if case in ("overflow", "flush-channel", "overflow-bias", "overflow-shared", "overflow-double"):
        assert not report.folded and report.skipped[0].reason.value == "not-representable"
        assert "the weight" in report.skipped[0].detail
    elif case in ("flush-partly", "zero-scale", "negative-scale", "ordinary", "nan", "flush-partly-shared"):
        assert len(report.folded) == 1
    elif case.endswith("-double"):
        assert len(report.folded) == 2


def test_fallback_of_a_verified_fold_leaves_no_stagingread_files(
    rng, tmp_path, monkeypatch, small_thresholds
):
    """The verifying fold stages its candidate; a run abandoned for a second one must remove
    it (and the second run publish the decided fold), in place too."""
    pytest.importorskip("onnxruntime")
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(
        _conv_bn(np.float32, rng, "flush-partly"), str(src), save_as_external_data=True, size_threshold=0
    )
    undecided, decided = _both(str(src), tmp_path, monkeypatch, verify=True)
    _assert_same(undecided, decided)
    assert undecided[2].fallbacks == 1
    for folder in ("undecided", "decided"):
        assert sorted(os.listdir(tmp_path / folder)) == ["out.onnx", "out.onnx.data"]
    spy = Spy(monkeypatch)
    fold_path(str(src), in_place=True, verify=False)
    assert spy.fallbacks == 1
    assert not [n for n in os.listdir(src.parent) if n.startswith(".")]  # no staging folder
    assert [n.op_type for n in load_model(str(src)).graph.node] == ["Conv"]


def test_cli_fold_gives_the_decided_file_after_a_second_run(rng, tmp_path, monkeypatch, small_thresholds):
    """``bnfold SRC -o OUT --no-verify`` runs api.fold_path: its fallback is the CLI's too."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(np.float16, rng, "flush-partly"), str(src))
    spy = Spy(monkeypatch)
    (tmp_path / "cli").mkdir()
    out = tmp_path / "cli" / "out.onnx"
    result = CliRunner().invoke(app, [str(src), "-o", str(out), "--no-verify", "-q"])
    assert result.exit_code == 0, result.output
    assert spy.fallbacks == 1
    monkeypatch.setattr(fold_optimistic, "OPTIMISTIC_MIN_BYTES", 1 << 62)
    ref = tmp_path / "ref.onnx"
    fold_path(str(src), str(ref), verify=False)
    assert out.read_bytes() == ref.read_bytes()
    assert os.listdir(tmp_path / "cli") == ["out.onnx"]


def test_fold_onnx_never_leaves_a_fold_undecided(rng, tmp_path, monkeypatch, small_thresholds):
    """fold_onnx returns the model to the caller, who may save it with nothing to redo a
    refused fold: its folds are all decided, even into weights in files."""
    src = tmp_path / "model.onnx"
    onnx.save(
        _conv_bn(np.float32, rng, "flush-partly"), str(src), save_as_external_data=True, size_threshold=0
    )
    spy = Spy(monkeypatch)
    model = load_model(str(src), lazy=True)
    result = fold_onnx(model, inplace=True, base_dir=str(tmp_path))
    assert spy.undecided == 0
    deferred = [scaled_of(t) for t in result.model.graph.initializer if scaled_of(t) is not None]
    assert deferred and all(r.decided for r in deferred)
    save_model(result.model, str(tmp_path / "out.onnx"))


# --------------------------------------------------------------------------- the checks alone


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rows_accepted_refuses_what_the_decision_might(dtype):
    """Each refusal the decision can make fails the check; partial flushes and zero scales fail
    it too (stricter), ordinary rows and rows with zeros in the weight pass."""
    dtype = np.dtype(dtype)
    w = np.linspace(-2, 2, 4 * 32).reshape(4, 32).astype(dtype)
    w[w == 0] = 1
    ok = fold_optimistic.rows_accepted
    s = np.array([0.5, -3.0, 2.0, 1.0])

    def scaled(w, s):
        out = np.empty_like(w)
        with np.errstate(all="ignore"):
            np.multiply(w, s[:, None], out=out, dtype=np.float64, casting="unsafe")
        return out

    assert ok(w, scaled(w, s))
    zeros = w.copy()
    zeros[1, :5] = 0
    zeros[2, 3] = -0.0
    assert ok(zeros, scaled(zeros, s))
    big = np.finfo(dtype).max
    assert not ok(w, scaled(w, np.array([big, 1.0, 1.0, 1.0])))  # overflow (row 0: |w| >= 1)
    nan = w.copy()
    nan[0, 0] = np.nan
    assert not ok(nan, scaled(nan, s))
    inf = w.copy()
    inf[3, 7] = -np.inf
    assert not ok(inf, scaled(inf, s))
    tiny = np.finfo(dtype).smallest_subnormal
    partly = w.copy()
    partly[2, 0] = tiny
    assert not ok(partly, scaled(partly, np.array([1.0, 1.0, 0.25, 1.0])))  # one value flushed
    assert not ok(w, scaled(w, np.array([1.0, 0.0, 1.0, 1.0])))  # zero scale


def test_apply_of_an_undecided_recipe_decides_it(small_thresholds):
    """apply() (read_array, embedded saves, a second fold into the weight) decides as
    scale_weight_exact does: the same values when it accepts, Undecided when it refuses."""
    w = np.arange(1, 7 * 12 + 1, dtype=np.float16).reshape(7, 12)
    with fold_optimistic.undecided_folds(True) as tickets:
        fine = fold_optimistic.scale_weight_undecided(w, np.linspace(-2, 2, 7), axis=0)
        bad = fold_optimistic.scale_weight_undecided(w, np.full(7, 1e4), axis=0)
        assert fold_optimistic.scale_weight_undecided(w, np.ones(12), axis=1) is None
    assert fold_optimistic.scale_weight_undecided(w, np.ones(7), axis=0) is None  # outside the block
    assert fine is not None and bad is not None and not fine.decided
    expected, _ = fold_math.scale_weight_exact(w, np.linspace(-2, 2, 7), axis=0)
    np.testing.assert_array_equal(fine.apply(), expected)
    with pytest.raises(fold_math.Undecided, match="overflows float16"):
        bad.apply()
    assert [t.is_checked for t in tickets.items] == [True, False]


def test_settle_decides_what_no_write_will_check(small_thresholds):
    """A recipe whose plan was not taken is decided at the end of the pass; one handed to a
    tensor that left the model was checked nowhere, so the pass cannot vouch for it."""
    w = np.ones((4, 3), dtype=np.float16)
    with fold_optimistic.undecided_folds(True) as tickets:
        fine = fold_optimistic.scale_weight_undecided(w, np.full(4, 2.0), axis=0)
    tickets.settle(set())
    assert fine.ticket.is_checked
    with fold_optimistic.undecided_folds(True) as tickets:
        fold_optimistic.scale_weight_undecided(w, np.full(4, 1e6), axis=0)
    with pytest.raises(fold_math.Undecided, match="overflows"):
        tickets.settle(set())
    with fold_optimistic.undecided_folds(True) as tickets:
        dropped = fold_optimistic.scale_weight_undecided(w, np.full(4, 2.0), axis=0)
    dropped.ticket.deferred()
    tickets.settle({id(dropped.ticket)})
    with pytest.raises(fold_math.Undecided, match="left the model"):
        tickets.settle(set())
