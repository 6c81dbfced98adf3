"""Tests for bnfold.io: lazy loading, streaming atomic saves, external data, bad input."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import io as bio
from bnfold.errors import BnfoldError, InputError

BF16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
INT4 = helper.tensor_dtype_to_np_dtype(TensorProto.INT4)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture(autouse=True)
def _small_stub_threshold(monkeypatch):
    """The test models are small: make their kilobyte-sized tensors stubs, as large ones are."""
    monkeypatch.setattr(bio, "LAZY_THRESHOLD", 1024)


# ---------------------------------------------------------------------------------------------
# model builders
# ---------------------------------------------------------------------------------------------


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> list[TensorProto]:
    """Non-trivial BN statistics: gamma != 1, beta != 0, mean != 0, random var."""
    return [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(rng.normal(0.3, 1.0, c).astype(np.float32), f"{prefix}_bias"),
        numpy_helper.from_array(rng.normal(-0.2, 1.0, c).astype(np.float32), f"{prefix}_mean"),
        numpy_helper.from_array(rng.uniform(0.3, 2.0, c).astype(np.float32), f"{prefix}_var"),
    ]


def conv_bn_mlp(rng: np.random.Generator, *, ir_version: int = 10, extras: bool = True) -> onnx.ModelProto:
    """Conv -> BN -> Flatten -> MatMul -> Add, plus (``extras``) unused tensors of many dtypes."""
    w = numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "conv_w")
    w.doc_string = "conv weight"
    inits = [
        w,
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "conv_b"),
        *_bn_params(rng, 8, "bn"),
        numpy_helper.from_array(rng.normal(size=(512, 16)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "fc_b"),
    ]
    if extras:
        inits += [
            numpy_helper.from_array(rng.normal(size=600).astype(np.float16), "half"),
            numpy_helper.from_array(rng.normal(size=700).astype(BF16), "bf16"),
            numpy_helper.from_array(rng.integers(-(2**40), 2**40, size=200, dtype=np.int64), "i64"),
            numpy_helper.from_array(rng.integers(-8, 8, size=3001).astype(INT4), "i4"),
            numpy_helper.from_array(rng.normal(size=(40, 40)), "f64"),
            helper.make_tensor("typed", TensorProto.FLOAT, [300], rng.normal(size=300).tolist()),
            helper.make_tensor("names", TensorProto.STRING, [2], [b"a" * 900, b"b" * 900]),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn"
        ),
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_b"], ["out"], name="add"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    if ir_version <= 3:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(
        nodes,
        "conv_bn_mlp",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    graph.doc_string = "graph doc"
    opset = 17 if ir_version > 3 else 6
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    model.producer_name = "bnfold-tests"
    helper.set_model_props(model, {"origin": "test_io"})
    return model


def with_subgraph(rng: np.random.Generator) -> onnx.ModelProto:
    """An If whose branches hold their own initializers and a Constant node with a large tensor."""

    def branch(name: str) -> onnx.GraphProto:
        k = numpy_helper.from_array(rng.normal(size=(1, 4, 1, 1)).astype(np.float32) + 2.0, f"{name}_k")
        big = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), f"{name}_w")
        pad = numpy_helper.from_array(rng.normal(size=400).astype(np.float32), f"{name}_pad")
        return helper.make_graph(
            [
                helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"]),
                helper.make_node("Mul", [f"{name}_c", f"{name}_k"], [f"{name}_y"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4, 8, 8])],
            [k, big, pad],
        )

    const = numpy_helper.from_array(rng.normal(size=(1, 4, 8, 8)).astype(np.float32), "cval")
    nodes = [
        helper.make_node("Constant", [], ["cst"], value=const),
        helper.make_node("Add", ["x", "cst"], ["xc"]),
        helper.make_node("If", ["cond"], ["r"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Add", ["r", "xc"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "with_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(rng.normal(size=2000).astype(np.float32), "main_pad")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _save_external(model: onnx.ModelProto, path: str, *, convert_attribute: bool = False) -> None:
    """onnx.save with external data, on a copy (onnx.save converts the model it is given in place)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        location=os.path.basename(path) + ".data",
        size_threshold=1024,
        convert_attribute=convert_attribute,
    )


