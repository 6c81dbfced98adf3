"""Issue 11: the forms people bring from onnxsim, onnxslim and polygraphy work, and the help
reads in the command line's words. CliRunner for the options and exit codes; the installed
entry point in a subprocess for the common forms."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnfold.cli import app, parse_shape
from cli_builders import FACTORY_SOURCE, conv_bn_model, one_error_line, save
from conftest import run_ort

runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path, rng: np.random.Generator) -> Path:
    """Conv -> BN bn1 (foldable, writes bn1_out) -> Relu -> BN bn2 (left)."""
    return Path(save(conv_bn_model(rng, second_bn=True), tmp_path / "m.onnx"))


def bn_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]


def bnfold_exe() -> list[str]:
    exe = shutil.which("bnfold", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "bnfold"]


def run_bnfold(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    return subprocess.run(
        [*bnfold_exe(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------------------------
# bnfold IN OUT


def test_second_positional_is_the_output(model: Path, rng: np.random.Generator) -> None:
    out = model.with_name("out.onnx")
    result = runner.invoke(app, [str(model), str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert bn_names(out) == ["bn2"]
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(str(out), {"x": x})[0], run_ort(str(model), {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def test_output_given_twice_is_a_usage_error(model: Path) -> None:
    result = runner.invoke(
        app, [str(model), str(model.with_name("a.onnx")), "-o", str(model.with_name("b.onnx"))]
    )
    assert result.exit_code == 2
    one_error_line(result.stderr, "given twice", "a.onnx", "b.onnx")
    assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"]


def test_entry_point_in_out_form(model: Path) -> None:
    proc = run_bnfold("m.onnx", "out.onnx", cwd=model.parent)
    assert proc.returncode == 0, proc.stderr
    assert bn_names(model.with_name("out.onnx")) == ["bn2"]


# --------------------------------------------------------------------------------------------
# -o deploy/


@pytest.mark.parametrize("how", ["option", "positional"], ids=["option", "positional"])
def test_output_folder_with_slash_is_created(model: Path, how: str) -> None:
    folder = model.parent / "deploy" / "v2"
    args = ["-o", f"{folder}/"] if how == "option" else [f"{folder}/"]
    result = runner.invoke(app, [str(model), *args, "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(folder)) == ["m.folded.onnx"]
    assert bn_names(folder / "m.folded.onnx") == ["bn2"]


def test_output_folder_created_is_removed_when_nothing_is_written(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A fold refused by verification (an op onnxruntime cannot run) leaves no empty folder behind."""
    from onnx import helper

    m = conv_bn_model(rng)
    m.graph.node[-1].CopyFrom(
        helper.make_node("Swish", ["bn1_out"], ["y"], domain="com.example", name="custom")
    )
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    src = save(m, tmp_path / "custom.onnx")
    result = runner.invoke(app, [src, "-o", str(tmp_path / "deploy") + "/", "-q"])
    assert result.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_output_folder_without_slash_that_does_not_exist_is_exit_2(model: Path) -> None:
    result = runner.invoke(app, [str(model), "-o", str(model.parent / "nodir" / "x.onnx")])
    assert result.exit_code == 2
    one_error_line(result.stderr, "does not exist")


def test_empty_output_is_refused(model: Path) -> None:
    result = runner.invoke(app, [str(model), "-o", ""])
    assert result.exit_code == 2
    one_error_line(result.stderr, "-o/--output", "empty")
    assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"]


# --------------------------------------------------------------------------------------------
# --shape NAME:DIMS


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("input:1,3,224,224", ("input", (1, 3, 224, 224))),
        ("input:1x3x224x224", ("input", (1, 3, 224, 224))),
        ("input:[1,3,224,224]", ("input", (1, 3, 224, 224))),
        ("input=[1, 3, 224, 224]", ("input", (1, 3, 224, 224))),
        ("input:0:1,3", ("input:0", (1, 3))),
        ("input:0=1x3", ("input:0", (1, 3))),
    ],
    ids=["colon-commas", "colon-x", "colon-brackets", "equals-brackets", "tf-name-colon", "tf-name-equals"],
)
def test_parse_shape_peer_forms(spec: str, parsed: tuple[str, tuple[int, ...]]) -> None:
    assert parse_shape(spec) == parsed


