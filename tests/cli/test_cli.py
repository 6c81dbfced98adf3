"""The bnfold command line: typer's CliRunner for options, output and exit codes, and a few
subprocess runs of the installed ``bnfold`` entry point end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from bnfold.cli import app, normalize_json_args, parse_shape
from bnfold.report import (
    FoldReport,
    Skipped,
    SkipReason,
    TensorDiff,
    VerifyReport,
    VerifyStatus,
)
from cli_builders import FACTORY_SOURCE, conv_bn_model, save
from conftest import run_ort

runner = CliRunner()

FOLD_KEYS = {
    "schema_version",
    "bnfold_version",
    "command",
    "input",
    "output",
    "written",
    "exit_code",
    "error",
    "strict",
    "seconds",
    "before",
    "after",
    "report",
    "module_report",
    "verification",
    "export",
    "input_casts",
}
CHECK_KEYS = {
    "schema_version",
    "bnfold_version",
    "command",
    "against",
    "strict",
    "exit_code",
    "seconds",
    "summary",
    "models",
}
MODEL_KEYS = {
    "path",
    "status",
    "bn_total",
    "bn_foldable",
    "bn_left",
    "findings",
    "report",
    "verification",
    "nodes",
    "bytes",
    "error",
    "error_type",
    "seconds",
}
REPORT_KEYS = {"bn_folded", "bn_left", "folded", "skipped"}
VERIFY_KEYS = {
    "status",
    "passed",
    "outputs",
    "intermediates",
    "inputs",
    "samples",
    "seed",
    "input_source",
    "compared_on",
    "first_divergent",
    "suspect_folds",
    "message",
    "onnxruntime_version",
    "provider",
    "candidate_runs_optimized",
    "seconds",
}
DIFF_KEYS = {
    "name",
    "kind",
    "shape",
    "dtype",
    "max_abs",
    "max_rel",
    "mean_abs",
    "mismatched",
    "total",
    "atol",
    "rtol",
    "passed",
    "worst_channel",
    "nan_inf_mismatch",
    "mismatched_fraction",
}


def assert_fold_schema(doc: dict) -> None:
    """The fold document as the README describes it: bnfold's own keys exactly; the report
    objects (bnfold.report) at least the documented keys, since new keys may appear."""
    assert set(doc) == FOLD_KEYS
    assert (doc["schema_version"], doc["command"]) == (1, "fold")
    assert isinstance(doc["bnfold_version"], str) and isinstance(doc["written"], bool)
    assert REPORT_KEYS <= set(doc["report"])
    for s in doc["report"]["skipped"]:
        assert s["reason"] in {r.value for r in SkipReason} and s["detail"]
    if doc["before"] is not None:
        assert set(doc["before"]) == {"nodes", "batchnorm", "bytes"}
    v = doc["verification"]
    if v is not None:
        assert VERIFY_KEYS <= set(v) and v["status"] in {"passed", "failed", "not-run"}
        for d in [*v["outputs"], *v["intermediates"]]:
            assert DIFF_KEYS <= set(d)


def assert_check_schema(doc: dict) -> None:
    assert set(doc) == CHECK_KEYS
    assert (doc["schema_version"], doc["command"]) == (1, "check")
    assert set(doc["summary"]) == {
        "models",
        "clean",
        "findings",
        "errors",
        "bn_total",
        "bn_foldable",
        "bn_left",
    }
    for m in doc["models"]:
        assert set(m) == MODEL_KEYS and m["status"] in {"clean", "findings", "error"}
        if m["report"] is not None:
            assert REPORT_KEYS <= set(m["report"])
        if m["verification"] is not None:
            assert VERIFY_KEYS <= set(m["verification"])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its hash: to prove a run wrote and changed nothing."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("bnfold: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def model(tmp_path: Path, rng: np.random.Generator) -> Path:
    """Conv -> BN (foldable) -> Relu -> BN (left: unsupported-producer)."""
    return Path(save(conv_bn_model(rng, second_bn=True), tmp_path / "m.onnx"))


def custom_op_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> BN -> an op onnxruntime does not know: the fold happens, verification cannot run."""
    m = conv_bn_model(rng)
    m.graph.node[-1].CopyFrom(
        helper.make_node("Swish", ["bn1_out"], ["y"], domain="com.example", name="custom")
    )
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


# --------------------------------------------------------------------------------------------
# fold


