"""What the CLI prints: plain lines when piped (issue 11), names that cannot drive the terminal
or break JUnit XML, paths that are not rich markup (issue 10 item 12), consoles that cannot
encode '→' and stdouts that are full or closed (issue 11, issue 10 item 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnfold.cli import app
from cli_builders import conv_bn_model, save

runner = CliRunner()


def bnfold_exe() -> list[str]:
    exe = shutil.which("bnfold", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "bnfold"]


def run_shell(command: str, *, cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    """``bnfold`` through a shell, for redirections CliRunner cannot make (>&-, /dev/full)."""
    full_env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"} | env
    exe = " ".join(f"'{p}'" for p in bnfold_exe())
    return subprocess.run(
        command.replace("bnfold", exe, 1),
        shell=True,
        check=False,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def model(tmp_path: Path, rng: np.random.Generator) -> Path:
    return Path(save(conv_bn_model(rng, second_bn=True), tmp_path / "m.onnx"))


def renamed(m: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """``m`` with tensor ``old`` called ``new`` everywhere (node inputs and outputs)."""
    for node in m.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    return m


# --------------------------------------------------------------------------------------------
# piped output: plain lines


def test_piped_verbose_output_is_plain_lines(tmp_path: Path, rng: np.random.Generator) -> None:
    """Before: rich tables wrapped long tensor names mid-word at 120 columns, padded cells with
    trailing spaces and left the status column without a header."""
    long_name = "backbone.stage4.block17.conv2.bn_output_tensor_with_a_rather_long_name_" * 3
    src = save(renamed(conv_bn_model(rng, second_bn=True), "bn1_out", long_name), tmp_path / "long.onnx")
    result = runner.invoke(app, [src, "-o", str(tmp_path / "f.onnx"), "-v"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines), "no trailing spaces"
    assert sum(long_name in line for line in lines) >= 2, "the long name stays whole on its lines"
    header = next(line for line in lines if line.split()[:2] == ["tensor", "shape"])
    assert header.split()[-1] == "result"
    check = runner.invoke(app, ["check", src])
    assert check.stdout.splitlines()[0].split() == ["model", "BN", "foldable", "left", "status"]


def test_unnamed_absorber_is_named_by_what_it_writes(tmp_path: Path, rng: np.random.Generator) -> None:
    """Before: an unnamed Conv printed as '→ Conv Conv'."""
    m = conv_bn_model(rng)
    next(n for n in m.graph.node if n.op_type == "Conv").name = ""
    src = save(m, tmp_path / "u.onnx")
    result = runner.invoke(app, [src, "-o", str(tmp_path / "f.onnx"), "-v"])
    assert result.exit_code == 0, result.output
    assert "bn1 → unnamed Conv (output bn1_out)" in result.stdout
    assert "Conv Conv" not in result.stdout


# --------------------------------------------------------------------------------------------
# hostile names and paths


def test_control_characters_are_escaped_in_terminal_and_junit(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Before: ESC/BEL/OSC in node names reached the terminal raw and made the JUnit XML not well-formed."""
    m = conv_bn_model(rng)
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn.name = "bn\x1b]0;owned\x07\x1b[31m"
    src = save(m, tmp_path / "ctl.onnx")
    junit = tmp_path / "j.xml"
    result = runner.invoke(app, ["check", src, "--junit-xml", str(junit)])
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "bn\\x1b]0;owned\\x07\\x1b[31m" in result.stdout
    failure = ET.parse(junit).getroot().find("./testsuite/testcase/failure")  # well-formed
    assert failure is not None and "\\x1b" in failure.attrib["message"]
    quiet = runner.invoke(app, ["check", src, "-q"])
    assert "\x1b" not in quiet.stderr and "\\x1b" in quiet.stderr


@pytest.mark.parametrize("relative", ["model[v2].onnx", "x[/]y.onnx"], ids=["brackets", "closing-tag"])
def test_brackets_in_paths_are_not_markup(tmp_path: Path, rng: np.random.Generator, relative: str) -> None:
    """Before: 'model[v2].onnx' printed as 'model.onnx' and 'x[/]y.onnx' crashed rich."""
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save(conv_bn_model(rng), path)
    out = tmp_path / "out[v3].onnx"
    result = runner.invoke(app, [str(path), "-o", str(out), "-v"])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"bnfold {path} → {out}" in result.stdout
    assert f"reading {path}" in result.stderr
    check = runner.invoke(app, ["check", str(path)])
    assert str(path) in check.stdout


# --------------------------------------------------------------------------------------------
# consoles and streams


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"], ids=["cp1252", "ascii"])
def test_console_that_cannot_encode_arrows_gets_ascii(model: Path, encoding: str) -> None:
    """Before: UnicodeEncodeError after the output was written, exit 3."""
    proc = run_shell("bnfold m.onnx -o f.onnx -v | cat", cwd=model.parent, PYTHONIOENCODING=encoding)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode(encoding)
    assert "bnfold m.onnx -> f.onnx" in text and "bn1 -> Conv conv1" in text
    assert (model.parent / "f.onnx").exists()
    proc = run_shell("bnfold check m.onnx | cat", cwd=model.parent, PYTHONIOENCODING=encoding)
    assert b"foldable  bn1 -> Conv conv1" in proc.stdout and proc.stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_stdout_after_success_is_a_warning_not_exit_3(model: Path) -> None:
    proc = run_shell("bnfold m.onnx -o f.onnx > /dev/full", cwd=model.parent)
    assert proc.returncode == 0
    assert proc.stderr.decode().splitlines() == [
        "bnfold: warning: cannot write the summary to stdout (No space left on device)"
    ]
    assert (model.parent / "f.onnx").exists()
    proc = run_shell("bnfold m.onnx -o g.onnx --json > /dev/full", cwd=model.parent)
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [
        "bnfold: error: cannot write the JSON report to stdout (No space left on device)"
    ]


def test_closed_stdout_after_success_exits_0(model: Path) -> None:
    proc = run_shell("bnfold m.onnx -o f.onnx >&-", cwd=model.parent)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert (model.parent / "f.onnx").exists()


def test_json_with_non_utf8_path_and_console(tmp_path: Path, model: Path) -> None:
    """Before: a non-UTF-8 model path broke --json."""
    odd = os.fsencode(str(tmp_path)) + b"/caf\xe9.onnx"
    os.rename(model, odd)
    proc = subprocess.run(
        [*bnfold_exe(), odd, "-o", "f.onnx", "--json"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"} | {"PYTHONIOENCODING": "cp1252"},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["written"] and doc["input"].endswith(".onnx")


def test_debug_logs_escape_control_characters(tmp_path: Path, rng: np.random.Generator) -> None:
    m = conv_bn_model(rng)
    next(n for n in m.graph.node if n.op_type == "BatchNormalization").name = "bn\x1b[2J"
    src = save(m, tmp_path / "ctl.onnx")
    result = runner.invoke(app, [src, "-o", str(tmp_path / "f.onnx"), "--debug"])
    assert result.exit_code == 0, result.output
    assert "bnfold: " in result.stderr and "\x1b" not in result.stderr and "\x1b" not in result.stdout
