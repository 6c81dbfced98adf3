"""bnfold.api end to end: fold_path (lazy load, fold, atomic save, verification, layout kept, source
untouched; in place), the verification options as keywords or one VerifyOptions, fold_loaded against
a separate reference."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import VerificationError, VerifyReport, VerifyStatus, count_bn
from bnfold.api import fold_loaded, fold_onnx, fold_path
from bnfold.errors import InputError
from bnfold.verify import VerifyOptions
from bnfold.verify import run as verify_run
from conftest import assert_close, run_ort
from onnx_builders import conv_bn


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def write_model(rng, folder: Path, *, external: bool) -> tuple[Path, dict[str, np.ndarray]]:
    """Conv(64->64, 3x3: 147 KB of weights, above the lazy/external thresholds) -> BN -> Relu."""
    g = conv_bn(rng, cin=64, cout=64)
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(
        g.model(), str(path), save_as_external_data=external, location="model.onnx.data", size_threshold=1024
    )
    return path, {"x": g.feeds["x"]}


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_fold_path_folds_keeps_layout_and_leaves_the_source_alone(rng, tmp_path, external, verify):
    src, feeds = write_model(rng, tmp_path / "src", external=external)
    before = digest(src.parent)
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    result = fold_path(src, dst, verify=verify)

    assert digest(src.parent) == before, "the source model or its data file changed"
    assert len(result.report.folded) == 1
    assert (result.verification is not None) == verify
    if verify:
        assert result.verification.passed
    assert sorted(os.listdir(dst.parent)) == (
        ["folded.onnx", "folded.onnx.data"] if external else ["folded.onnx"]
    )
    folded = onnx.load(str(dst))
    assert count_bn(folded) == 0
    onnx.checker.check_model(str(dst), full_check=True)
    assert_close(run_ort(str(src), feeds), run_ort(str(dst), feeds))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_fold_path_needs_an_existing_output_directory(rng, tmp_path, verify):
    src, _ = write_model(rng, tmp_path / "src", external=False)
    with pytest.raises(InputError, match="does not exist"):
        fold_path(src, tmp_path / "missing" / "folded.onnx", verify=verify)
    assert not (tmp_path / "missing").exists()


def test_fold_path_refuses_to_overwrite_its_input(rng, tmp_path):
    src, _ = write_model(rng, tmp_path / "src", external=False)
    before = digest(src.parent)
    with pytest.raises(InputError, match="refusing to overwrite"):
        fold_path(src, src)
    assert digest(src.parent) == before


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_fold_path_in_place_replaces_the_source_with_its_fold(rng, tmp_path, external, verify):
    src, feeds = write_model(rng, tmp_path / "src", external=external)
    expected = run_ort(str(src), feeds)
    result = fold_path(src, in_place=True, verify=verify)
    assert len(result.report.folded) == 1 and (result.verification is not None) == verify
    # external data goes to a fresh name, the model is swapped in, then the old data removed
    (model, *data) = sorted(os.listdir(src.parent))
    assert model == "model.onnx" and len(data) == external and all(d.endswith(".data") for d in data)
    assert count_bn(onnx.load(str(src))) == 0
    onnx.checker.check_model(str(src), full_check=True)
    assert_close(expected, run_ort(str(src), feeds))


def test_fold_path_in_place_that_fails_verification_leaves_the_source_as_it_was(rng, tmp_path, monkeypatch):
    src, _ = write_model(rng, tmp_path / "src", external=True)
    before = digest(src.parent)
    failing = VerifyReport(status=VerifyStatus.FAILED, message="forced failure (test)")
    monkeypatch.setattr(verify_run, "verify_with", lambda *a, **k: failing)
    with pytest.raises(VerificationError, match="forced failure"):
        fold_path(src, in_place=True)
    assert digest(src.parent) == before


def test_fold_path_in_place_names_no_other_file(rng, tmp_path):
    src, _ = write_model(rng, tmp_path / "src", external=False)
    with pytest.raises(InputError, match="in_place"):
        fold_path(src, tmp_path / "other.onnx", in_place=True)
    with pytest.raises(InputError, match="in_place"):
        fold_path(src)


def test_options_as_one_verify_options_or_as_keywords_give_the_same_run(rng):
    model = conv_bn(rng).model()
    by_keywords = fold_onnx(model, verify=True, seed=3, samples=2, rtol=1e-3).verification
    by_options = fold_onnx(
        model, verify=True, options=VerifyOptions(seed=3, samples=2, rtol=1e-3)
    ).verification
    for v in (by_keywords, by_options):
        assert v.passed and (v.seed, v.samples) == (3, 2) and v.outputs[0].rtol == 1e-3
    assert [d.max_abs for d in by_keywords.intermediates] == [d.max_abs for d in by_options.intermediates]


def test_options_and_keywords_together_are_refused(rng):
    with pytest.raises(InputError, match="not both"):
        fold_onnx(conv_bn(rng).model(), verify=True, seed=1, options=VerifyOptions(seed=2))


def test_fold_loaded_verifies_against_a_separate_reference(rng):
    """The torch export's shape: the candidate was exported from a module folded already, the
    reference is the export of the unfolded module; their intermediate names need not agree."""
    g = conv_bn(rng)
    reference = g.model()
    candidate = g.model()
    result = fold_loaded(candidate, reference=reference, verify=True, intermediates=False, inplace=True)
    assert result.model is candidate and count_bn(candidate) == 0
    assert result.verification.passed and result.verification.compared_on == "outputs"
    assert not result.verification.intermediates and not result.verification.weights


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """Any onnxruntime session raises: proves a run needed none."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an onnxruntime session was created")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def relu_only(rng) -> onnx.ModelProto:
    g = conv_bn(rng)
    model = g.model()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for a in bn.attribute:
        if a.name == "training_mode":
            break
    else:
        bn.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    bn.output.extend(["rm", "rv"])  # training mode wants its statistics outputs
    return model