def test_fold_writes_default_output_and_prints_the_summary(model: Path, rng: np.random.Generator) -> None:
    result = runner.invoke(app, [str(model)])
    assert result.exit_code == 0, result.output
    out = model.with_name("m.folded.onnx")
    folded = onnx.load(str(out))
    # structure: bn1 is gone and conv1 writes its output name; bn2 stays
    assert [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == ["bn2"]
    assert next(n for n in folded.graph.node if n.op_type == "Conv").output[0] == "bn1_out"
    # the report, at a glance
    text = result.stdout
    for needle in (
        "1 folded, 1 left",
        "bn2",
        "unsupported-producer",
        "Verification: passed",
        "nodes 4 → 3",
        "intermediates: 2 compared",
        "wrote",
    ):
        assert needle in text, text
    assert result.stderr == ""
    # numbers: same outputs as the unfolded model, at ORT_DISABLE_ALL
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref, got = run_ort(str(model), x)[0], run_ort(str(out), x)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_json_on_stdout_is_the_only_thing_there(model: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, [str(model), "-o", str(tmp_path / "f.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert_fold_schema(doc)
    assert doc["written"] and doc["exit_code"] == 0 and doc["error"] is None
    assert [(f["bn"], f["producer"]) for f in doc["report"]["folded"]] == [("bn1", "conv1")]
    assert [s["reason"] for s in doc["report"]["skipped"]] == ["unsupported-producer"]
    assert doc["verification"]["passed"] and [o["name"] for o in doc["verification"]["outputs"]] == ["y"]
    assert (doc["before"]["batchnorm"], doc["after"]["batchnorm"]) == (2, 1)


@pytest.mark.parametrize(
    "form",
    [["--json=r.json"], ["--json", "r.json"], ["--json-file", "r.json"]],
    ids=["equals", "space-dot-json", "json-file"],
)
def test_json_to_a_file_keeps_the_summary_on_stdout(model: Path, tmp_path: Path, form: list[str]) -> None:
    args = [a.replace("r.json", str(tmp_path / "r.json")) for a in form]
    result = runner.invoke(app, [str(model), "-o", str(tmp_path / "f.onnx"), *args])
    assert result.exit_code == 0, result.output
    assert_fold_schema(json.loads((tmp_path / "r.json").read_text()))
    assert "Verification: passed" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--json"], ["--json"]),
        (["--json", "-"], ["--json"]),
        (["--json=a.json", "m.onnx"], ["--json-file", "a.json", "m.onnx"]),
        (["--json", "m.onnx"], ["--json", "m.onnx"]),
        (["--", "--json=x"], ["--", "--json=x"]),
    ],
    ids=["flag", "dash", "equals", "never-eats-a-model", "after-double-dash"],
)
def test_normalize_json_args(args: list[str], expected: list[str]) -> None:
    assert normalize_json_args(args) == expected


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("x=1x3x224x224", ("x", (1, 3, 224, 224))), ("in:0=1,3", ("in:0", (1, 3))), ("a=b=5", ("a=b", (5,)))],
    ids=["x-separated", "comma-and-colon-name", "last-equals-splits"],
)
def test_parse_shape(spec: str, parsed: tuple[str, tuple[int, ...]]) -> None:
    assert parse_shape(spec) == parsed


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_strict_exits_1_when_bn_remains_but_still_writes(model: Path, tmp_path: Path, strict: bool) -> None:
    out = tmp_path / "f.onnx"
    result = runner.invoke(app, [str(model), "-o", str(out), "-q", *(["--strict"] if strict else [])])
    assert result.exit_code == (1 if strict else 0)
    assert out.exists() and result.stdout == ""
    assert result.stderr == ("bnfold: --strict: 1 BatchNormalization node left\n" if strict else "")


