"""The operator arity table (bnfold/onnx/io/arity_table.py, read by arity.py) against onnx's live schemas.

check_arity reads a generated table so that loading a model does not import onnx (0.5 s with
ml_dtypes 0.7.0, issue 14). The table must answer exactly as ``onnx.defs.get_schema`` does; when
onnx changes, the drift test fails and ``scripts/gen_arity.py`` regenerates the table.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import cache

import onnx
import onnx.defs
import pytest

from bnfold.errors import InputError
from bnfold.onnx.io import arity
from bnfold.onnx.io.validate import check_arity

SCHEMAS = [s for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""]
HISTORY = sorted({s.name for s in SCHEMAS})


@cache
def live(op_type: str, opset: int) -> tuple[int, int] | None:
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:  # noqa: BLE001 - get_schema raises SchemaError or TypeError: no answer
        return None
    return schema.min_input, schema.min_output


def test_table_covers_the_installed_onnx():
    """A stale table (onnx upgraded, script not rerun) fails here first, with the remedy."""
    hint = "onnx changed: run scripts/gen_arity.py"
    assert arity.MAX_OPSET == onnx.defs.onnx_opset_version(), hint
    assert sorted(arity.ARITY) == HISTORY, hint
    for name in HISTORY:
        versions = sorted((s.since_version, s.min_input, s.min_output) for s in SCHEMAS if s.name == name)
        assert arity.ARITY[name] == tuple(versions), (name, hint)


@pytest.mark.parametrize("op_type", [*HISTORY, "NotAnOperator", "relu", ""])
def test_min_arity_is_what_get_schema_says_at_every_opset(op_type):
    """Every op at every opset the table answers, deprecated versions included (Upsample after
    opset 10 is its deprecated schema, not an error), agrees with onnx's own lookup."""
    for opset in range(-1, arity.MAX_OPSET + 1):
        assert arity.min_arity(op_type, opset) == live(op_type, opset), (op_type, opset)


def test_deprecated_versions_answer_like_get_schema():
    """get_schema returns a deprecated schema for later opsets rather than raising; a table that
    dropped deprecated versions would answer an older version's arity or None."""
    deprecated = [(s.name, s.since_version) for s in SCHEMAS if s.deprecated]
    assert deprecated, "no deprecated schema left in this onnx: the test proves nothing"
    for name, since in deprecated:
        assert live(name, since) is not None
        assert arity.min_arity(name, since) == live(name, since)
        assert arity.min_arity(name, since + 1) is not None
        assert arity.min_arity(name, arity.MAX_OPSET) == live(name, arity.MAX_OPSET)


def test_opset_above_the_table_asks_the_installed_onnx(monkeypatch):
    """A model newer than the table's onnx is answered by the live schemas: with the table's
    maximum lowered and its Unsqueeze entry made wrong, opsets above come from onnx.defs."""
    calls = []
    real = arity.live_min_arity

    def recording(op_type, opset):
        calls.append((op_type, opset))
        return real(op_type, opset)

    monkeypatch.setattr(arity, "MAX_OPSET", 12)
    monkeypatch.setitem(arity.ARITY, "Unsqueeze", ((1, 7, 7),))
    monkeypatch.setattr(arity, "live_min_arity", recording)
    assert arity.min_arity("Unsqueeze", 12) == (7, 7)  # from the (doctored) table
    assert calls == []
    assert arity.min_arity("Unsqueeze", 13) == live("Unsqueeze", 13) == (2, 1)
    assert calls == [("Unsqueeze", 13)]


@pytest.mark.parametrize(
    "opset",
    [onnx.defs.onnx_opset_version() + 1, 10_000, 2**31, 2**63 - 1],
    ids=["next", "10k", "2^31", "max"],
)
def test_opset_beyond_onnx_is_answered_as_get_schema_does(opset):
    """get_schema answers the newest version for any opset above its own, and raises (TypeError)
    past a C int; min_arity must give the same, not crash."""
    assert arity.min_arity("Relu", opset) == live("Relu", opset)
    assert arity.min_arity("NotAnOperator", opset) is None


def unsqueeze_model(opset: int, n_inputs: int) -> onnx.ModelProto:
    inputs = ["x", "axes"][:n_inputs]
    node = onnx.helper.make_node("Unsqueeze", inputs, ["y"], name="unsq")
    graph = onnx.helper.make_graph([node], "g", [], [])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 12], ids=lambda o: f"opset{o}")
def test_unsqueeze_with_axes_attribute_needs_one_input_before_opset_13(opset):
    check_arity(unsqueeze_model(opset, 1))


@pytest.mark.parametrize("opset", [13, arity.MAX_OPSET], ids=lambda o: f"opset{o}")
def test_unsqueeze_without_axes_input_is_refused_from_opset_13(opset):
    """Unsqueeze-13 takes its axes as a second input; the pass indexes it: the table must know
    the arity changed at 13, or the fold crashes with an IndexError instead of an InputError."""
    with pytest.raises(
        InputError, match=r"node 'unsq' \(Unsqueeze\) in the main graph has 1 inputs, .* needs 2"
    ):
        check_arity(unsqueeze_model(opset, 1))


SUBPROCESS = textwrap.dedent(
    """
    import sys

    import bnfold.onnx.io.validate as v
    from bnfold.errors import InputError
    from bnfold.onnxlib import onnx

    def model(opset, n_inputs):
        m = onnx.ModelProto(ir_version=8)
        m.opset_import.add(domain="", version=opset)
        m.graph.name = "g"
        m.graph.node.add(op_type="Relu", name="relu", input=["x"], output=["r"])
        m.graph.node.add(op_type="Unsqueeze", name="unsq", input=["r", "axes"][:n_inputs], output=["y"])
        return m

    v.check_arity(model(13, 2))
    v.check_arity(model(11, 1))
    try:
        v.check_arity(model(13, 1))
    except InputError as e:
        assert "has 1 inputs, its operator needs 2" in str(e), e
    else:
        raise AssertionError("Unsqueeze-13 with one input passed")
    assert "onnx.defs" not in sys.modules, "check_arity imported onnx.defs"
    print("ok")
    """
)


def test_check_arity_does_not_import_onnx_defs():
    """Loading a model checks every node's arity; with the live schemas that imported the whole
    onnx package (0.5 s) on every load, even for a fold without verification (issue 14)."""
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
