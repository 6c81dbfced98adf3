"""bnfold check's library (bnfold.cli.check): model discovery, per-model analysis, --against, many models, JUnit XML."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.cli import (
    CheckOptions,
    CheckResult,
    CheckStatus,
    ModelCheck,
    check_model,
    check_models,
    discover_models,
    stats_for_path,
)
from bnfold.cli.junit import junit_xml
from bnfold.errors import InputError
from bnfold.onnx.io import write_text_atomic
from bnfold.report import Folded, FoldReport, Skipped, SkipReason, VerifyReport, VerifyStatus
from cli_builders import conv_bn_model, save

# --------------------------------------------------------------------------------------------
# discover_models


def test_discover_directory_recurses_sorted_and_deduplicates(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in ("b.onnx", "a.onnx", "sub/c.onnx", "sub/deeper/d.onnx", "sub/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    found = discover_models([str(tmp_path), str(tmp_path / "a.onnx")])
    rel = [os.path.relpath(p, tmp_path) for p in found]
    assert rel == ["a.onnx", "b.onnx", os.path.join("sub", "c.onnx"), os.path.join("sub", "deeper", "d.onnx")]


def test_discover_expands_globs_itself(tmp_path: Path) -> None:
    for rel in ("m1.onnx", "m2.onnx", "other.onnx"):
        (tmp_path / rel).write_bytes(b"x")
    found = discover_models([str(tmp_path / "m*.onnx")])
    assert [os.path.basename(p) for p in found] == ["m1.onnx", "m2.onnx"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.onnx", "no such file or directory"),
        ("nothing-*.onnx", "no files match this pattern"),
        ("emptydir", "no .onnx files in this directory"),
    ],
    ids=["missing-file", "glob-matches-nothing", "dir-without-models"],
)
def test_discover_rejects_with_one_line_naming_the_path(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError) as info:
        discover_models([str(tmp_path / spec)])
    text = str(info.value)
    assert text.startswith(str(tmp_path / spec)) and message in text and "\n" not in text


# --------------------------------------------------------------------------------------------
# check_model


def test_check_model_reports_foldable_and_left_with_reasons(tmp_path: Path, rng: np.random.Generator) -> None:
    path = save(conv_bn_model(rng, second_bn=True), tmp_path / "m.onnx")
    before = Path(path).read_bytes()
    m = check_model(path)
    assert m.status is CheckStatus.FINDINGS
    assert m.report is not None
    assert [(f.bn, f.producer, f.producer_op) for f in m.report.folded] == [("bn1", "conv1", "Conv")]
    assert [(s.bn, s.reason) for s in m.report.skipped] == [("bn2", SkipReason.UNSUPPORTED_PRODUCER)]
    assert m.findings == ("bn1 can be folded into Conv conv1",)
    assert m.stats is not None and (m.stats.nodes, m.stats.batchnorm) == (4, 2)
    assert m.stats.bytes == len(before)
    assert Path(path).read_bytes() == before, "check must not touch the model"


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_training_mode_bn_is_left_and_only_strict_counts_it(
    tmp_path: Path, rng: np.random.Generator, strict: bool
) -> None:
    path = save(conv_bn_model(rng, training_mode=True), tmp_path / "train.onnx")
    m = check_model(path, options=CheckOptions(strict=strict))
    assert m.report is not None and not m.report.folded
    assert [(s.bn, s.reason) for s in m.report.skipped] == [("bn1", SkipReason.TRAINING_MODE)]
    assert m.status is (CheckStatus.FINDINGS if strict else CheckStatus.CLEAN)
    assert len(m.findings) == (1 if strict else 0)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "empty"), (b"this is not a model\n", "not an ONNX model")],
    ids=["empty", "text"],
)
def test_unreadable_model_is_an_error_entry_not_an_exception(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    m = check_model(str(path))
    assert m.status is CheckStatus.ERROR and m.error_type == "input-error"
    assert m.error is not None and str(path) in m.error and "\n" not in m.error
    assert needle.lower() in m.error.lower()


def test_against_equal_passes_and_perturbed_weight_is_a_finding(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    from bnfold import fold_onnx

    model = conv_bn_model(rng)
    original = save(model, tmp_path / "orig.onnx")
    folded = save(fold_onnx(model).model, tmp_path / "folded.onnx")
    other = save(conv_bn_model(np.random.default_rng(1), weight_delta=0.3), tmp_path / "other.onnx")

    same = check_model(folded, options=CheckOptions(against=original))
    assert same.status is CheckStatus.CLEAN, same.findings
    assert same.verification is not None and same.verification.status is VerifyStatus.PASSED
    assert same.report is not None and same.bn_foldable == 0

    differs = check_model(other, options=CheckOptions(against=original))
    assert differs.verification is not None and differs.verification.status is VerifyStatus.FAILED
    assert differs.status is CheckStatus.FINDINGS
    assert any(f.startswith(f"not equivalent to {original}") for f in differs.findings)


def test_check_models_in_worker_processes_keeps_order(tmp_path: Path, rng: np.random.Generator) -> None:
    paths = [
        save(conv_bn_model(rng), tmp_path / "a.onnx"),
        save(conv_bn_model(rng, training_mode=True), tmp_path / "b.onnx"),
    ]
    (tmp_path / "c.onnx").write_bytes(b"\x08\x07\x12")  # truncated protobuf
    paths.append(str(tmp_path / "c.onnx"))
    seen: list[str] = []
    result = check_models(paths, jobs=2, on_result=lambda m: seen.append(m.path))
    assert [m.path for m in result.models] == paths
    assert sorted(seen) == sorted(paths)
    assert [m.status for m in result.models] == [CheckStatus.FINDINGS, CheckStatus.CLEAN, CheckStatus.ERROR]
    assert result.exit_code == 2
    assert result.summary() == {
        "models": 3,
        "clean": 1,
        "findings": 1,
        "errors": 1,
        "bn_total": 2,
        "bn_foldable": 1,
        "bn_left": 1,
    }
    json.dumps(result.to_dict(), allow_nan=False)


def test_stats_count_external_data_bytes(tmp_path: Path, rng: np.random.Generator) -> None:
    model = conv_bn_model(rng)
    path = tmp_path / "ext.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    stats = stats_for_path(str(path))
    assert stats.external_files == ("ext.onnx.data",)
    assert stats.bytes == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size


# --------------------------------------------------------------------------------------------
# JUnit XML and exit codes, from hand-made results


def _result() -> CheckResult:
    folded = Folded(bn="bn1", producer="conv1", producer_op="Conv", output="bn1_out")
    left = Skipped(
        bn="bn2", reason=SkipReason.TRAINING_MODE, detail="BN uses batch statistics (training_mode=1)."
    )
    return CheckResult(
        models=(
            ModelCheck(
                path="clean.onnx", status=CheckStatus.CLEAN, report=FoldReport(skipped=(left,)), seconds=0.1
            ),
            ModelCheck(
                path="dirty.onnx",
                status=CheckStatus.FINDINGS,
                report=FoldReport(folded=(folded,)),
                verification=VerifyReport(status=VerifyStatus.FAILED, message="outputs differ"),
                findings=("bn1 can be folded into Conv conv1", "not equivalent to ref.onnx: outputs differ"),
            ),
            ModelCheck(
                path="bad.onnx",
                status=CheckStatus.ERROR,
                error="bad.onnx: empty file",
                error_type="input-error",
            ),
        ),
        seconds=0.5,
    )


def test_junit_xml_has_one_testcase_per_model_with_failure_and_error() -> None:
    root = ET.fromstring(junit_xml(_result()))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["clean.onnx", "dirty.onnx", "bad.onnx"]
    assert cases["clean.onnx"].find("failure") is None
    assert "training-mode" in (cases["clean.onnx"].findtext("system-out") or "")
    failure = cases["dirty.onnx"].find("failure")
    assert failure is not None and failure.get("type") == "foldable-batchnorm,verification-failed"
    assert "bn1 can be folded into Conv conv1" in (failure.text or "")
    error = cases["bad.onnx"].find("error")
    assert error is not None and error.get("message") == "bad.onnx: empty file"


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ((), 0),
        ((CheckStatus.CLEAN,), 0),
        ((CheckStatus.CLEAN, CheckStatus.FINDINGS), 1),
        ((CheckStatus.FINDINGS, CheckStatus.ERROR), 2),
    ],
    ids=["none", "clean", "findings", "error-wins"],
)
def test_exit_code_precedence(statuses: tuple[CheckStatus, ...], code: int) -> None:
    result = CheckResult(models=tuple(ModelCheck(path=f"{i}.onnx", status=s) for i, s in enumerate(statuses)))
    assert result.exit_code == code


def test_write_text_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new content")
    assert target.read_text() == "new content"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]
    with pytest.raises(InputError, match="cannot write"):
        write_text_atomic(tmp_path / "no-such-dir" / "r.json", "x")
