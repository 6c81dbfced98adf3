"""Malformed and fuzzed models through the loader: one InputError line, never a ValueError,
IndexError, KeyError, TypeError, MemoryError or RecursionError (issue 10 item 8)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_hostile import MALFORMED, malformed_bytes, mutate_bytes, non_utf8_name_bytes
from io_models import conv_bn_mlp, model_bytes, save_external, small_stub_threshold  # noqa: F401 - autouse fixture
from onnx import TensorProto, helper

import bnfold.onnx.io as bio
from bnfold.errors import BnfoldError, InputError

EXAMPLES = int(os.environ.get("BNFOLD_HYPOTHESIS_EXAMPLES", "300"))
DERANDOMIZE = os.environ.get("BNFOLD_HYPOTHESIS_EXPLORE", "") != "1"


def one_line_input_error(path, *, lazy: bool) -> str:
    with pytest.raises(InputError) as info:
        bio.load_model(path, lazy=lazy)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("case", sorted(MALFORMED), ids=sorted(MALFORMED))
def test_malformed_tensor_is_one_input_error_line(tmp_path, case, lazy):
    path = tmp_path / "m.onnx"
    path.write_bytes(malformed_bytes(case))
    assert MALFORMED[case][1] in one_line_input_error(path, lazy=lazy)


@pytest.mark.parametrize("case", sorted(MALFORMED), ids=sorted(MALFORMED))
def test_read_array_of_a_malformed_tensor_is_an_input_error(case):
    """The tensor built in memory (no load): read_array checks it too."""
    model = onnx.ModelProto()
    model.ParseFromString(malformed_bytes(case))
    name = "s" if case == "string-tensor-external" else "conv_w"
    w = next(t for t in model.graph.initializer if t.name == name)
    with pytest.raises(InputError, match=f"tensor '{name}'.*{MALFORMED[case][1]}"):
        bio.read_array(w, "/nonexistent")


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("where", ["node", "initializer", "op_type"])
def test_name_that_is_not_utf8_is_one_input_error_line(tmp_path, where, lazy):
    """protobuf hands proto2 strings that are not UTF-8 back as bytes; joining them raised TypeError."""
    path = tmp_path / "m.onnx"
    path.write_bytes(non_utf8_name_bytes(where))
    assert "not valid UTF-8" in one_line_input_error(path, lazy=lazy)


def test_subgraphs_nested_thousands_deep_are_one_input_error_line(tmp_path):
    """Nesting past protobuf's recursion limit: a parse error, never a RecursionError."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    data = graph.SerializeToString()
    for _ in range(3000):  # wrap as If.then_branch (attribute 'g' of a node of a graph), by bytes
        attr = b"\x0a\x0athen_branch" + b"\x32" + _varint(len(data)) + data + b"\xa0\x01\x05"
        node = b"\x0a\x01c\x12\x01y\x22\x02If" + b"\x2a" + _varint(len(attr)) + attr
        data = b"\x0a" + _varint(len(node)) + node + b"\x12\x01g"
    model = conv_bn_mlp(np.random.default_rng(1), extras=False).SerializeToString()
    model += b"\x3a" + _varint(len(data)) + data  # a second graph field: merged into the first
    path = tmp_path / "deep.onnx"
    path.write_bytes(model)
    for lazy in (False, True):
        one_line_input_error(path, lazy=lazy)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["cut", "flip", "insert", "drop"]), st.integers(0, 2**31), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=MUTATIONS, lazy=st.booleans(), external=st.booleans())
