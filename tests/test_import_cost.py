"""A fold without verification never imports onnx's package, ml_dtypes or onnxruntime (issue 14).

``import onnx`` costs 0.5 s (its ``__init__`` imports ml_dtypes), more than folding a 100 MB model.
Each case runs in a fresh interpreter (the test process has imported onnx long ago) and reports
which of the watched modules it imported; the files it writes must equal, byte for byte, what
the same fold writes in this process, where the real package was imported first.

Converter-shaped models whose fold needs onnx's shape inference or its reference evaluator may
import onnx; they are listed in ``NEEDS_ONNX`` with the reason. Models on the common path
(Conv/Gemm/MatMul + BN or a Mul/Add chain) that import it today although their fold needs no more
than a rank the model declares or its producer implies are strict xfails naming where the import
happens; when it stops, the xfail fails and the mark goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from bnfold import analyze_onnx, fold_path
from bnfold.cli import main as cli_main
from models.converters import BUILDERS
from models.registry import DEMO_PATH
from onnx_builders import G, gemm_bn, matmul_bn

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("onnx", "onnx.helper", "onnx.defs", "ml_dtypes", "onnxruntime")

PROBE = r"""
import json, sys
mode, args = sys.argv[1], sys.argv[2:]
code, report = 0, None
if mode == "cli":
    from bnfold.cli import main
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
elif mode == "fold_path":
    import bnfold
    bnfold.fold_path(args[0], args[1], verify=False)
elif mode == "analyze":
    import bnfold
    report = bnfold.analyze_onnx(args[0]).to_dict()
watched = __WATCHED__
print("PROBE " + json.dumps({"code": code, "report": report, "imported": [m for m in watched if m in sys.modules]}))
""".replace("__WATCHED__", repr(WATCHED))

# Why a converter model's fold may import onnx: what it needs that only onnx computes.
_EVALUATED = (
    "evaluated with onnx's reference evaluator after shape inference on the node sizes its output "
    "(constants.py output_size/evaluate)"
)
NEEDS_ONNX = {
    "levit-linear-bn": "Reshape (B,N,C)->(B*N,C): its static input/output shapes prove the channel axis (paths.py)",
    "trap-reshape-merges-channel": "Reshape: static shapes prove it merges the channel axis (paths.py)",
    "mixnet-concat-bn": "Concat split: each branch's channel count comes from shape inference (concat.py)",
    "trap-concat-branch-shared": "Concat: its rank and the branches' channel counts from shape inference (concat.py)",
    "arcface-head": "forward fold through Flatten: its input/output shapes from shape inference (forward.py)",
    "tf2onnx-raw-nhwc": "weights are Transpose nodes of initializers, " + _EVALUATED,
    "tf2onnx-raw-conv3d": "weights are Transpose nodes of initializers, " + _EVALUATED,
    "keras3-tf2onnx-raw": "weights are Transpose nodes of initializers, " + _EVALUATED,
    "torch-dynamo-resnet": "the bias-less Conv's zero bias is Expand(CastLike(0, x), Shape(W)[0:1]), "
    + _EVALUATED
    + "; before that, CastLike's element type of the declared input 'x' runs shape inference on the model",
}

# Common-path folds that import onnx today although their fold needs no more than a rank the
# model declares or its producers imply (each a strict xfail with the reason): none left.
IMPORTS_TODAY: dict[str, str] = {}


def _conv_bn_stack(rng: np.random.Generator, layers: int = 3, c: int = 48) -> G:
    """x -> (Conv 3x3 -> BN -> Relu) x layers; each weight 48*48*9*4 = 83 kB."""
    g = G(rng)
    t = g.input("x", [1, c, 8, 8])
    for i in range(layers):
        w = g.init(f"w{i}", rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32))
        b = g.init(f"b{i}", rng.normal(0, 0.2, c).astype(np.float32))
        g.node("Conv", [t, w, b], [f"c{i}"], pads=[1, 1, 1, 1])
        g.bn(f"c{i}", c, f"n{i}", prefix=f"bn{i}")
        g.node("Relu", [f"n{i}"], [f"r{i}"])
        t = f"r{i}"
    g.output(t, shape=[1, c, 8, 8])
    return g


def _mul_add_chain(rng: np.random.Generator) -> G:
    """x -> Conv -> Mul (1,C,1,1) -> Add (1,C,1,1) -> Relu: a BN written as a Mul/Add chain."""
    g = G(rng)
    g.input("x", [2, 4, 6, 6])
    w = g.init("W", rng.normal(0, 1, (5, 4, 3, 3)).astype(np.float32))
    g.node("Conv", ["x", w], ["y"], pads=[1, 1, 1, 1])
    scale = rng.uniform(0.5, 1.5, (1, 5, 1, 1)) * rng.choice([-1.0, 1.0], (1, 5, 1, 1))
    g.node("Mul", ["y", g.init("s", scale.astype(np.float32))], ["ys"])
    g.node("Add", ["ys", g.init("t", rng.normal(0, 0.5, (1, 5, 1, 1)).astype(np.float32))], ["yt"])
    g.node("Relu", ["yt"], ["out"])
    g.output("out", shape=[2, 5, 6, 6])
    return g


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


BUILT: dict[str, Callable[[Path], None]] = {
    "external": lambda p: _save_external(_conv_bn_stack(np.random.default_rng(3)).model(), p),
    "gemm_bn": lambda p: onnx.save(gemm_bn(np.random.default_rng(4)).model(), str(p)),
    "matmul_add_bn": lambda p: onnx.save(matmul_bn(np.random.default_rng(5), add=True).model(), str(p)),
    "mul_add_chain": lambda p: onnx.save(_mul_add_chain(np.random.default_rng(6)).model(), str(p)),
}
CASES = ["demo", *BUILT, *BUILDERS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("import_cost_models")
    for name, write in BUILT.items():
        write(d / f"{name}.onnx")
    for name, build in BUILDERS.items():
        onnx.save(build(0), str(d / f"{name}.onnx"))
    return d


def _src(model_dir: Path, case: str) -> Path:
    return DEMO_PATH if case == "demo" else model_dir / f"{case}.onnx"


def probe(mode: str, *args: str | os.PathLike[str]) -> dict:
    """Run ``mode`` (cli, fold_path, analyze) in a fresh interpreter; its exit code, report and
    the watched modules it imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *map(str, args)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert r.returncode == 0 and lines, f"probe failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1][len("PROBE ") :])


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def cli_in_this_process(argv: list[str]) -> int:
    try:
        cli_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