def test_nothing_folded_needs_no_onnxruntime_run(rng, tmp_path, no_onnxruntime):
    """Issue 13: verification ran in full when nothing was folded (22 s and 2 GB for a MaxViT
    export with zero folds). An unchanged graph is the reference."""
    model = relu_only(rng)
    result = fold_onnx(model, verify=True)
    assert not result.report.folded and result.report.skipped
    v = result.verification
    assert v.passed and v.compared_on == "unchanged" and v.samples == 0 and "no onnxruntime run" in v.message
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    result = fold_path(src, tmp_path / "out.onnx")
    assert result.verification.compared_on == "unchanged" and (tmp_path / "out.onnx").exists()


def test_a_fold_is_still_verified_with_onnxruntime(rng):
    result = fold_onnx(conv_bn(rng).model(), verify=True)
    assert result.report.folded and result.verification.compared_on == "outputs+intermediates"
    assert result.verification.samples == 3


def test_progress_names_each_step_and_each_sample(rng, tmp_path):
    """Issue 13: long verifications show the step and the samples done (the CLI adds the time)."""
    src, _ = write_model(rng, tmp_path / "src", external=False)
    steps: list[str] = []
    fold_path(src, tmp_path / "out.onnx", samples=2, progress=steps.append)
    assert steps[:4] == ["loading", "folding", "saving", "verifying"]
    assert steps[4:] == [
        "verifying: the candidate at ORT_ENABLE_ALL",
        "verifying: calibrating (the reference at ORT_ENABLE_BASIC)",
        "verifying: sample 1/2",
        "verifying: sample 2/2",
        "verifying: folded weights",
    ]


def test_unchanged_model_with_large_weights_is_not_run(tmp_path, monkeypatch):
    """fold_path compared the folded graph with a second lazy load of the source, whose weight
    stubs carry other tokens: a model with large weights and nothing to fold was always run by
    onnxruntime (and any memory bomb in it executed). Compared within one load, it is not."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bnfold import fold_path
    from bnfold.verify import run as vrun

    w = numpy_helper.from_array(
        np.random.default_rng(5).standard_normal((64, 64, 3, 3)).astype(np.float32), "W"
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)

    def no_run(*args, **kwargs):
        raise AssertionError("onnxruntime ran an unchanged model")

    monkeypatch.setattr(vrun, "verify_with", no_run)
    result = fold_path(src, tmp_path / "o.onnx")
    assert result.verification.passed and result.verification.compared_on == "unchanged"