@pytest.mark.parametrize("spec", ["x:1,3,8,8", "x:[1,3,8,8]"], ids=["colon", "brackets"])
def test_shape_peer_forms_through_the_cli(model: Path, spec: str) -> None:
    result = runner.invoke(app, [str(model), "-o", str(model.with_name("f.onnx")), "--shape", spec, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verification"]["status"] == "passed"
    assert [i["shape"] for i in doc["verification"]["inputs"]] == [[1, 3, 8, 8]]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--shape", "x=99999999999999999999"], ("--shape", "larger than")),
        (["--shape", "x:[1,3"], ("--shape", "x:[1,3")),
        (["--seed", "-1"], ("--seed",)),
        (["--samples", "99999999999999999999"], ("--samples",)),
        (["--rtol", "inf"], ("--rtol", "finite")),
        (["--atol", "1e400"], ("--atol", "finite")),
        (["--json-file", ""], ("--json-file", "empty")),
    ],
    ids=[
        "twenty-digit-dimension",
        "unclosed-bracket",
        "negative-seed",
        "twenty-digit-samples",
        "infinite-rtol",
        "overflowing-atol",
        "empty-report-path",
    ],
)
def test_out_of_range_numbers_are_one_line_exit_2(
    model: Path, args: list[str], needles: tuple[str, ...]
) -> None:
    result = runner.invoke(app, [str(model), *args])
    assert result.exit_code == 2
    one_error_line(result.stderr, *needles)
    assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"]


def test_entry_point_negative_seed(model: Path) -> None:
    proc = run_bnfold("m.onnx", "--seed", "-1", cwd=model.parent)
    assert proc.returncode == 2 and proc.stdout == ""
    one_error_line(proc.stderr, "--seed")


# --------------------------------------------------------------------------------------------
# --exclude takes what the reports print