_cli_runs: dict[str, tuple[dict, dict[str, bytes]]] = {}


def fold_cli_fresh(model_dir: Path, case: str, tmp_root: Path) -> tuple[dict, dict[str, bytes]]:
    """The CLI fold of ``case`` in a fresh interpreter (run once per case): probe result and files."""
    if case not in _cli_runs:
        out_dir = tmp_root / f"fresh-{case}"
        out_dir.mkdir()
        result = probe("cli", _src(model_dir, case), "-o", out_dir / "out.onnx", "--no-verify", "-q")
        _cli_runs[case] = (result, files_of(out_dir))
    return _cli_runs[case]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("import_cost_runs")


def _import_param(case: str) -> object:
    if case in IMPORTS_TODAY:
        return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=IMPORTS_TODAY[case]))
    return case


@pytest.mark.parametrize("case", [_import_param(c) for c in CASES if c not in NEEDS_ONNX])
def test_cli_fold_without_verify_imports_no_onnx(model_dir: Path, tmp_root: Path, case: str) -> None:
    """``bnfold MODEL -o OUT --no-verify -q`` imports none of onnx, ml_dtypes, onnxruntime."""
    result, files = fold_cli_fresh(model_dir, case, tmp_root)
    assert result["code"] == 0
    assert "out.onnx" in files
    assert result["imported"] == []


@pytest.mark.parametrize("case", CASES)
def test_cli_fold_writes_what_a_process_with_onnx_writes(
    model_dir: Path, tmp_root: Path, tmp_path: Path, case: str
) -> None:
    """The stand-in for onnx changes nothing in the result: the fresh process's files equal those
    of the same fold here, where the real package was imported before bnfold."""
    assert "onnx" in sys.modules
    result, fresh = fold_cli_fresh(model_dir, case, tmp_root)
    assert result["code"] == 0
    out = tmp_path / "out.onnx"
    assert cli_in_this_process([str(_src(model_dir, case)), "-o", str(out), "--no-verify", "-q"]) == 0
    here = files_of(tmp_path)
    assert sorted(fresh) == sorted(here)
    for name in here:
        assert fresh[name] == here[name], f"{case}: {name} differs"
    if case == "external":
        assert "out.onnx.data" in here  # the external layout was kept, so the case tests it


