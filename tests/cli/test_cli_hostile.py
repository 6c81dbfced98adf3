"""Issue 10, the CLI's items: report paths over models (2), special files as outputs (3),
unwritable output folders (15), check's exit codes and reports when models fail (9), stdout
that carries only JSON (11), and Ctrl-C (issue 11). Each says what went wrong before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli_output import bnfold_exe
from typer.testing import CliRunner

from bnfold.cli import app
from cli_builders import conv_bn_model, one_error_line, save

runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path, rng: np.random.Generator) -> Path:
    return Path(save(conv_bn_model(rng, second_bn=True), tmp_path / "m.onnx"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 2: a report path equal to a model


@pytest.mark.parametrize(
    "args",
    [
        ["{m}", "-o", "{d}/f.onnx", "--json-file", "{m}"],
        ["{m}", "-o", "{d}/f.onnx", "--json={m}"],
        ["{m}", "-o", "{d}/f.onnx", "--json-file", "{d}/f.onnx"],
        ["check", "{m}", "--junit-xml", "{m}"],
        ["check", "{m}", "--json-file", "{m}"],
        ["check", "{d}/f.onnx", "--against", "{m}", "--junit-xml", "{m}"],
    ],
    ids=[
        "json-file-is-input",
        "json-equals-input",
        "json-file-is-output",
        "junit-is-model",
        "check-json-is-model",
        "junit-is-against",
    ],
)
def test_report_path_naming_a_model_is_refused(model: Path, args: list[str]) -> None:
    """Before: the model was replaced by the report."""
    (model.parent / "f.onnx").write_bytes(model.read_bytes())
    before = files(model.parent)
    argv = [a.format(m=model, d=model.parent) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, "a model of this run", "write the report elsewhere")
    assert files(model.parent) == before


# --------------------------------------------------------------------------------------------
# 3 and 15: outputs bnfold must not or cannot replace


def test_special_files_as_output_are_refused(model: Path, tmp_path: Path) -> None:
    """Before: a device node, a FIFO or a link to /proc/self/fd/1 was replaced by a regular file."""
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    link = tmp_path / "stdout.onnx"
    link.symlink_to("/proc/self/fd/1")
    for target in ("/dev/null", str(fifo), str(link)):
        result = runner.invoke(app, [str(model), "-o", target])
        assert result.exit_code == 2, (target, result.output)
        one_error_line(result.stderr, target)
    assert fifo.is_fifo() and link.is_symlink() and os.path.exists("/dev/null")
    json_to_fifo = runner.invoke(app, [str(model), "-o", str(tmp_path / "f.onnx"), "--json-file", str(fifo)])
    assert json_to_fifo.exit_code == 2 and not (tmp_path / "f.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("verify", ["--verify", "--no-verify"], ids=["verify", "no-verify"])
def test_unwritable_output_folder_is_exit_2_before_any_work(model: Path, tmp_path: Path, verify: str) -> None:
    """Before: with verification on, exit 3 after the fold."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = runner.invoke(app, [str(model), "-o", str(ro / "f.onnx"), verify])
        assert result.exit_code == 2, result.output
        one_error_line(result.stderr, "permission denied")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("verify", ["--verify", "--no-verify"], ids=["verify", "no-verify"])