@pytest.mark.parametrize("name", ["bn1", "bn1_out"], ids=["node-name", "tensor-name"])
def test_exclude_by_node_or_tensor_name(model: Path, name: str) -> None:
    result = runner.invoke(
        app, [str(model), "-o", str(model.with_name("f.onnx")), "--exclude", name, "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["report"]["bn_folded"] == 0
    assert {(s["bn"], s["reason"]) for s in doc["report"]["skipped"]} >= {("bn1", "excluded")}
    assert bn_names(model.with_name("f.onnx")) == ["bn1", "bn2"]


def test_exclude_an_unnamed_bn_by_its_printed_label(tmp_path: Path, rng: np.random.Generator) -> None:
    m = conv_bn_model(rng)
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn.name = ""
    src = save(m, tmp_path / "u.onnx")
    result = runner.invoke(
        app, [src, "-o", str(tmp_path / "f.onnx"), "--exclude", "BatchNormalization(bn1_out)", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"]["skipped"][0]["reason"] == "excluded"


@pytest.mark.parametrize(
    ("name", "needles"),
    [("nope", ("no BatchNormalization", "'nope'")), ("relu1", ("Relu", "not a BatchNormalization"))],
    ids=["unknown", "not-a-bn"],
)
def test_exclude_that_matches_no_bn_is_exit_2(model: Path, name: str, needles: tuple[str, ...]) -> None:
    result = runner.invoke(app, [str(model), "-o", str(model.with_name("f.onnx")), "--exclude", name])
    assert result.exit_code == 2
    one_error_line(result.stderr, "--exclude", *needles)
    assert not model.with_name("f.onnx").exists()


# --------------------------------------------------------------------------------------------
# help


def test_root_help_shows_the_fold_options_examples_and_no_python_types() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = result.stdout
    for needle in (
        "Usage: bnfold MODEL [OUT] [OPTIONS]",
        "--shape",
        "--exclude",
        "Examples:",
        "bnfold check models/",
    ):
        assert needle in text, text
    assert "<str>" not in text and "list[str]" not in text
    assert "Fold BN in MODEL, verify, write OUT (the default command)." in text  # not cut short


@pytest.mark.parametrize("command", ["fold", "check"], ids=["fold", "check"])
def test_command_help_has_no_python_types(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "<str>" not in result.stdout and "<list" not in result.stdout and "{MODEL}" not in result.stdout
    assert "Examples:" in result.stdout


# --------------------------------------------------------------------------------------------
# the repository a newcomer clones


ROOT = Path(__file__).resolve().parents[2]


def test_license_file_matches_pyproject() -> None:
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_pre_commit_hook_runs_once_per_commit() -> None:
    """Before: pre-commit split the files into parallel batches, one table and summary each."""
    hook = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "\n  require_serial: true\n" in hook and "require_serial: false" not in hook


def test_package_is_typed() -> None:
    import bnfold

    assert (Path(bnfold.__file__).parent / "py.typed").exists()


def test_quiet_no_verify_run_does_not_import_rich_consoles(model: Path) -> None:
    """Issue 14: a `-q --no-verify` run prints nothing, so it must not pay for rich's consoles
    and tables (nor the renderer that builds them)."""
    probe = (
        "import sys\n"
        "from bnfold.cli import main\n"
        "try:\n"
        f"    main([{str(model)!r}, {str(model.with_name('f.onnx'))!r}, '--no-verify', '-q'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print(sorted(m for m in ('rich.console', 'rich.table', 'rich.progress', 'bnfold.cli.render') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert bn_names(model.with_name("f.onnx")) == ["bn2"]


def test_results_and_errors_have_precise_types() -> None:
    """Issue 11: FoldResult.model, VerificationError.result and ExportResult.extra were typed Any,
    so mypy and pyright saw the API as Any."""
    import typing

    from bnfold import report
    from bnfold.errors import VerificationError
    from bnfold.verify.rollback import Verified

    names = {"onnx": onnx, **vars(report), "Verified": Verified}
    assert typing.get_type_hints(report.FoldResult, localns=names)["model"] is onnx.ModelProto
    assert typing.get_type_hints(report.ExportResult, localns=names)["extra"] is report.ExportExtra
    extra = typing.get_type_hints(report.ExportExtra, localns=names)
    assert extra == {"exporter": str, "torch_vs_onnx": report.VerifyReport}
    init = typing.get_type_hints(VerificationError.__init__, localns=names)
    assert set(typing.get_args(init["result"])) == {
        report.FoldResult,
        report.ExportResult,
        Verified,
        type(None),
    }
    assert set(typing.get_args(init["report"])) == {report.VerifyReport, type(None)}


@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        (None, "pip install 'bnfold[torch]'"),
        (
            '{"url": "file:///src/bn%20fold", "dir_info": {"editable": true}}',
            "pip install -e '/src/bn fold[torch]'",
        ),
        ('{"url": "file:///src/bnfold", "dir_info": {}}', "pip install '/src/bnfold[torch]'"),
        ('{"url": "https://example.org/bnfold.tar.gz", "archive_info": {}}', "pip install 'bnfold[torch]'"),
    ],
    ids=["index", "editable-checkout", "local-dir", "url"],
)
def test_install_hint_matches_how_bnfold_was_installed(
    monkeypatch: pytest.MonkeyPatch, direct_url: str | None, expected: str
) -> None:
    """Issue 11: a source checkout was told `pip install 'bnfold[torch]'`, which fetches another bnfold."""
    import importlib.metadata

    from bnfold.cli.versions import install_command

    class Dist:
        def read_text(self, name: str) -> str | None:
            return direct_url if name == "direct_url.json" else None

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    assert install_command("torch") == expected


def test_shape_for_a_name_the_model_lacks_speaks_cli_words(model: Path) -> None:
    """Issue 11: the verifier's 'shapes names unknown input(s) [...]' reached the user."""
    result = runner.invoke(
        app, [str(model), "-o", str(model.with_name("f.onnx")), "--shape", "input=1x3x8x8"]
    )
    assert result.exit_code == 2
    one_error_line(result.stderr, "--shape", "'input' is not an input of", "m.onnx", "its inputs: x")
    assert "shapes names" not in result.stderr


# --------------------------------------------------------------------------------------------
# PyTorch from the CLI


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("torch")
    (tmp_path / "cli_factories.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_output_names_for_a_pytorch_export(factories: Path) -> None:
    """Issue 11: exported outputs were named like '39'; the torch-vs-ONNX line names the same output."""
    out = factories / "net.onnx"
    args = [
        "--factory",
        "cli_factories:make",
        "--shape",
        "image=1x3x8x8",
        "--output-name",
        "logits",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["logits"]
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["image"]
    assert [d["name"] for d in doc["export"]["torch_vs_onnx"]["outputs"]] == ["logits"]
    assert [d["name"] for d in doc["verification"]["outputs"]] == ["logits"]
    human = runner.invoke(app, [*args[:-1], "-o", str(out)])  # OUT exists now: -o replaces it
    assert human.exit_code == 0, human.output
    assert "worst output logits" in human.stdout


def test_output_name_for_an_onnx_model_is_a_usage_error(model: Path) -> None:
    result = runner.invoke(app, [str(model), "--output-name", "y"])
    assert result.exit_code == 2
    one_error_line(result.stderr, "--output-name", "PyTorch")


def test_factory_that_exits_is_exit_2_not_0(factories: Path) -> None:
    """Issue 10 item 16: --factory code raising SystemExit gave exit 0, nothing written, no message."""
    result = runner.invoke(app, ["--factory", "cli_factories:leave", "--shape", "x=1x3x8x8", "-o", "f.onnx"])
    assert result.exit_code == 2
    one_error_line(result.stderr, "cli_factories:leave", "sys.exit(0)")
    assert not (factories / "f.onnx").exists()


def test_factory_positional_naming_an_existing_file_is_not_replaced(factories: Path) -> None:
    """`bnfold model.onnx --factory ...` must not read as 'write the factory's export over model.onnx'."""
    existing = factories / "model.onnx"
    existing.write_bytes(b"keep me")
    result = runner.invoke(app, [str(existing), "--factory", "cli_factories:make", "--shape", "x=1x3x8x8"])
    assert result.exit_code == 2
    one_error_line(result.stderr, "MODEL or --factory", "-o")
    assert existing.read_bytes() == b"keep me"


# --------------------------------------------------------------------------------------------
# --inputs of another dtype


@pytest.mark.parametrize(
    ("make", "source"),
    [
        (lambda rng: rng.integers(0, 255, (1, 3, 8, 8)).astype(np.uint8), "uint8"),
        (lambda rng: rng.standard_normal((1, 3, 8, 8)).astype(np.float32).astype(np.float64), "float64"),
    ],
    ids=["uint8-image", "float64-holding-float32-values"],
)
def test_exact_npz_casts_are_reported(model: Path, rng: np.random.Generator, make, source: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: .npz arrays of another dtype were cast silently."""
    npz = model.with_name("in.npz")
    np.savez(npz, x=make(rng))
    result = runner.invoke(
        app, [str(model), "-o", str(model.with_name("f.onnx")), "--inputs", str(npz), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["input_casts"] == [{"input": "x", "from": source, "to": "float32"}]
    assert doc["verification"]["status"] == "passed" and doc["verification"]["input_source"].startswith(
        "npz:"
    )
    human = runner.invoke(app, [str(model), "-o", str(model.with_name("g.onnx")), "--inputs", str(npz)])
    assert f"inputs cast to the model's types: x {source} → float32 (every value exact)" in human.stdout


@pytest.mark.parametrize("command", ["fold", "check"], ids=["fold", "check-against"])
def test_lossy_npz_cast_is_refused(model: Path, rng: np.random.Generator, command: str) -> None:
    """Issue 11: a float64 array with more precision than float32 was verified on other values."""
    npz = model.with_name("in.npz")
    np.savez(npz, x=rng.standard_normal((1, 3, 8, 8)))  # float64, not representable in float32
    out = model.with_name("f.onnx")
    if command == "fold":
        args = [str(model), "-o", str(out), "--inputs", str(npz)]
    else:
        runner.invoke(app, [str(model), "-o", str(out), "-q"])
        args = ["check", str(out), "--against", str(model), "--inputs", str(npz)]
    before = out.read_bytes() if out.exists() else None
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, "--inputs", "'x'", "float64", "float32", "192 values change")
    assert (out.read_bytes() if out.exists() else None) == before
