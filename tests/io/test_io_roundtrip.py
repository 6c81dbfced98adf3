"""Lazy load and streaming save reproduce models: every layout, every tensor kind."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from io_models import (  # noqa: F401 - small_stub_threshold is an autouse fixture
    canonical,
    conv_bn_mlp,
    full,
    save_external,
    small_stub_threshold,
    tmp_files,
    with_subgraph,
)
from onnx import TensorProto, numpy_helper

import bnfold.onnx.io as bio
from bnfold.errors import InputError
from bnfold.onnx.io import load as load_mod

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
    assert tmp_files(str(tmp_path)) == []


@pytest.mark.parametrize("threshold", [0, 1024, 1 << 20], ids=["all-stubs", "1KiB", "no-stubs"])
def test_lazy_load_then_save_reproduces_the_file(tmp_path, rng, monkeypatch, threshold):
    monkeypatch.setattr(load_mod, "LAZY_THRESHOLD", threshold)
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
    typed = bio.stub_of(stub)
    assert typed is not None
    assert typed.source.location == "src.onnx" and typed.source.path == str(src)
    assert not any(e.key.startswith("bnfold.") for e in stub.external_data)
    offset, length = typed.offset, typed.length
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
    save_external(model, src)
    loaded = bio.load_model(src, lazy=lazy, load_external_data=not lazy)
    if lazy:
        assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
        assert not any(bio.is_lazy(t) for t in loaded.graph.initializer)
    out = str(tmp_path / "b" / "out.onnx")
    bio.save_model(loaded, out, external_data=None if lazy else True)
    assert os.path.exists(out + ".data")
    onnx.checker.check_model(out)
    assert full(out) == full(src) == model.SerializeToString()
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
    assert full(str(tmp_path / "out.onnx")) == model.SerializeToString()


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
        save_external(model, src)
    else:
        onnx.save(model, src)
    out = str(tmp_path / "out.onnx")
    bio.save_model(bio.load_model(src, lazy=True), out, external_data=mode)
    assert os.path.exists(out + ".data") == expect_data_file
    onnx.checker.check_model(out)
    assert full(out) == model.SerializeToString()


def test_mixed_lazy_model_with_new_and_removed_tensors(tmp_path, rng):
    """What a fold does: replace a stub with a new in-memory tensor, drop others, add one."""
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    save_external(model, src)  # external source: new large tensors join the data file
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
    assert full(out) == canonical(expected)


def test_in_place_save_does_not_overwrite_the_source_data_file(tmp_path, rng):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "m.onnx")
    save_external(model, src)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    lazy = bio.load_model(src, lazy=True)
    bio.save_model(lazy, src)
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    assert (tmp_path / "m.onnx.1.data").exists()
    onnx.checker.check_model(src)
    assert full(src) == model.SerializeToString()


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
    save_external(model, src, convert_attribute=True)
    lazy = bio.load_model(src, lazy=True)
    then = lazy.graph.node[2].attribute[0].g
    assert all(t.data_location != TensorProto.EXTERNAL for t in then.initializer)
    assert lazy.graph.node[0].attribute[0].t.data_location != TensorProto.EXTERNAL
    assert lazy.graph.initializer[0].data_location == TensorProto.EXTERNAL  # main graph stays lazy
    bio.save_model(lazy, tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert full(str(tmp_path / "out.onnx")) == model.SerializeToString()


def test_eager_load_reads_all_external_data(tmp_path, rng):
    model = with_subgraph(rng)
    src = str(tmp_path / "m.onnx")
    save_external(model, src, convert_attribute=True)
    loaded = bio.load_model(src)
    assert loaded.SerializeToString() == model.SerializeToString()


def test_external_references_without_base_dir_need_source_dir(tmp_path, rng):
    model = conv_bn_mlp(rng)
    (tmp_path / "src").mkdir()
    src = str(tmp_path / "src" / "m.onnx")
    save_external(model, src)
    refs = bio.load_model(src, load_external_data=False)
    with pytest.raises(InputError, match="source_dir"):
        bio.save_model(refs, tmp_path / "out.onnx")
    assert tmp_files(str(tmp_path)) == []
    bio.save_model(refs, tmp_path / "out.onnx", source_dir=str(tmp_path / "src"))
    assert full(str(tmp_path / "out.onnx")) == model.SerializeToString()


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
    save_external(model, src, convert_attribute=True)
    refs = bio.load_model(src, load_external_data=False)
    before = refs.SerializeToString()
    for name in ("a.onnx", "b.onnx"):
        bio.save_model(refs, tmp_path / name, source_dir=str(tmp_path / "src"))
    assert refs.SerializeToString() == before
    assert full(str(tmp_path / "a.onnx")) == full(str(tmp_path / "b.onnx")) == model.SerializeToString()


def test_materialize_makes_a_lazy_model_usable_by_onnxruntime(tmp_path, rng):
    model = conv_bn_mlp(rng, extras=False)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    lazy = bio.load_model(src, lazy=True)
    bio.materialize(lazy)
    assert lazy.SerializeToString() == model.SerializeToString()
