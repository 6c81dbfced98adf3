"""Issue 10 items 8 and 10, and its runner: hostile graphs through every entry point.

Each model below is driven five ways: the fold command (a subprocess of the installed entry
point, its peak memory measured), ``check``, ``check --json``, ``check --junit-xml`` (CliRunner)
and the API (``fold_onnx``, ``analyze_onnx``). Bad input must give exit 2 with one
``bnfold: error:`` line naming the problem and an InputError from the API; a valid but odd model
exit 0 or 1. Either way: no traceback, the input's bytes unchanged, nothing written on error,
``--json`` stdout valid JSON, the JUnit report well-formed XML.

Before: wrongly typed attributes were ValueError/TypeError and nodes without inputs or outputs
IndexError (``internal error``, exit 3); a 1 KB model whose BN mean is ``ConstantOfShape([2^29])``
made ``check`` allocate 2.1 GB.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from test_cli_output import bnfold_exe
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.errors import InputError
from cli_builders import one_error_line

sys.path.insert(0, str(Path(__file__).parents[1] / "io"))  # the loader's hostile generator
from io_hostile import MALFORMED, malformed_bytes

runner = CliRunner()
C = 4
PEAK_RSS_LIMIT_MB = 500


def _bn_inits(rng: np.random.Generator, skip: str = "") -> list[TensorProto]:
    """Non-trivial BN statistics (gamma != 1, beta != 0, mean != 0, random var)."""
    values = {
        "g": rng.uniform(0.5, 2.0, C),
        "b": rng.normal(0.3, 1.0, C),
        "m": rng.normal(-0.2, 1.0, C),
        "v": rng.uniform(0.3, 2.0, C),
    }
    return [numpy_helper.from_array(a.astype(np.float32), n) for n, a in values.items() if n != skip]


def conv_bn(
    *,
    bn_attrs: tuple[AttributeProto, ...] = (),
    conv_attrs: tuple[AttributeProto, ...] = (),
    between: tuple[onnx.NodeProto, ...] = (),
    bn_input: str = "y",
    mean: str = "m",
    extra: tuple[TensorProto, ...] = (),
    batch: int | str = 1,
) -> onnx.ModelProto:
    """x -> Conv(W) -> [between] -> BatchNormalization -> z, opset 17."""
    rng = np.random.default_rng(10)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "W"),
        *_bn_inits(rng, skip="" if mean == "m" else "m"),
        *extra,
    ]
    conv = helper.make_node("Conv", ["x", "W"], ["y"], name="conv")
    conv.attribute.extend(conv_attrs)
    bn = helper.make_node("BatchNormalization", [bn_input, "g", "b", mean, "v"], ["z"], name="bn")
    bn.attribute.extend(bn_attrs)
    graph = helper.make_graph(
        [conv, *between, bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_bn(trans_b: AttributeProto) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 6)).astype(np.float32), "W"), *_bn_inits(rng)]
    gemm = helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm")
    gemm.attribute.append(trans_b)
    bn = helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn")
    graph = helper.make_graph(
        [gemm, bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def typed(name: str, kind: int, **fields: object) -> AttributeProto:
    """An attribute of any type, however wrong: ``typed("epsilon", UNDEFINED)`` has no value."""
    a = AttributeProto(name=name, type=kind)
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(a, key).extend(value)
        else:
            setattr(a, key, value)
    return a


def without_conv_inputs() -> onnx.ModelProto:
    model = conv_bn()
    del model.graph.node[0].input[:]
    return model


def without_bn_outputs() -> onnx.ModelProto:
    model = conv_bn()
    del model.graph.node[-1].output[:]
    return model


def _constant(output: str, value: AttributeProto) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [output], name="c")
    node.attribute.append(value)
    return node


def const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


FILL = numpy_helper.from_array(np.array([0.5], np.float32), "fill")


@dataclass(frozen=True)
class Case:
    build: Callable[[], bytes]
    needle: str
    """A fragment of the one error line; empty for a valid model (exit 0 or 1, BN left with it as reason)."""
    reason: str = ""


def _model(make: Callable[[], onnx.ModelProto]) -> Callable[[], bytes]:
    return lambda: make().SerializeToString()


F, I, S, U = AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING, AttributeProto.UNDEFINED
CASES: dict[str, Case] = {
    "bn-training-mode-string": Case(
        _model(lambda: conv_bn(bn_attrs=(typed("training_mode", S, s=b"yes"),))),
        "attribute 'training_mode' has type STRING, expected INT",
    ),
    "bn-epsilon-without-type": Case(
        _model(lambda: conv_bn(bn_attrs=(typed("epsilon", U),))),
        "attribute 'epsilon' has type UNDEFINED, expected FLOAT",
    ),
    "bn-epsilon-an-int": Case(
        _model(lambda: conv_bn(bn_attrs=(typed("epsilon", I, i=1),))),
        "'epsilon' has type INT, expected FLOAT",
    ),
    "bn-epsilon-refers-to-a-function-attribute": Case(
        _model(lambda: conv_bn(bn_attrs=(typed("epsilon", F, ref_attr_name="eps"),))),
        "takes its value from the function's attribute 'eps'",
    ),
    "conv-group-a-float": Case(
        _model(lambda: conv_bn(conv_attrs=(typed("group", F, f=1.0),))),
        "'group' has type FLOAT, expected INT",
    ),
    "gemm-transB-a-string": Case(
        _model(lambda: gemm_bn(typed("transB", S, s=b"1"))), "'transB' has type STRING, expected INT"
    ),
    "transpose-perm-floats": Case(
        _model(
            lambda: conv_bn(
                between=(
                    helper.make_node(
                        "Transpose",
                        ["y"],
                        ["t"],
                        perm=[0.0, 1.0, 2.0, 3.0],  # type: ignore[list-item]
                    ),
                ),
                bn_input="t",
            )
        ),
        "'perm' has type FLOATS, expected INTS",
    ),
    "conv-without-inputs": Case(_model(without_conv_inputs), "(Conv) in the main graph has 0 inputs"),
    "bn-without-outputs": Case(
        _model(without_bn_outputs), "(BatchNormalization) in the main graph has 0 outputs"
    ),
    "constant-without-value": Case(
        _model(lambda: conv_bn(between=(helper.make_node("Constant", [], ["m2"], name="c"),), mean="m2")),
        "node 'c' (Constant) in the main graph has 0 attributes",
    ),
    "constant-value-a-float": Case(
        _model(
            lambda: conv_bn(
                between=(_constant("m2", typed("value", F, f=0.5)),),
                mean="m2",
            )
        ),
        "node 'c' (Constant): attribute 'value' has type FLOAT, expected TENSOR",
    ),
    "bn-mean-constant-of-shape-2^29": Case(
        _model(
            lambda: conv_bn(
                between=(helper.make_node("ConstantOfShape", ["shp"], ["m2"], value=FILL),),
                mean="m2",
                extra=(const("shp", np.array([1 << 29], np.int64)),),
            )
        ),
        "",
        "which would make 536,870,912 elements: too large to evaluate",
    ),
    "bn-mean-expand-to-2^29": Case(
        _model(
            lambda: conv_bn(
                between=(helper.make_node("Expand", ["half", "shp"], ["m2"]),),
                mean="m2",
                extra=(
                    const("half", np.array([0.5], np.float32)),
                    const("shp", np.array([1 << 29], np.int64)),
                ),
            )
        ),
        "",
        "too large to evaluate",
    ),
    "bn-mean-broadcast-add-2^14-by-2^14": Case(
        _model(
            lambda: conv_bn(
                between=(
                    helper.make_node("ConstantOfShape", ["col_shape"], ["col"], value=FILL),
                    helper.make_node("ConstantOfShape", ["row_shape"], ["row"], value=FILL),
                    helper.make_node("Add", ["col", "row"], ["square"]),
                    helper.make_node("Reshape", ["square", "flat"], ["m2"]),
                ),
                mean="m2",
                extra=(
                    const("col_shape", np.array([1 << 14, 1], np.int64)),
                    const("row_shape", np.array([1, 1 << 14], np.int64)),
                    const("flat", np.array([-1], np.int64)),
                ),
            )
        ),
        "",
        "which would make 268,435,456 elements",
    ),
    "bn-mean-of-a-data-dependent-size": Case(
        _model(
            lambda: conv_bn(
                between=(
                    helper.make_node("NonZero", ["mask"], ["where"]),
                    helper.make_node("Reshape", ["where", "flat"], ["flat_where"]),
                    helper.make_node("Cast", ["flat_where"], ["m2"], to=TensorProto.FLOAT),
                ),
                mean="m2",
                extra=(const("mask", np.ones(C, np.float32)), const("flat", np.array([-1], np.int64))),
            )
        ),
        "",
        "is computed by NonZero '', which would make an unknown number of elements",
    ),
    **{
        f"loader-{name}": Case(lambda name=name: malformed_bytes(name), MALFORMED[name][1])
        for name in ("raw-shorter-than-dims", "element-type-999", "dims-negative", "dims-product-overflows")
    },
}

MEASURE = """
import resource, subprocess, sys, json
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "peak_mb": peak}))
"""
"""Runs a command and reports its exit code, output and peak RSS (of that command alone)."""


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_hostile_graph_is_one_line_or_a_reason_everywhere(tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    src = tmp_path / "m.onnx"
    src.write_bytes(spec.build())
    before = listing(tmp_path)
    bad = bool(spec.needle)

    # the fold, through the installed entry point, its peak memory measured
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    run = json.loads(
        subprocess.run(
            [sys.executable, "-c", MEASURE, *bnfold_exe(), str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert run["peak_mb"] < PEAK_RSS_LIMIT_MB, run
    if bad:
        assert run["rc"] == 2, run
        one_error_line(run["stderr"], "m.onnx", spec.needle)
        assert not any(out.parent.iterdir()), "nothing is written on error"
    else:
        assert run["rc"] == 0, run
        assert "Traceback" not in run["stderr"] and spec.reason in run["stdout"], run
        assert out.exists()

    # check, check --json, check --junit-xml
    result = runner.invoke(app, ["check", str(src)])
    assert result.exit_code == (2 if bad else 0), result.output
    if bad:
        one_error_line(result.stderr, spec.needle)
    else:
        assert "Traceback" not in result.output and spec.reason in result.stdout
    result = runner.invoke(app, ["check", str(src), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["exit_code"] == (2 if bad else 0)
    [entry] = doc["models"]
    assert entry["status"] == ("error" if bad else "clean")
    if bad:
        assert entry["error_type"] == "input-error" and spec.needle in entry["error"]
    else:
        assert spec.reason in json.dumps(entry["report"])
    junit = tmp_path / "out" / "j.xml"
    result = runner.invoke(app, ["check", str(src), "--junit-xml", str(junit)])
    assert result.exit_code == (2 if bad else 0)
    [testcase] = ET.parse(junit).getroot().findall("./testsuite/testcase")
    assert (testcase.find("error") is not None) == bad
    junit.unlink()

    # the API
    for call in (bnfold.fold_onnx, bnfold.analyze_onnx):
        if bad:
            with pytest.raises(InputError, match=None) as info:
                call(str(src))
            assert spec.needle in str(info.value) and "\n" not in str(info.value)
        else:
            report = call(str(src))
            report = getattr(report, "report", report)
            assert not report.folded
            [skipped] = report.skipped
            assert spec.reason in skipped.detail

    assert listing(tmp_path) == before, "the input is untouched and nothing is left beside it"


# --------------------------------------------------------------------------------------------
# 10: an --inputs .npz that inflates to gigabytes


def npz_of_zeros(path: Path, key: str, megabytes: int) -> Path:
    """An .npz whose array ``key`` holds ``megabytes`` MB of float32 zeros (about 0.1% of that on disk)."""
    count = megabytes * (1 << 20) // 4
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32)) | {"shape": (count,)}
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z,
        z.open(f"{key}.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        chunk = bytes(1 << 20)
        for _ in range(megabytes):
            member.write(chunk)
    return path


def npz_declaring(path: Path, key: str, size: int) -> Path:
    """A small .npz whose zip directory says array ``key`` inflates to ``size`` bytes."""
    np.savez(path, **{key: np.zeros((1, 3, 8, 8), np.float32)})
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory entry: uncompressed size at +24
    struct.pack_into("<I", data, entry + 24, size)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("batch", "make", "needle"),
    [
        (
            1,
            lambda p: npz_of_zeros(p, "x", 300),
            "array 'x' inflates to 314,572,928 bytes, more than input 'x' can hold",
        ),
        (1, lambda p: npz_declaring(p, "bogus", 3_000_000_000), "unknown input(s) ['bogus']"),
        (
            "N",
            lambda p: npz_declaring(p, "x", 3_000_000_000),
            "inflates to 3,000,000,000 bytes, more than bnfold reads",
        ),
    ],
    ids=["300MB-for-a-static-input", "unknown-key-declaring-3GB", "3GB-for-a-symbolic-input"],
)
def test_npz_bomb_is_refused_from_the_zip_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch: int | str,
    make: Callable[[Path], Path],
    needle: str,
) -> None:
    """Before: np.load inflated every array (3 GB for a 3 MB file) before the unknown key or the
    size was looked at. Now nothing is inflated: np.load is never reached."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(batch=batch), src)
    npz = make(tmp_path / "in.npz")
    before = listing(tmp_path)

    def inflate(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load reached: the .npz is inflated")

    monkeypatch.setattr(np, "load", inflate)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    result = runner.invoke(app, [str(src), "-o", str(out), "--inputs", str(npz)])
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, needle)
    assert not any(out.parent.iterdir())
    with pytest.raises(InputError, match=None) as info:
        bnfold.fold_onnx(str(src), verify=True, inputs=str(npz))
    assert needle in str(info.value)
    assert listing(tmp_path) == before