def test_no_verify_reports_verification_as_skipped(model: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, [str(model), "-o", str(tmp_path / "f.onnx"), "--no-verify", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["verification"] is None and doc["report"]["bn_folded"] == 1


def test_exclude_leaves_that_bn_with_reason_excluded(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    result = runner.invoke(app, [str(model), "-o", str(out), "--exclude", "bn1_out", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["report"]["folded"] == []
    assert {(s["bn"], s["reason"]) for s in doc["report"]["skipped"]} == {
        ("bn1", "excluded"),
        ("bn2", "unsupported-producer"),
    }
    assert len([n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]) == 2


def test_in_place_replaces_the_model_and_leaves_no_staging(model: Path, tmp_path: Path) -> None:
    before = model.read_bytes()
    result = runner.invoke(app, [str(model), "--in-place", "-q"])
    assert result.exit_code == 0, result.output
    assert model.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "BatchNormalization"] == ["bn2"]


@pytest.mark.parametrize("force", [False, True], ids=["refused", "force"])
def test_verification_that_cannot_pass_writes_nothing_unless_force(
    tmp_path: Path, rng: np.random.Generator, force: bool
) -> None:
    src = Path(save(custom_op_model(rng), tmp_path / "custom.onnx"))
    out = tmp_path / "f.onnx"
    before = snapshot(tmp_path)
    result = runner.invoke(app, [str(src), "-o", str(out), "--json", *(["--force"] if force else [])])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert_fold_schema(doc)
    assert doc["verification"]["status"] == "not-run" and doc["written"] is force
    assert "--force" in doc["error"] if not force else "written because of --force" in doc["error"]
    if force:
        assert out.exists()
    else:
        assert snapshot(tmp_path) == before, "a failed verification must write nothing"
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: ")


def test_failed_verification_renders_the_failing_tensors() -> None:
    from rich.console import Console

    from bnfold.cli.render import FoldOutcome, fold_summary

    bad = TensorDiff(
        name="y",
        kind="output",
        shape=(1, 4),
        dtype="float32",
        max_abs=0.5,
        max_rel=0.25,
        mean_abs=0.1,
        mismatched=3,
        total=4,
        atol=0.0,
        rtol=1e-4,
        passed=False,
    )
    outcome = FoldOutcome(
        source="m.onnx",
        output="f.onnx",
        written=False,
        exit_code=1,
        report=FoldReport(
            skipped=(Skipped(bn="bn1", reason=SkipReason.VERIFICATION_FAILED, detail="it diverged"),)
        ),
        verification=VerifyReport(
            status=VerifyStatus.FAILED,
            outputs=(bad,),
            samples=3,
            seed=0,
            message="1 of 1 compared tensors differ",
            first_divergent=("y",),
        ),
        error="verification failed (--force writes it anyway)",
    )
    console = Console(record=True, width=120, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(fold_summary(outcome))
    text = console.export_text()
    for needle in (
        "Verification: failed",
        "FAIL 3/4",
        "first divergent: y",
        "verification-failed",
        "nothing written: verification failed",
    ):
        assert needle in text, text


# --------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, nothing written, input untouched


def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    (tmp / "empty.onnx").write_bytes(b"")
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "text.onnx").write_text("this is not a model\n")
    (tmp / "adir").mkdir()
    ext = onnx.load(str(good))
    onnx.save(
        ext, str(tmp / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    (tmp / "ext.onnx.data").unlink()
    m = str(good)
    return {
        "missing-file": ([str(tmp / "missing.onnx")], ("missing.onnx", "no such file")),
        "directory": ([str(tmp / "adir")], ("adir", "directory")),
        "empty-file": ([str(tmp / "empty.onnx")], ("empty.onnx", "empty")),
        "truncated-file": ([str(tmp / "truncated.onnx")], ("truncated.onnx", "truncated")),
        "not-onnx": ([str(tmp / "text.onnx")], ("text.onnx", "not an ONNX model")),
        "missing-external-data": ([str(tmp / "ext.onnx")], ("ext.onnx", "ext.onnx.data", "missing")),
        "unknown-option": ([m, "--frobnicate"], ("No such option: --frobnicate",)),
        "bad-shape": ([m, "--shape", "x=1xfoo"], ("--shape", "x=1xfoo")),
        "shape-without-name": ([m, "--shape", "1x3x8x8"], ("--shape", "NAME=DIMS")),
        "shape-conflicts-with-model": ([m, "--shape", "x=1x3x9x9"], ("m.onnx", "dimension 2 is 8")),
        "output-is-input": ([m, "-o", m], ("--in-place",)),
        "zero-samples": ([m, "--samples", "0"], ("--samples",)),
        "missing-inputs-file": ([m, "--inputs", str(tmp / "nope.npz")], ("nope.npz",)),
        "check-empty": (["check", str(tmp / "empty.onnx")], ("empty.onnx", "empty")),
        "check-glob-matches-nothing": (["check", str(tmp / "zz*.onnx")], ("zz*.onnx", "no files match")),
        "check-against-needs-one-model": (["check", m, m + "x", "--against", m], ("--against",)),
        "no-such-command": (["chek", m], ("did you mean 'check'",)),
    }


BAD_CASES = [
    "missing-file",
    "directory",
    "empty-file",
    "truncated-file",
    "not-onnx",
    "missing-external-data",
    "unknown-option",
    "bad-shape",
    "shape-without-name",
    "shape-conflicts-with-model",
    "output-is-input",
    "zero-samples",
    "missing-inputs-file",
    "check-empty",
    "check-glob-matches-nothing",
    "check-against-needs-one-model",
    "no-such-command",
]


@pytest.mark.parametrize("case", BAD_CASES, ids=BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, model: Path, case: str) -> None:
    if case == "check-against-needs-one-model":
        shutil.copy(model, str(model) + "x")
    args, needles = _bad_inputs(tmp_path, model)[case]
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert_one_error_line(result.stderr, *needles)
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback_then_the_line(tmp_path: Path) -> None:
    result = runner.invoke(app, [str(tmp_path / "missing.onnx"), "--debug"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Traceback") and "InputError" in result.stderr
    assert result.stderr.splitlines()[-1] == f"bnfold: error: {tmp_path / 'missing.onnx'}: no such file"


def test_internal_error_is_exit_3_with_a_hint(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.api

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bnfold.api, "fold_path", broken)
    result = runner.invoke(app, [str(model), "-o", str(model.with_name("f.onnx"))])
    assert result.exit_code == 3
    assert_one_error_line(result.stderr, "internal error: RuntimeError: boom", "--debug")


def test_no_arguments_prints_usage_and_exits_2() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and "Usage: bnfold" in result.output


def test_torch_input_without_torch_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    (tmp_path / "m.pt2").write_bytes(b"PK")
    before = snapshot(tmp_path)
    result = runner.invoke(app, [str(tmp_path / "m.pt2"), "-o", str(tmp_path / "f.onnx")])
    assert result.exit_code == 2
    from bnfold.cli.versions import install_command

    assert_one_error_line(
        result.stderr, "m.pt2", "PyTorch inputs need torch", install_command("torch"), "[torch]'"
    )
    assert snapshot(tmp_path) == before


def test_factory_with_weights_exports_a_folded_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    (tmp_path / "tiny_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_factory

    torch.save(tiny_factory.make().state_dict(), tmp_path / "state.pt")
    out = tmp_path / "f.onnx"
    result = runner.invoke(
        app,
        [
            "--factory",
            "tiny_factory:make",
            "--weights",
            "state.pt",
            "--shape",
            "input=1x3x8x8",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert_fold_schema(doc)
    assert doc["module_report"]["bn_folded"] == 1 and doc["verification"]["passed"]
    assert doc["export"]["torch_vs_onnx"]["passed"]
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == ["input"]
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]


# --------------------------------------------------------------------------------------------
# check, through the CLI


@pytest.fixture
def check_dir(tmp_path: Path, rng: np.random.Generator) -> Path:
    """dirty.onnx (a foldable BN), train.onnx (a training-mode BN: left, not a finding), and in a
    subfolder clean.onnx (dirty.onnx folded); beside the folder, other.onnx (same graph as
    dirty.onnx, other weights)."""
    from bnfold import fold_onnx

    d = tmp_path / "models"
    (d / "sub").mkdir(parents=True)
    dirty = conv_bn_model(rng, second_bn=True)
    save(dirty, d / "dirty.onnx")
    save(conv_bn_model(rng, training_mode=True), d / "train.onnx")
    save(fold_onnx(dirty).model, d / "sub" / "clean.onnx")
    save(conv_bn_model(rng, second_bn=True, weight_delta=0.3), tmp_path / "other.onnx")  # not equivalent
    return d


def test_check_directory_json_and_junit(check_dir: Path, tmp_path: Path) -> None:
    before = snapshot(check_dir)
    junit = tmp_path / "junit.xml"
    result = runner.invoke(app, ["check", str(check_dir), "--json", "--junit-xml", str(junit)])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert_check_schema(doc)
    status = {os.path.basename(m["path"]): m["status"] for m in doc["models"]}
    assert status == {"dirty.onnx": "findings", "clean.onnx": "clean", "train.onnx": "clean"}
    assert doc["summary"]["bn_foldable"] == 1 and doc["exit_code"] == 1
    assert "dirty.onnx: 1 finding: bn1 can be folded into Conv conv1" in result.stderr
    cases = ET.parse(junit).getroot().findall("./testsuite/testcase")
    assert [c.find("failure") is not None for c in cases] == [True, False, False]
    assert snapshot(check_dir) == before, "check writes nothing into the model folder"


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["sub/clean.onnx"], 0, ["clean", "unsupported-producer"]),
        (["sub/clean.onnx", "train.onnx", "--strict"], 1, ["training-mode", "findings"]),
        (["*.onnx"], 1, ["dirty.onnx", "train.onnx", "foldable  bn1 → Conv conv1"]),
    ],
    ids=["clean", "strict-counts-left-bn", "glob"],
)
def test_check_exit_codes_and_table(
    check_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, needles: list[str]
) -> None:
    monkeypatch.chdir(check_dir)
    result = runner.invoke(app, ["check", *args])
    assert result.exit_code == code, result.output
    for needle in needles:
        assert needle in result.stdout, result.stdout


def test_check_against_reports_the_comparison(check_dir: Path) -> None:
    result = runner.invoke(
        app,
        ["check", str(check_dir / "sub" / "clean.onnx"), "--against", str(check_dir / "dirty.onnx"), "-v"],
    )
    assert result.exit_code == 0, result.output
    assert "equivalence: passed" in result.stdout and "bn1_out" in result.stdout


# --------------------------------------------------------------------------------------------
# the installed entry point, in a subprocess


def bnfold_command() -> list[str]:
    exe = shutil.which("bnfold", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "bnfold"]


def run_bnfold(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("BNFOLD_DEBUG", None)
    return subprocess.run(
        [*bnfold_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_entry_point_fold_and_version(model: Path, tmp_path: Path) -> None:
    proc = run_bnfold(model.name, "-o", "out.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bnfold m.onnx → out.onnx" in proc.stdout and "Verification: passed" in proc.stdout
    assert proc.stderr == ""
    assert (tmp_path / "out.onnx").exists()
    version = run_bnfold("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("bnfold 0.")


def test_python_m_bnfold_runs_the_cli_without_importing_torch(tmp_path: Path) -> None:
    """torch is optional: the CLI module must not import it (ONNX users may not have it)."""
    code = "import runpy, sys; sys.argv = ['bnfold', '--version']; runpy.run_module('bnfold', run_name='__main__')"
    probe = "import sys, bnfold.cli; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout.startswith("bnfold ")
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize(
    "case",
    ["truncated-file", "missing-external-data", "unknown-option"],
    ids=["truncated-file", "missing-external-data", "unknown-option"],
)
def test_entry_point_bad_input(tmp_path: Path, model: Path, case: str) -> None:
    args, needles = _bad_inputs(tmp_path, model)[case]
    before = snapshot(tmp_path)
    proc = run_bnfold(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_error_line(proc.stderr, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("make_args", "code"),
    [
        (lambda d: ["check", "sub/clean.onnx"], 0),
        (lambda d: ["check", "dirty.onnx", "train.onnx"], 1),
        (lambda d: ["check", "sub/clean.onnx", "--against", "dirty.onnx"], 0),
        (lambda d: ["check", "../other.onnx", "--against", "dirty.onnx"], 1),
    ],
    ids=["clean", "findings", "against-equal", "against-not-equal"],
)
def test_entry_point_check_json_on_stdout(
    check_dir: Path, make_args: Callable[[Path], list[str]], code: int
) -> None:
    proc = run_bnfold(*make_args(check_dir), "--json", cwd=check_dir)
    assert proc.returncode == code, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but JSON on stdout
    assert_check_schema(doc)
    assert doc["exit_code"] == code
    if "--against" in make_args(check_dir):
        v = doc["models"][0]["verification"]
        assert v["status"] == ("passed" if code == 0 else "failed")


def test_unverified_fold_does_not_import_onnxruntime(tmp_path):
    """Issue 14: `bnfold IN -o OUT --no-verify -q` paid for importing onnxruntime (and `import
    bnfold` did too) though nothing ran it; the verifier now loads it on first use."""
    import subprocess
    import sys

    out = tmp_path / "o.onnx"
    code = (
        "import sys\n"
        "import bnfold\n"
        "assert 'onnxruntime' not in sys.modules, 'import bnfold loaded onnxruntime'\n"
        "from bnfold.cli import main\n"
        f"sys.argv = ['bnfold', 'models/demo.onnx', '-o', {str(out)!r}, '--no-verify', '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert out.exists()


def test_unbindable_dimension_is_reported_in_command_line_words(tmp_path):
    """The verifier's ShapeError said `pass shapes={'x': (...)}` (Python API words) in the CLI;
    the CLI now prints the same sentence with --shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    c = 3
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x4"]),
        helper.make_node("Conv", ["x4", "W"], ["y"]),
        helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, c, 2, 2], np.int64), "shape"),  # only b*n == 12 reshapes
        numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output
    assert "--shape x=" in result.output and "shapes=" not in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_trying_sizes_for_a_free_dimension_prints_nothing_from_onnxruntime(tmp_path):
    """Issue 10 item 11: each size tried for a free dimension that fails made onnxruntime print
    a colored error line of its own on stderr; only bnfold's one error line may appear."""
    import subprocess
    import sys

    test_unbindable_dimension_is_reported_in_command_line_words(tmp_path)  # writes m.onnx
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("bnfold: error:"), done.stderr
    assert "onnxruntime" not in done.stderr.lower().replace("onnxruntime's", "")
