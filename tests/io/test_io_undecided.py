"""A save abandoned because an undecided fold failed its check (bnfold.fold_optimistic) is like
any failed save: the destination keeps what it held, no temporary file is left, the source
(also when it is the destination) is untouched -- and the same model saves fine once decided."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from io_models import bn_params, small_stub_threshold, tmp_files  # noqa: F401 - autouse fixture
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx.io as bio
from bnfold import fold_math, fold_optimistic
from bnfold.onnx.fold import fold_model


def _partly_flushed(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv + BN whose fold rounds one weight of channel 2 to zero (the decision accepts it; the
    check where it is written does not)."""
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    w[2, 0, 0, 0] = 1e-30
    params = bn_params(rng, 8, "bn")
    gamma = numpy_helper.to_array(params[0]).copy()
    gamma[2] = 1e-20
    params[0] = numpy_helper.from_array(gamma, "bn_scale")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w, "w"), *params],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
@pytest.mark.parametrize("target", ["new", "existing", "source"])
def test_failed_check_abandons_the_save_cleanly(target, external, rng, tmp_path, monkeypatch):
    """Without the cleanup the temporary model and data files would stay beside the output,
    or the destination would be replaced by a half-written model."""
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    monkeypatch.setattr(fold_optimistic, "OPTIMISTIC_MIN_BYTES", 0)
    src = tmp_path / "model.onnx"
    model = _partly_flushed(rng)
    if external:
        onnx.save(model, str(src), save_as_external_data=True, location="model.data", size_threshold=0)
    else:
        onnx.save(model, str(src))
    dst = {"new": tmp_path / "out.onnx", "existing": tmp_path / "old.onnx", "source": src}[target]
    if target == "existing":
        dst.write_bytes(src.read_bytes() if not external else b"an older model")
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    lazy = bio.load_model(str(src), lazy=True)
    fold_model(lazy, base_dir=str(tmp_path), optimistic=True)
    with pytest.raises(fold_math.Undecided):
        bio.save_model(lazy, str(dst), external_data=external)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    assert not tmp_files(str(tmp_path))
    decided = bio.load_model(str(src), lazy=True)
    report = fold_model(decided, base_dir=str(tmp_path))
    assert len(report.folded) == 1
    bio.save_model(decided, str(dst), external_data=external)
    folded = bio.load_model(str(dst))
    weight = bio.read_array(next(t for t in folded.graph.initializer if t.name.startswith("w_")))
    assert weight[2, 0, 0, 0] == 0 and np.count_nonzero(weight[2]) == weight[2].size - 1
