"""Safe folding end to end (bnfold.verify.rollback through bnfold.api): fold, verify, revert
exactly the wrong folds, verify again.

A wrong fold is injected deterministically: the pass that bnfold.api runs is wrapped so that the
Conv absorbing each BN named in ``targets`` gets channel 1 of its folded weight off by a given
relative error. 1e-2 is visible to onnxruntime; 1e-5 is under float32 noise at rtol 1e-4 and only
the static weights check (bnfold.verify.weights) sees it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import SkipReason, VerificationError, VerifyReport, VerifyStatus, api, count_bn
from bnfold.api import fold_onnx, fold_path
from bnfold.verify import run as verify_run
from conftest import assert_close, run_ort
from onnx_builders import G

BLOCKS = 3


def conv_chain(rng: np.random.Generator, *, custom_op: bool = False) -> G:
    """x -> [Conv -> BN (bn<i> writes z<i>) -> Relu] * 3 -> out; optionally a custom op at the end."""
    g = G(rng)
    prev, cin = g.input("x", [2, 3, 8, 8]), 3
    for i in range(BLOCKS):
        w = g.init(f"W{i}", rng.normal(0, 0.5, (6, cin, 3, 3)).astype(np.float32))
        b = g.init(f"B{i}", rng.normal(0, 1, 6).astype(np.float32))
        g.node("Conv", [prev, w, b], [f"c{i}"], pads=[1, 1, 1, 1])
        g.bn(f"c{i}", 6, f"z{i}", prefix=f"bn{i}")
        prev = f"r{i}" if i < BLOCKS - 1 or custom_op else "out"
        g.node("Relu", [f"z{i}"], [prev])
        cin = 6
    if custom_op:
        g.nodes.append(
            onnx.helper.make_node("FancyRelu", [prev], ["out"], domain="com.example", name="fancy")
        )
    g.output("out", shape=[None] * 4)
    return g


def model_of(g: G, *, custom_op: bool = False) -> onnx.ModelProto:
    m = g.model()
    if custom_op:
        m.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    return m


@pytest.fixture
def corrupt(monkeypatch):
    """``corrupt({"z1": 1e-2})``: after the pass, the Conv now writing z1 has channel 1 of its
    folded weight scaled by (1 + 1e-2)."""

    def install(targets: dict[str, float]) -> None:
        real = api.fold_model

        def wrong(model, **kwargs):
            report = real(model, **kwargs)
            inits = {t.name: t for t in model.graph.initializer}
            for node in model.graph.node:
                if node.op_type == "Conv" and node.output[0] in targets:
                    w = numpy_helper.to_array(inits[node.input[1]]).copy()
                    w[1] *= np.float32(1 + targets[node.output[0]])
                    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
            return report

        monkeypatch.setattr(api, "fold_model", wrong)

    return install


@pytest.fixture
def verify_calls(monkeypatch):
    """Counts verify() calls made by the safe loop (it calls bnfold.verify.run.verify_with)."""
    calls = []
    real = verify_run.verify_with

    def counting(*args, **kwargs):
        report = real(*args, **kwargs)
        calls.append(report)
        return report

    monkeypatch.setattr(verify_run, "verify_with", counting)
    return calls


def writers(model: onnx.ModelProto) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output}


def no_staging_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".bnfold-")]


# --------------------------------------------------------------------------- fold_onnx(verify=True)


def test_correct_folds_pass_with_nothing_reverted(rng, verify_calls):
    g = conv_chain(rng)
    result = fold_onnx(model_of(g), verify=True)
    assert len(result.report.folded) == BLOCKS and not result.report.skipped
    assert result.verification.passed and len(result.verification.weights) == BLOCKS
    assert len(verify_calls) == 1
    assert count_bn(result.model) == 0


@pytest.mark.parametrize(
    "error, seen_by",
    [(1e-2, ("onnxruntime", "weights")), (1e-5, ("weights",))],
    ids=["visible-at-runtime", "under-float32-noise"],
)
def test_wrong_fold_is_reverted_exactly_and_the_others_stay_folded(
    rng, corrupt, verify_calls, error, seen_by
):
    g = conv_chain(rng)
    model = model_of(g)
    corrupt({"z1": error})
    result = fold_onnx(model, verify=True)

    # structure: bn1 is back, the other two BNs are absorbed by their Conv
    assert [n.name for n in result.model.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    assert {writers(result.model)[z] for z in ("z0", "z1", "z2")} == {"Conv", "BatchNormalization"}
    assert writers(result.model)["z0"] == writers(result.model)["z2"] == "Conv"
    # report
    (skip,) = result.report.skipped
    assert (skip.bn, skip.output, skip.reason) == ("bn1", "z1", SkipReason.VERIFICATION_FAILED)
    assert skip.detail.endswith(")") and "channel 1" in skip.detail
    assert ("onnxruntime" in skip.detail) is ("onnxruntime" in seen_by)
    assert "weights" in skip.detail
    assert sorted(f.output for f in result.report.folded) == ["z0", "z2"]
    v = result.verification
    assert v.passed and v.suspect_folds == ("z1",) and len(v.weights) == BLOCKS - 1
    assert len(verify_calls) == 2  # one failure, one pass after the revert
    assert verify_calls[0].first_divergent == ("z1",)
    # numbers
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds), rtol=1e-5)


def test_two_wrong_folds_are_both_reverted_in_one_round(rng, corrupt, verify_calls):
    """The weights check names each wrong fold itself, so a wrong fold downstream of another one
    is not hidden behind it: one round reverts both."""
    g = conv_chain(rng)
    corrupt({"z0": 1e-3, "z2": 1e-3})
    result = fold_onnx(model_of(g), verify=True)
    assert sorted(s.output for s in result.report.skipped) == ["z0", "z2"]
    assert all(s.reason is SkipReason.VERIFICATION_FAILED for s in result.report.skipped)
    assert [f.output for f in result.report.folded] == ["z1"]
    assert len(verify_calls) == 2 and verify_calls[0].first_divergent == ("z0", "z2")


def test_fold_reverted_wholesale_is_not_described_as_diverged(rng, monkeypatch):
    """When a failure cannot be attributed to a fold, every fold is reverted; before the fix each
    got the sentence "its output diverged under onnxruntime (max rel error 1e-07, ...)" quoting
    its own tensor, which had matched."""
    real = verify_run.verify_with

    def unattributed(*args, **kwargs):
        report = real(*args, **kwargs)
        return dataclasses.replace(report, status=VerifyStatus.FAILED, message="forced", first_divergent=())

    monkeypatch.setattr(verify_run, "verify_with", unattributed)
    with pytest.raises(VerificationError) as err:
        fold_onnx(model_of(conv_chain(rng)), verify=True)
    skipped = err.value.result.report.skipped
    assert len(skipped) == BLOCKS and all(s.reason is SkipReason.VERIFICATION_FAILED for s in skipped)
    assert all(
        s.detail == "the folded model's outputs diverged and this fold could not be cleared" for s in skipped
    )


def test_model_onnxruntime_cannot_run_raises_with_a_not_run_report(rng):
    g = conv_chain(rng, custom_op=True)
    with pytest.raises(VerificationError) as err:
        fold_onnx(model_of(g, custom_op=True), verify=True)
    report = err.value.report
    assert report.status is VerifyStatus.NOT_RUN and not report.passed
    assert "FancyRelu" in report.message and str(err.value).startswith("verification not run")


# --------------------------------------------------------------------------- fold_path


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_fold_path_writes_only_the_verified_model(rng, tmp_path, corrupt):
    g = conv_chain(rng)
    model = model_of(g)
    src, dst = save(model, tmp_path / "src.onnx"), tmp_path / "out" / "dst.onnx"
    dst.parent.mkdir()
    corrupt({"z2": 1e-5})
    result = fold_path(src, dst)
    assert result.verification.passed
    assert [(s.output, s.reason) for s in result.report.skipped] == [("z2", SkipReason.VERIFICATION_FAILED)]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.onnx"]  # no staging left behind
    written = onnx.load(str(dst))
    assert [n.name for n in written.graph.node if n.op_type == "BatchNormalization"] == ["bn2"]
    assert_close(run_ort(model, g.feeds), run_ort(written, g.feeds), rtol=1e-5)


def always_failing(*args, **kwargs) -> VerifyReport:
    return VerifyReport(status=VerifyStatus.FAILED, message="forced failure (test)")


@pytest.mark.parametrize("force", [False, True], ids=["refused", "force"])
def test_fold_path_that_cannot_pass_writes_nothing_unless_forced(rng, tmp_path, monkeypatch, force):
    src, dst = save(model_of(conv_chain(rng)), tmp_path / "src.onnx"), tmp_path / "out" / "dst.onnx"
    dst.parent.mkdir()
    monkeypatch.setattr(verify_run, "verify_with", always_failing)
    if not force:
        with pytest.raises(VerificationError) as err:
            fold_path(src, dst)
        assert err.value.report.status is VerifyStatus.FAILED and "forced failure" in str(err.value)
        assert not dst.exists()
    else:
        result = fold_path(src, dst, force=True)
        assert dst.exists() and result.verification.status is VerifyStatus.FAILED
        onnx.checker.check_model(str(dst))
    assert no_staging_left(dst.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.onnx"]


@pytest.mark.parametrize("force", [False, True], ids=["refused", "force"])
def test_fold_path_on_a_model_onnxruntime_cannot_run(rng, tmp_path, force):
    g = conv_chain(rng, custom_op=True)
    src, dst = save(model_of(g, custom_op=True), tmp_path / "src.onnx"), tmp_path / "dst.onnx"
    if not force:
        with pytest.raises(VerificationError) as err:
            fold_path(src, dst)
        assert err.value.report.status is VerifyStatus.NOT_RUN
        assert not dst.exists()
    else:
        result = fold_path(src, dst, force=True)
        assert result.verification.status is VerifyStatus.NOT_RUN
        assert count_bn(onnx.load(str(dst))) == 0 and len(result.report.folded) == BLOCKS
    assert no_staging_left(tmp_path)


# --------------------------------------------------------------------------- regressions found by safe folding


def bn_chain(rng: np.random.Generator, layer: str) -> G:
    """x -> layer without bias -> BN (a, writes z1) -> BN (b, writes z2) -> Relu -> out."""
    g = G(rng)
    if layer == "matmul":
        g.input("x", [2, 5])
        g.node("MatMul", ["x", g.init("W", rng.normal(0, 1, (5, 4)).astype(np.float32))], ["y"])
    else:
        g.input("x", [1, 3, 5, 5])
        w = g.init("W", rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32))
        g.node("Conv", ["x", w], ["y"])
        if layer == "conv-shared-weight":  # a second reader: the fold must clone W
            g.node("Conv", ["x", w], ["other"])
            g.output("other")
    g.bn("y", 4, "z1", prefix="a")
    g.bn("z1", 4, "z2", prefix="b")
    g.node("Relu", ["z2"], ["out"])
    g.output("out")
    return g


@pytest.mark.parametrize("layer", ["conv-no-bias", "conv-shared-weight", "matmul"])
def test_second_fold_into_a_constant_the_first_fold_created_is_kept(rng, layer, verify_calls):
    """Layer -> BN -> BN where the first fold creates an initializer (the bias of a bias-free
    layer, the clone of a shared weight) and the second fold rewrites it in place. The pass kept
    a reference to the tensor it had appended, but protobuf's append() stores a copy: the
    second fold's values went nowhere and the model was wrong (max abs error 2.4 on a conv).
    Safe folding caught it and reverted BN b, which is how it was found."""
    g = bn_chain(rng, layer)
    model = g.model()
    result = fold_onnx(model, verify=True)
    assert sorted(f.bn for f in result.report.folded) == ["a", "b"] and not result.report.skipped
    assert count_bn(result.model) == 0 and result.verification.passed and len(verify_calls) == 1
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds), rtol=1e-5)