def test_folder_without_write_permission_is_refused_before_folding(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    """The same refusal where the tests run as root (who may write anywhere): the folder is
    reported unwritable, and the fold never starts."""
    import bnfold.api

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real_access(p, mode, **kw)
    )

    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("the fold started")

    monkeypatch.setattr(bnfold.api, "fold_path", must_not_run)
    result = runner.invoke(app, [str(model), "-o", str(ro / "f.onnx"), verify])
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, "permission denied")
    assert list(ro.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 9: check's exit codes; one bad model does not stop the reports


def test_check_bug_is_exit_3_and_other_models_still_reported(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a bnfold bug in check was exit 2, like bad input."""
    import bnfold.api

    real = bnfold.api.analyze_onnx

    def flaky(m, **kw):  # type: ignore[no-untyped-def]
        if "bad" in str(kw.get("base_dir", "")):
            raise RuntimeError("boom")
        return real(m, **kw)

    monkeypatch.setattr(bnfold.api, "analyze_onnx", flaky)
    (tmp_path / "bad").mkdir()
    save(conv_bn_model(np.random.default_rng(1)), tmp_path / "bad" / "b.onnx")
    junit = tmp_path / "j.xml"
    result = runner.invoke(
        app, ["check", str(model), str(tmp_path / "bad"), "--json", "--junit-xml", str(junit)]
    )
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 3
    assert [(os.path.basename(m["path"]), m["status"], m["error_type"]) for m in doc["models"]] == [
        ("m.onnx", "findings", None),
        ("b.onnx", "error", "internal-error"),
    ]
    assert len(ET.parse(junit).getroot().findall("./testsuite/testcase")) == 2
    assert "internal error: RuntimeError: boom" in result.stderr


def test_check_missing_model_does_not_stop_the_reports(model: Path, tmp_path: Path) -> None:
    """Before: a missing path stopped the run before any report was written."""
    junit = tmp_path / "j.xml"
    report = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "check",
            str(model),
            str(tmp_path / "gone.onnx"),
            "--json-file",
            str(report),
            "--junit-xml",
            str(junit),
        ],
    )
    assert result.exit_code == 2
    doc = json.loads(report.read_text())
    assert [m["status"] for m in doc["models"]] == ["findings", "error"]
    assert doc["models"][1]["error"].endswith("gone.onnx: no such file or directory")
    cases = ET.parse(junit).getroot().findall("./testsuite/testcase")
    assert [c.find("error") is not None for c in cases] == [False, True]
    one_error_line(result.stderr, "gone.onnx", "no such file")
    assert "m.onnx" in result.stdout  # the summary of the readable model is still printed


# --------------------------------------------------------------------------------------------
# 11: stdout is only JSON


PROBE = """
import os, sys
import bnfold.api
from bnfold.cli import main
real = bnfold.api.fold_path
def noisy(*a, **k):
    print("EP Error: python-level banner")
    os.write(1, b"C-level banner on fd 1\\n")
    return real(*a, **k)
bnfold.api.fold_path = noisy
main(sys.argv[1:])
"""


def test_json_stdout_carries_only_json_even_when_libraries_print(model: Path) -> None:
    """Before: onnxruntime's own prints on stdout made --json stdout unparsable."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), "-o", str(model.with_name("f.onnx")), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] is True
    assert "EP Error" in proc.stderr and "C-level banner" in proc.stderr


# --------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_says_nothing_was_written(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: exit 130 with only 'bnfold: interrupted'."""
    import bnfold.api

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.api, "fold_path", interrupted)
    before = files(model.parent)
    result = runner.invoke(app, [str(model), "-o", str(model.parent / "deploy") + "/"])
    assert result.exit_code == 130
    assert result.stderr == "bnfold: interrupted; nothing was written\n"
    assert files(model.parent) == before and not (model.parent / "deploy").exists()


def test_sigint_during_verification_exits_130_in_one_line(model: Path) -> None:
    proc = subprocess.Popen(
        [*bnfold_exe(), str(model), "-o", str(model.with_name("f.onnx")), "--samples", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "bnfold: interrupted; nothing was written" and "Traceback" not in err
    assert not model.with_name("f.onnx").exists()
    assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"]


WARNING_PROBE = """
import sys, warnings
import bnfold.api
from bnfold.cli import main
real = bnfold.api.fold_path
def noisy(*a, **k):
    warnings.warn("overflow encountered in multiply", RuntimeWarning, stacklevel=1)
    return real(*a, **k)
bnfold.api.fold_path = noisy
main(sys.argv[1:])
"""


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_library_warnings_stay_off_stderr_unless_debug(model: Path, debug: bool) -> None:
    """Before: numpy's RuntimeWarnings from verification reached stderr beside bnfold's own lines."""
    proc = subprocess.run(
        [sys.executable, "-c", WARNING_PROBE, str(model), "-o", str(model.with_name("f.onnx"))]
        + (["--debug"] if debug else []),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("overflow encountered" in proc.stderr) is debug
    if not debug:
        assert proc.stderr == ""


# --------------------------------------------------------------------------------------------
# 1: never write over an input's external data


def external_model(folder: Path, rng: np.random.Generator, name: str, location: str) -> Path:
    path = folder / name
    onnx.save(
        conv_bn_model(rng, second_bn=True),
        str(path),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    return path


@pytest.mark.parametrize(
    ("location", "args"),
    [
        ("m.folded.onnx", []),
        ("m.onnx.data", ["-o", "{d}/m.onnx.data"]),
        ("m.onnx.data", ["{d}/m.onnx.data"]),
        ("m.onnx.data", ["-o", "{d}/f.onnx", "--json-file", "{d}/m.onnx.data"]),
        ("m.onnx.data", ["--json={d}/w.json", "-o", "{d}/f.onnx", "--json-file", "{d}/m.onnx.data"]),
    ],
    ids=[
        "default-output-is-the-data-file",
        "dash-o-data-file",
        "positional-data-file",
        "json-file",
        "json-twice",
    ],
)
def test_outputs_never_replace_the_inputs_data(
    tmp_path: Path, rng: np.random.Generator, location: str, args: list[str]
) -> None:
    """Before: 'bnfold m.onnx' destroyed an input whose data file was named m.folded.onnx; -o or a
    report path naming the data file replaced the weights."""
    src = external_model(tmp_path, rng, "m.onnx", location)
    before = files(tmp_path)
    result = runner.invoke(app, [str(src), *(a.format(d=tmp_path) for a in args)])
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, location, "data file of", "refusing to overwrite")
    assert files(tmp_path) == before


def test_check_report_never_replaces_a_models_data(tmp_path: Path, rng: np.random.Generator) -> None:
    src = external_model(tmp_path, rng, "m.onnx", "weights.bin")
    before = files(tmp_path)
    proc = subprocess.run(
        [*bnfold_exe(), "check", str(src), "--junit-xml", str(tmp_path / "weights.bin")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    one_error_line(proc.stderr, "weights.bin", "data file of")
    assert files(tmp_path) == before


def test_sigterm_cleans_up_like_ctrl_c(model: Path) -> None:
    """Issue 10 item 6: SIGTERM (what CI sends on cancel) killed the run outright and left a hidden
    .bnfold-* staging folder as large as the model."""
    out_dir = model.parent / "deploy"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [*bnfold_exe(), str(model), "-o", str(out_dir / "f.onnx"), "--samples", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not os.listdir(out_dir) and time.monotonic() < deadline:  # wait for the staging folder
        time.sleep(0.05)
    assert [n for n in os.listdir(out_dir) if n.startswith(".bnfold")], "the run stages beside the output"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "bnfold: terminated; nothing was written" and "Traceback" not in err
    assert os.listdir(out_dir) == [], "no staging folder or partial output left"


def test_inputs_that_are_a_fifo_is_exit_2_not_a_crash(model: Path, tmp_path: Path) -> None:
    """Before: --inputs naming a FIFO was an internal error (NotADirectoryError), exit 3."""
    fifo = tmp_path / "inputs.npz"
    os.mkfifo(fifo)
    result = runner.invoke(app, [str(model), "-o", str(tmp_path / "f.onnx"), "--inputs", str(fifo)])
    assert result.exit_code == 2
    one_error_line(result.stderr, "--inputs", "not a regular file or a folder")
    assert not (tmp_path / "f.onnx").exists()


def test_an_unchanged_model_says_why_nothing_ran(model: Path, tmp_path: Path) -> None:
    """A model with nothing to fold is verified without a run; the summary said 'passed — 0 samples'
    and 'no shared tensor names', which read as a verification that silently compared nothing."""
    first = tmp_path / "once.onnx"
    assert runner.invoke(app, [str(model), "-o", str(first), "-q"]).exit_code == 0
    result = runner.invoke(app, [str(first), "-o", str(tmp_path / "twice.onnx")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("Verification:"))
    assert line.startswith("Verification: passed — nothing folded") and "0 samples" not in result.stdout
