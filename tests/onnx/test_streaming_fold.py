"""The streaming fold (issue 14): a fold into a weight whose bytes are in a file is decided on a
read pass and computed while saving, in blocks. Its output must be bit-identical to the fold
computed in memory (``fold_math.scale_weight_exact``, then a new TensorProto), which these
tests run side by side on the same files: the zoo, the converter models, with weights embedded
(every tensor a lazy stub) and in external data files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from zoo_layouts import CONV_MODELS, read_files, write_layouts

from bnfold import fold_math
from bnfold.api import fold_path
from bnfold.errors import InputError
from bnfold.onnx.io import load, load_model, materialize, read_array, save_model, scaled_of, sink
from conftest import bn_stats

registry = pytest.importorskip("models.registry")
pytest.importorskip("torch")

NAMES = registry.names(large=False) + registry.converter_names()
DEFERS = CONV_MODELS
"""Models whose Conv folds must take the deferred path (the test proves something)."""


def _fold(src: str, folder: str) -> tuple[dict[str, bytes], object]:
    os.makedirs(folder)
    result = fold_path(src, os.path.join(folder, "out.onnx"), verify=False)
    return read_files(folder), result


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each model as a file with embedded weights and as one with every tensor in a data file."""
    return write_layouts(tmp_path_factory.mktemp("streaming"), NAMES)


@pytest.mark.parametrize("layout", ["embedded", "external", "external-row-blocks"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_streaming_fold_is_bit_identical_to_the_in_memory_fold(name, layout, sources, tmp_path, monkeypatch):
    """Without the deferred path's exact decisions and block arithmetic, a weight would differ
    in a last bit, a fold refused in memory would be taken (or the reverse), or the layout of the
    file (embedded / external, offsets) would change. ``row-blocks``: one row per block, so that
    every tensor is computed in many blocks (grouped ConvTranspose rows included)."""
    src = sources[name][0 if layout == "embedded" else 1]
    monkeypatch.setattr(load, "LAZY_THRESHOLD", 0)
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)  # every embedded payload a stub: all deferrable
    if layout == "external-row-blocks":
        monkeypatch.setattr(sink, "SCALE_BLOCK", 1)
    streamed, result = _fold(src, str(tmp_path / "stream"))
    deferred = [t.name for t in result.model.graph.initializer if scaled_of(t) is not None]
    monkeypatch.setattr(fold_math, "scale_weight_planned", fold_math.scale_weight_exact)
    eager, reference = _fold(src, str(tmp_path / "eager"))
    assert result.report == reference.report
    assert streamed.keys() == eager.keys()
    for file_name in streamed:
        assert streamed[file_name] == eager[file_name], file_name
    assert not any(scaled_of(t) is not None for t in reference.model.graph.initializer)
    if name in DEFERS:
        assert deferred, "no fold was deferred"


def test_deferred_tensor_reads_materializes_and_resaves_as_its_folded_values(sources, tmp_path, monkeypatch):
    """A deferred tensor is read (read_array), embedded (materialize) and saved again with the
    folded values, never the original bytes it points at."""
    monkeypatch.setattr(load, "LAZY_THRESHOLD", 0)
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    src = sources["resnet-basic"][1]
    result = fold_path(src, str(tmp_path / "a.onnx"), verify=False)
    model = result.model
    deferred = [t for t in model.graph.initializer if scaled_of(t) is not None]
    assert deferred
    written = load_model(str(tmp_path / "a.onnx"))
    by_name = {t.name: t for t in written.graph.initializer}
    original = {t.name: t for t in load_model(src).graph.initializer}
    base = os.path.dirname(src)
    for t in deferred:
        np.testing.assert_array_equal(read_array(t, base), read_array(by_name[t.name]))
        unfolded = read_array(original[t.name.rsplit("_bnfold", 1)[0]])
        assert not np.array_equal(read_array(t, base), unfolded)
    save_model(model, str(tmp_path / "b.onnx"), external_data=False)
    again = load_model(str(tmp_path / "b.onnx"))
    for t in again.graph.initializer:
        np.testing.assert_array_equal(read_array(t), read_array(by_name[t.name]))
    materialize(model)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    for t in model.graph.initializer:
        np.testing.assert_array_equal(read_array(t), read_array(by_name[t.name]))


def test_deferred_fold_saved_with_onnx_save_is_refused(sources, tmp_path, monkeypatch):
    """A model holding a deferred fold written by onnx.save points at the unfolded bytes: loading
    it must fail, not silently give the unfolded weights."""
    monkeypatch.setattr(load, "LAZY_THRESHOLD", 0)
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    src = sources["resnet-basic"][1]
    model = fold_path(src, str(tmp_path / "a.onnx"), verify=False).model
    leaked = os.path.join(os.path.dirname(src), "leaked.onnx")
    onnx.save(model, leaked)
    try:
        with pytest.raises(InputError, match="bnfold"):
            load_model(leaked)
    finally:
        os.remove(leaked)


def _conv_bn(dtype: np.dtype, rng: np.random.Generator, *, overflow: bool = False) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = rng.standard_normal((16, 4, 3, 3)).astype(dtype)
    if overflow:
        w[3] = 60000.0
    gamma, beta, mean, var = bn_stats(rng, 16, dtype)
    inits = [numpy_helper.from_array(a, n) for a, n in zip((w, gamma, beta, mean, var), "wgbmv")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", elem, [1, 16, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "dtype,overflow",
    [(np.float16, False), (np.float16, True), (np.float64, False)],
    ids=["float16", "float16-overflow", "float64"],
)
def test_streaming_fold_of_other_float_types_is_bit_identical(dtype, overflow, rng, tmp_path, monkeypatch):
    """float16 and float64 weights take the deferred path too; a float16 fold that overflows is
    refused on the read pass with the in-memory path's reason, and nothing is written for it."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(_conv_bn(dtype, rng, overflow=overflow), str(src), save_as_external_data=True, size_threshold=0)
    monkeypatch.setattr(load, "LAZY_THRESHOLD", 0)
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    streamed, result = _fold(str(src), str(tmp_path / "stream"))
    deferred = [t.name for t in result.model.graph.initializer if scaled_of(t) is not None]
    monkeypatch.setattr(fold_math, "scale_weight_planned", fold_math.scale_weight_exact)
    eager, reference = _fold(str(src), str(tmp_path / "eager"))
    assert result.report == reference.report
    assert streamed == eager
    if overflow:
        assert not result.report.folded and "overflows float16" in result.report.skipped[0].detail
        assert not deferred
    else:
        assert len(result.report.folded) == 1 and deferred