def _full(path: str) -> bytes:
    """The model at ``path`` with all external data loaded, serialized (a canonical content form).

    onnx.load sets ``data_location = DEFAULT`` explicitly on the tensors it loads (2 bytes each
    on the wire); an in-memory model leaves the field unset, so it is cleared here.
    """
    return _canonical(onnx.load(path))


def _canonical(model: onnx.ModelProto) -> bytes:
    for tensor in bio._model_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return model.SerializeToString()


def _tmp_files(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ir_version", [10, 3], ids=["ir10", "ir3-initializers-as-inputs"])
def test_save_in_memory_model_is_byte_identical_to_serialize(tmp_path, rng, ir_version):
    model = conv_bn_mlp(rng, ir_version=ir_version)
    out = tmp_path / "out.onnx"
    bio.save_model(model, out)
    assert out.read_bytes() == model.SerializeToString()
    assert not (tmp_path / "out.onnx.data").exists()
    assert _tmp_files(str(tmp_path)) == []


@pytest.mark.parametrize("threshold", [0, 1024, 1 << 20], ids=["all-stubs", "1KiB", "no-stubs"])
def test_lazy_load_then_save_reproduces_the_file(tmp_path, rng, monkeypatch, threshold):
    monkeypatch.setattr(bio, "LAZY_THRESHOLD", threshold)
    model = conv_bn_mlp(rng)
    src = tmp_path / "src.onnx"
    onnx.save(model, src)
    lazy = bio.load_model(src, lazy=True)
    stubs = [t.name for t in lazy.graph.initializer if bio.is_lazy(t)]
    raw_sizes = {t.name: len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data")}
    assert stubs == [n for n, size in raw_sizes.items() if size >= threshold]
    bio.save_model(lazy, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


def test_stub_points_at_the_payload_inside_the_source_file(tmp_path, rng):
    model = conv_bn_mlp(rng)
    src = tmp_path / "src.onnx"
    onnx.save(model, src)
    lazy = bio.load_model(src, lazy=True)
    stub = next(t for t in lazy.graph.initializer if t.name == "conv_w")
    assert bio.is_lazy(stub)
    assert (list(stub.dims), stub.data_type, stub.doc_string) == (
        [8, 4, 3, 3],
        TensorProto.FLOAT,
        "conv weight",
    )
    assert not stub.HasField("raw_data")
    entries = {e.key: e.value for e in stub.external_data}
    assert entries["location"] == "src.onnx"
    assert entries["bnfold.embedded"] == "1"
    offset, length = int(entries["offset"]), int(entries["length"])
    original = next(t for t in model.graph.initializer if t.name == "conv_w")
    assert src.read_bytes()[offset : offset + length] == original.raw_data


def test_read_array_matches_onnx_for_every_tensor_kind(tmp_path, rng):
    """Stubs (fp32, fp16, bf16, int64, int4, f64), small embedded tensors and typed-field tensors."""
    model = conv_bn_mlp(rng)
    src = tmp_path / "src.onnx"
    onnx.save(model, src)
    lazy = bio.load_model(src, lazy=True)
    kinds = set()
    for original, loaded in zip(model.graph.initializer, lazy.graph.initializer, strict=True):
        expected = numpy_helper.to_array(original)
        got = bio.read_array(loaded)
        kinds.add((bio.is_lazy(loaded), str(got.dtype)))
        assert got.dtype == expected.dtype, original.name
        assert got.shape == expected.shape, original.name
        np.testing.assert_array_equal(got, expected, err_msg=original.name)
    assert {
        (True, "float16"),
        (True, "bfloat16"),
        (True, "int4"),
        (True, "int64"),
        (False, "float32"),
    } <= kinds


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_external_data_model_keeps_its_layout(tmp_path, rng, lazy):
    model = conv_bn_mlp(rng)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = str(tmp_path / "a" / "m.onnx")
    _save_external(model, src)
    loaded = bio.load_model(src, lazy=lazy, load_external_data=not lazy)
    if lazy:
        assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
        assert not any(bio.is_lazy(t) for t in loaded.graph.initializer)
    out = str(tmp_path / "b" / "out.onnx")
    bio.save_model(loaded, out, external_data=None if lazy else True)
    assert os.path.exists(out + ".data")
    onnx.checker.check_model(out)
    assert _full(out) == _full(src) == model.SerializeToString()
    assert sorted(os.listdir(tmp_path / "b")) == ["out.onnx", "out.onnx.data"]


def test_external_data_offsets_of_large_tensors_are_page_aligned(tmp_path, rng):
    model = conv_bn_mlp(rng)
    bio.save_model(model, tmp_path / "out.onnx", external_data=True)
    saved = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = [t for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in external} >= {"conv_w", "fc_w", "half", "bf16", "i64", "i4", "f64"}
    for t in external:
        entries = {e.key: e.value for e in t.external_data}
        assert set(entries) == {"location", "offset", "length"}
        assert entries["location"] == "out.onnx.data"
        if int(entries["length"]) >= 4096:
            assert int(entries["offset"]) % 4096 == 0
    assert _full(str(tmp_path / "out.onnx")) == model.SerializeToString()


@pytest.mark.parametrize(
    ("mode", "source_external", "expect_data_file"),
    [
        (True, False, True),
        (False, True, False),
        (None, False, False),
        (None, True, True),
    ],
    ids=["embedded->external", "external->embedded", "embedded-keeps", "external-keeps"],
)
def test_external_data_modes_from_a_lazy_model(tmp_path, rng, mode, source_external, expect_data_file):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    if source_external:
        _save_external(model, src)
    else:
        onnx.save(model, src)
    out = str(tmp_path / "out.onnx")
    bio.save_model(bio.load_model(src, lazy=True), out, external_data=mode)
    assert os.path.exists(out + ".data") == expect_data_file
    onnx.checker.check_model(out)
    assert _full(out) == model.SerializeToString()


def test_mixed_lazy_model_with_new_and_removed_tensors(tmp_path, rng):
    """What a fold does: replace a stub with a new in-memory tensor, drop others, add one."""
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    _save_external(model, src)  # external source: new large tensors join the data file
    lazy = bio.load_model(src, lazy=True)
    expected = onnx.load(src)

    for m in (lazy, expected):
        inits = m.graph.initializer
        w = next(t for t in inits if t.name == "conv_w")
        new_w = numpy_helper.from_array(bio.read_array(w, os.path.dirname(src)) * 1.5, "conv_w")
        w.CopyFrom(new_w)
        keep = [t for t in inits if not t.name.startswith("bn_")]
        kept = [onnx.TensorProto() for _ in keep]
        for dst, t in zip(kept, keep, strict=True):
            dst.CopyFrom(t)
        del inits[:]
        inits.extend(kept)
        inits.append(numpy_helper.from_array(np.arange(5, dtype=np.float32), "tiny_new"))
        del m.graph.node[1]
        m.graph.node[1].input[0] = "c"
    out = str(tmp_path / "out.onnx")
    bio.save_model(lazy, out)
    onnx.checker.check_model(out)
    saved = onnx.load(out, load_external_data=False)
    where = {t.name: t.data_location for t in saved.graph.initializer}
    assert where["conv_w"] == TensorProto.EXTERNAL  # new and large, model uses external data
    assert where["tiny_new"] == TensorProto.DEFAULT
    assert _full(out) == _canonical(expected)


def test_in_place_save_does_not_overwrite_the_source_data_file(tmp_path, rng):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "m.onnx")
    _save_external(model, src)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    lazy = bio.load_model(src, lazy=True)
    bio.save_model(lazy, src)
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    assert (tmp_path / "m.onnx.1.data").exists()
    onnx.checker.check_model(src)
    assert _full(src) == model.SerializeToString()


def test_in_place_save_of_an_embedded_lazy_model(tmp_path, rng):
    model = conv_bn_mlp(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    bio.save_model(bio.load_model(src, lazy=True), src)
    assert src.read_bytes() == model.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_subgraph_and_attribute_tensors_are_loaded_not_stubbed(tmp_path, rng):
    model = with_subgraph(rng)
    src = str(tmp_path / "m.onnx")
    _save_external(model, src, convert_attribute=True)
    lazy = bio.load_model(src, lazy=True)
    then = lazy.graph.node[2].attribute[0].g
    assert all(t.data_location != TensorProto.EXTERNAL for t in then.initializer)
    assert lazy.graph.node[0].attribute[0].t.data_location != TensorProto.EXTERNAL
    assert lazy.graph.initializer[0].data_location == TensorProto.EXTERNAL  # main graph stays lazy
    bio.save_model(lazy, tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert _full(str(tmp_path / "out.onnx")) == model.SerializeToString()


def test_eager_load_reads_all_external_data(tmp_path, rng):
    model = with_subgraph(rng)
    src = str(tmp_path / "m.onnx")
    _save_external(model, src, convert_attribute=True)
    loaded = bio.load_model(src)
    assert loaded.SerializeToString() == model.SerializeToString()


def test_external_references_without_base_dir_need_source_dir(tmp_path, rng):
    model = conv_bn_mlp(rng)
    (tmp_path / "src").mkdir()
    src = str(tmp_path / "src" / "m.onnx")
    _save_external(model, src)
    refs = bio.load_model(src, load_external_data=False)
    with pytest.raises(InputError, match="source_dir"):
        bio.save_model(refs, tmp_path / "out.onnx")
    assert _tmp_files(str(tmp_path)) == []
    bio.save_model(refs, tmp_path / "out.onnx", source_dir=str(tmp_path / "src"))
    assert _full(str(tmp_path / "out.onnx")) == model.SerializeToString()


def test_saved_external_model_runs_in_onnxruntime_like_the_original(tmp_path, rng):
    model = conv_bn_mlp(rng, extras=False)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    out = str(tmp_path / "out.onnx")
    bio.save_model(bio.load_model(src, lazy=True), out, external_data=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_save_does_not_change_the_model_and_can_repeat(tmp_path, rng):
    model = with_subgraph(rng)
    (tmp_path / "src").mkdir()
    src = str(tmp_path / "src" / "m.onnx")
    _save_external(model, src, convert_attribute=True)
    refs = bio.load_model(src, load_external_data=False)
    before = refs.SerializeToString()
    for name in ("a.onnx", "b.onnx"):
        bio.save_model(refs, tmp_path / name, source_dir=str(tmp_path / "src"))
    assert refs.SerializeToString() == before
    assert _full(str(tmp_path / "a.onnx")) == _full(str(tmp_path / "b.onnx")) == model.SerializeToString()


def test_materialize_makes_a_lazy_model_usable_by_onnxruntime(tmp_path, rng):
    model = conv_bn_mlp(rng, extras=False)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    lazy = bio.load_model(src, lazy=True)
    bio.materialize(lazy)
    assert lazy.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# 2 GB limit, length computation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**31 + 5], ids=lambda n: f"L{n}"
)
def test_payload_length_is_recovered_from_message_sizes(length):
    head = 37
    total = head + 1 + len(bio._varint(length)) + length
    assert bio._payload_len_from_sizes(total, head) == length
    assert bio._varint_len(length) == len(bio._varint(length))


def test_over_the_limit_embedded_raises_and_writes_nothing(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(bio, "_PROTOBUF_LIMIT", 20_000)
    out = tmp_path / "out.onnx"
    with pytest.raises(BnfoldError, match="external data") as info:
        bio.save_model(conv_bn_mlp(rng), out, external_data=False)
    assert "out.onnx" in str(info.value) and "2 GB" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_in_memory_model_over_the_limit_gets_external_data_at_the_given_location(tmp_path, rng, monkeypatch):
    model = conv_bn_mlp(rng)
    monkeypatch.setattr(bio, "_PROTOBUF_LIMIT", 20_000)
    out = str(tmp_path / "out.onnx")
    bio.save_model(model, out, location="weights.bin")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "weights.bin"]
    onnx.checker.check_model(out)
    assert _full(out) == model.SerializeToString()


def test_over_the_limit_switches_to_external_data(tmp_path, rng, monkeypatch):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    monkeypatch.setattr(bio, "_PROTOBUF_LIMIT", 20_000)
    out = str(tmp_path / "out.onnx")
    bio.save_model(bio.load_model(src, lazy=True), out)
    assert os.path.getsize(out) <= 20_000
    assert os.path.exists(out + ".data")
    assert _full(out) == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# atomicity
# ---------------------------------------------------------------------------------------------


def _fail_copy(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_failure_mid_write_leaves_destination_untouched(tmp_path, rng, monkeypatch, external):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    monkeypatch.setattr(bio, "_copy_range", _fail_copy)
    with pytest.raises(BnfoldError, match="No space left"):
        bio.save_model(bio.load_model(src, lazy=True), out, external_data=external)
    assert out.read_bytes() == b"previous model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert _tmp_files(str(tmp_path)) == []


def test_interrupt_during_fsync_cleans_up(tmp_path, rng, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(bio.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bio.save_model(conv_bn_mlp(rng), tmp_path / "out.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.path.join(p, "missing", "out.onnx"), "does not exist"),
        (lambda p: p, "is a directory"),
    ],
    ids=["missing-directory", "output-is-directory"],
)
def test_bad_output_path(tmp_path, rng, make, message):
    with pytest.raises(InputError, match=message):
        bio.save_model(conv_bn_mlp(rng), make(str(tmp_path)))


def test_explicit_location_that_escapes_is_rejected(tmp_path, rng):
    with pytest.raises(InputError, match="relative path"):
        bio.save_model(conv_bn_mlp(rng), tmp_path / "out.onnx", external_data=True, location="../x.data")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _valid_bytes() -> bytes:
    return conv_bn_mlp(np.random.default_rng(1), extras=False).SerializeToString()


BAD_FILES = {
    "empty": (b"", "empty file"),
    "truncated": (_valid_bytes()[:-3000], "truncated"),
    "random-bytes": (
        bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8)),
        "not an ONNX model",
    ),
    "text": (b"hello world, this is not a model\n" * 5, "not an ONNX model"),
    "zip-torch-checkpoint": (b"PK\x03\x04" + b"\0" * 100, "zip archive"),
    "git-lfs-pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
    "html-error-page": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    "parses-without-graph": (onnx.ModelProto(ir_version=8).SerializeToString(), "no graph"),
    "tensor-not-model": (numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString(), "ONNX"),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("case", sorted(BAD_FILES), ids=sorted(BAD_FILES))
def test_bad_file_raises_one_line_input_error(tmp_path, case, lazy):
    content, fragment = BAD_FILES[case]
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        bio.load_model(path, lazy=lazy)
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message


def test_truncated_file_names_the_byte(tmp_path):
    data = _valid_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InputError, match=r"truncated: model.graph \(from byte \d+\) needs \d+ bytes but the file has \d+"
    ):
        bio.load_model(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_missing_and_directory_paths(tmp_path, lazy):
    with pytest.raises(InputError, match="no such file") as info:
        bio.load_model(tmp_path / "nope.onnx", lazy=lazy)
    assert "nope.onnx" in str(info.value)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner.onnx").write_bytes(_valid_bytes())
    with pytest.raises(InputError, match="is a directory.*inner.onnx"):
        bio.load_model(tmp_path / "dir", lazy=lazy)


def test_permission_denied_is_an_input_error(tmp_path, monkeypatch):
    """Simulated, because the suite may run as root (who reads any file)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_valid_bytes())
    real_open = os.open

    def denied(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(bio.os, "open", denied)
    with pytest.raises(InputError, match="m.onnx: permission denied"):
        bio.load_model(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_valid_bytes())
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        bio.load_model(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("damage", ["delete", "truncate"], ids=["missing-data-file", "short-data-file"])
def test_missing_or_short_external_data_names_tensor_and_file(tmp_path, rng, lazy, damage):
    src = str(tmp_path / "m.onnx")
    _save_external(conv_bn_mlp(rng), src)
    data = tmp_path / "m.onnx.data"
    if damage == "delete":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError) as info:
        bio.load_model(src, lazy=lazy)
    message = str(info.value)
    assert "m.onnx.data" in message and "tensor 'conv_w'" in message and src in message
    assert ("missing" if damage == "delete" else "too short") in message


@pytest.mark.parametrize(
    "location", ["../secret.bin", "/etc/passwd", "sub/../../x"], ids=["dotdot", "abs", "nested"]
)
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_external_location_escaping_the_model_directory_is_rejected(tmp_path, rng, location, lazy):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 5000)
    (tmp_path / "models").mkdir()
    model = conv_bn_mlp(rng, extras=False)
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "1152")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "models" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="outside the model's directory"):
        bio.load_model(path, lazy=lazy)
    with pytest.raises(InputError, match="outside the model's directory"):
        bio.read_array(w, str(tmp_path / "models"))


def test_reserved_bnfold_keys_in_a_file_are_rejected(tmp_path, rng):
    """A lazily loaded model written with onnx.save carries bnfold's keys; reading it must fail loudly."""
    src = tmp_path / "src.onnx"
    onnx.save(conv_bn_mlp(rng, extras=False), src)
    onnx.save(bio.load_model(src, lazy=True), tmp_path / "bad.onnx")
    for lazy in (False, True):
        with pytest.raises(InputError, match="bnfold.io.save_model"):
            bio.load_model(tmp_path / "bad.onnx", lazy=lazy)


def test_stub_of_a_changed_source_file_is_refused(tmp_path, rng):
    """Without the stamp check, stubs would silently read the new file's bytes at the old offsets."""
    src = tmp_path / "src.onnx"
    onnx.save(conv_bn_mlp(rng), src)
    lazy = bio.load_model(src, lazy=True)
    onnx.save(conv_bn_mlp(np.random.default_rng(99)), src)
    with pytest.raises(InputError, match="changed on disk"):
        bio.read_array(lazy.graph.initializer[0])
    with pytest.raises(InputError, match="changed on disk"):
        bio.save_model(lazy, tmp_path / "out.onnx")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(1000, dtype=np.float16) / 7,
        (np.arange(1000, dtype=np.float32) / 7).astype(BF16),
        np.arange(-500, 500, dtype=np.int64).reshape(10, 100),
        (np.arange(-500, 500) % 251 - 125).astype(np.int8).reshape(2, 500),
        np.linspace(-1, 1, 999, dtype=np.float64),
        np.arange(-8, 8, dtype=np.int8).repeat(100).astype(INT4),
    ],
    ids=["float16", "bfloat16", "int64", "int8", "float64", "int4-packed"],
)
@pytest.mark.parametrize("where", ["embedded", "external"], ids=["embedded", "external"])
def test_read_array_dtypes(tmp_path, array, where):
    tensor = numpy_helper.from_array(array, "t")
    if where == "external":
        payload = tensor.raw_data
        (tmp_path / "t.bin").write_bytes(b"x" * 17 + payload)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "t.bin"), ("offset", "17"), ("length", str(len(payload)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    got = bio.read_array(tensor, str(tmp_path))
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_read_array_rejects_a_length_that_does_not_match_the_shape(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\0" * 64)
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [4, 4], np.zeros(16))
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "t.bin"), ("offset", "0"), ("length", "60")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(InputError, match="needs 64 bytes"):
        bio.read_array(tensor, str(tmp_path))