def test_external_case_really_has_large_external_weights(model_dir: Path) -> None:
    """The external-data case exercises the lazy loader: weights > 64 kB in a data file."""
    m = onnx.load(str(model_dir / "external.onnx"), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) >= 3
    assert all(np.prod(t.dims) * 4 > 64 * 1024 for t in external if len(t.dims) == 4)
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 3


@pytest.mark.parametrize("case", ["external", "gemm_bn"])
def test_fold_path_without_verify_imports_no_onnx(model_dir: Path, tmp_path: Path, case: str) -> None:
    """``bnfold.fold_path(src, dst, verify=False)``: no onnx, and the same files as here."""
    fresh_dir, here_dir = tmp_path / "fresh", tmp_path / "here"
    fresh_dir.mkdir()
    here_dir.mkdir()
    result = probe("fold_path", _src(model_dir, case), fresh_dir / "out.onnx")
    assert result["imported"] == []
    fold_path(_src(model_dir, case), here_dir / "out.onnx", verify=False)
    assert files_of(fresh_dir) == files_of(here_dir)


@pytest.mark.parametrize("case", ["external", "gemm_bn"])
def test_analyze_onnx_imports_no_onnx(model_dir: Path, case: str) -> None:
    """``bnfold.analyze_onnx(path)``: no onnx, and the same report as here."""
    result = probe("analyze", _src(model_dir, case))
    assert result["imported"] == []
    here = json.loads(json.dumps(analyze_onnx(str(_src(model_dir, case))).to_dict()))
    assert result["report"] == here
    assert result["report"]["bn_folded"] == {"external": 3, "gemm_bn": 1}[case]


@pytest.mark.parametrize(
    ("case", "extra"), [("external", []), ("gemm_bn", ["--json"])], ids=["table", "json"]
)
def test_check_imports_no_onnx(model_dir: Path, case: str, extra: list[str]) -> None:
    """``bnfold check MODEL`` (the CI command) verifies nothing without --against: no onnx. Exit 1:
    the models' BN are foldable findings."""
    result = probe("cli", "check", *extra, _src(model_dir, case))
    assert result["code"] == 1
    assert result["imported"] == []


@pytest.mark.parametrize(
    "options",
    [["fold", "--json", "--external-data"], ["-v", "--exclude", "bn"]],
    ids=["fold-json-external", "verbose-exclude"],
)
def test_cli_fold_options_import_no_onnx(model_dir: Path, tmp_path: Path, options: list[str]) -> None:
    """The report, logging and layout options of a fold without verification import no onnx."""
    head = options[:1] if options[0] == "fold" else []
    rest = options[len(head) :]
    args = [*head, _src(model_dir, "gemm_bn"), "-o", tmp_path / "out.onnx", "--no-verify", *rest]
    result = probe("cli", *args)
    assert result["code"] == 0
    assert (tmp_path / "out.onnx").exists()
    assert result["imported"] == []


def test_the_real_entry_point_imports_no_onnx(model_dir: Path, tmp_path: Path) -> None:
    """``python -m bnfold MODEL -o OUT --no-verify`` as a user runs it: ``-X importtime`` lists every
    module the interpreter imported; none is watched."""
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "bnfold",
            str(_src(model_dir, "external")),
            "-o",
            str(tmp_path / "out.onnx"),
            "--no-verify",
            "-q",
        ],
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert {"bnfold.cli", "bnfold.onnx.protos", "numpy"} <= imported  # the listing is read right
    assert sorted(imported & set(WATCHED)) == []
    assert not [m for m in imported if m.startswith(("onnx.", "ml_dtypes.", "onnxruntime."))]


def test_probe_sees_an_onnx_import(tmp_path: Path) -> None:
    """The probe can fail: a fold with verification imports onnxruntime (and onnx)."""
    gemm = tmp_path / "gemm.onnx"
    onnx.save(gemm_bn(np.random.default_rng(4)).model(), str(gemm))
    result = probe("cli", gemm, "-o", tmp_path / "out.onnx", "-q")
    assert result["code"] == 0
    assert "onnxruntime" in result["imported"]


def test_needs_onnx_lists_only_converters() -> None:
    assert set(NEEDS_ONNX) <= set(BUILDERS)
    assert not set(NEEDS_ONNX) & set(IMPORTS_TODAY)
    assert set(IMPORTS_TODAY) <= set(CASES)