def test_fuzzed_models_load_read_and_save_or_raise_input_error(tmp_path_factory, ops, lazy, external):
    """Whatever the bytes, the loader, read_array, save_model and materialize succeed or raise
    BnfoldError, and the input scan for ensure_not_overwriting never fails."""
    tmp = tmp_path_factory.mktemp("fuzz")
    base = model_bytes()
    if external:
        model = onnx.ModelProto()
        model.ParseFromString(base)
        save_external(model, str(tmp / "src.onnx"))
        base = (tmp / "src.onnx").read_bytes()
    path = tmp / "m.onnx"
    path.write_bytes(mutate_bytes(base, ops))
    if external:
        os.replace(tmp / "src.onnx.data", tmp / "m.onnx.data")
    bio.ensure_not_overwriting([path], [tmp / "out.onnx"])  # a wire-level scan: never raises here
    try:
        model = bio.load_model(path, lazy=lazy)
    except InputError as err:
        assert "\n" not in str(err)
        return
    for tensor in model.graph.initializer:
        try:
            bio.read_array(tensor, str(tmp))
        except InputError as err:
            assert "\n" not in str(err)
    try:
        bio.save_model(model, tmp / "out.onnx", source_dir=str(tmp))
        bio.materialize(model, base_dir=str(tmp))
    except BnfoldError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_external_data_entry_that_is_not_utf8_is_one_input_error_line(tmp_path, lazy):
    """Found by the fuzz: a flipped byte in a location made ``str.startswith`` raise TypeError."""
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes())
    save_external(model, str(tmp_path / "m.onnx"))
    data = (tmp_path / "m.onnx").read_bytes().replace(b"m.onnx.data", b"m.onnx.\xffata")
    (tmp_path / "m.onnx").write_bytes(data)
    assert "not valid UTF-8" in one_line_input_error(tmp_path / "m.onnx", lazy=lazy)


TENSOR_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "dims": st.lists(st.one_of(st.integers(-3, 12), st.sampled_from([2**31, 2**40, 2**62])), max_size=5),
        "data_type": st.one_of(st.integers(0, 30), st.just(999)),
        "raw_delta": st.integers(-8, 8),
        "typed": st.lists(st.floats(allow_nan=False, width=32), max_size=20),
        "external": st.lists(
            st.tuples(
                st.sampled_from(["location", "offset", "length", "checksum", "bnfold.embedded", "x"]),
                st.sampled_from(
                    ["m.onnx.data", "0", "16", "-1", " 4", "", "../m.onnx.data", "99999999999999999999"]
                ),
            ),
            max_size=4,
        ),
    },
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(changes=TENSOR_CHANGES, lazy=st.booleans())
def test_fuzzed_tensor_fields_load_and_read_or_raise_input_error(tmp_path_factory, changes, lazy):
    """Structure-aware: random dims, element types, payload lengths, typed values and external
    entries on one initializer. A tensor that loads reads back with exactly its dims' size."""
    tmp = tmp_path_factory.mktemp("fields")
    model = conv_bn_mlp(np.random.default_rng(5), extras=False)
    w = model.graph.initializer[0]
    (tmp / "m.onnx.data").write_bytes(w.raw_data * 2)
    if "dims" in changes:
        del w.dims[:]
        w.dims.extend(changes["dims"])
    if "data_type" in changes:
        w.data_type = changes["data_type"]
    if "raw_delta" in changes:
        delta = changes["raw_delta"]
        w.raw_data = w.raw_data[:delta] if delta < 0 else w.raw_data + b"\1" * delta
    if "typed" in changes:
        w.float_data.extend(changes["typed"])
    if "external" in changes:
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("raw_data")
        for key, value in changes["external"]:
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    path = tmp / "m.onnx"
    path.write_bytes(model.SerializeToString())
    try:
        loaded = bio.load_model(path, lazy=lazy)
    except InputError as err:
        assert "\n" not in str(err)
        return
    for tensor in loaded.graph.initializer:
        try:
            array = bio.read_array(tensor, str(tmp))
        except InputError as err:
            assert "\n" not in str(err)
            continue
        assert array.shape == tuple(tensor.dims)


def test_model_strings_that_are_not_utf8_are_input_errors(tmp_path):
    """Found by the fuzz (a flipped byte in producer_name): save_model's copy raised UnicodeDecodeError."""
    path = tmp_path / "m.onnx"
    path.write_bytes(mutate_bytes(model_bytes(), [("flip", 4, 128)]))
    for lazy in (False, True):
        assert "not valid UTF-8" in one_line_input_error(path, lazy=lazy)
    model = conv_bn_mlp(np.random.default_rng(5), extras=False)
    model.graph.initializer[0].doc_string = "@@doc@@"  # not checked on load: caught where copied
    path.write_bytes(model.SerializeToString().replace(b"@@doc@@", b"\xe2(\xa1doc!"))
    lazy = bio.load_model(path, lazy=True)
    with pytest.raises(InputError, match="doc_string: a string in it is not valid UTF-8"):
        bio.save_model(lazy, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
