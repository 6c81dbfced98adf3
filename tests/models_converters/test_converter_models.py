"""Every converter-shaped model (models.converters, issue 12) is valid (full checker), runs at
ORT_DISABLE_ALL, is small, float32, seeded, has non-trivial BN statistics and matches its registry
entry. Their shapes are tested in test_converter_shapes.py.

These tests do not fold with bnfold (the pass was being rewritten beside them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from converter_graph import attr, build, constants, feeds, nodes

from conftest import run_ort
from models import converters, registry
from models.__main__ import main as zoo_main

NAMES = registry.converter_names()


# --------------------------------------------------------------------------- every model


def test_every_builder_has_one_registry_entry() -> None:
    assert list(converters.BUILDERS) == NAMES and len(set(NAMES)) == len(NAMES)
    assert not set(NAMES) & set(registry.REGISTRY)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_passes_the_full_checker_and_matches_its_registry_entry(name: str) -> None:
    model = build(name)
    onnx.checker.check_model(model, full_check=True)
    spec = registry.get(name)
    assert spec.source == "converter" and name not in registry.REGISTRY
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    # a symbolic batch (keras' ``unk__66``) is fed as 1
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    shapes = {k: tuple(d.dim_value if d.HasField("dim_value") else 1 for d in v) for k, v in dims.items()}
    assert shapes == spec.inputs
    assert registry.count_bn(model) == spec.bn_count


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_runs_at_disable_all_with_finite_outputs(name: str) -> None:
    model = build(name)
    outs = run_ort(model, feeds(name))
    assert len(outs) == len(model.graph.output)
    for out, info in zip(outs, model.graph.output, strict=True):
        expected = tuple(
            d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim
        )
        assert out.shape == expected and out.dtype == np.float32 and out.size > 0
    out = outs[0]
    if name == "trap-div-by-zero":  # channel 3 is divided by zero, the others are finite
        assert not np.isfinite(out[:, 3]).any() and np.isfinite(np.delete(out, 3, axis=1)).all()
    else:
        assert all(np.isfinite(o).all() for o in outs) and np.abs(out).max() > 0.1


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_is_small_float32_and_deterministic_in_its_seed(name: str) -> None:
    data = build(name, 3).SerializeToString()
    assert len(data) < 1 << 20
    assert build(name, 3).SerializeToString() == data
    assert build(name, 4).SerializeToString() != data
    model = build(name)
    floats = [
        t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    ]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT for t in floats)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).bn_count], ids=str)
def test_bn_statistics_are_non_trivial(name: str) -> None:
    model = build(name)
    consts = constants(model)
    for bn in nodes(model, "BatchNormalization"):
        gamma, beta, mean, var = (consts[i] for i in bn.input[1:])
        assert not np.allclose(gamma, 1.0) and (np.abs(gamma) >= 0.5).all(), bn.name
        assert not np.allclose(beta, 0.0) and not np.allclose(mean, 0.0), bn.name
        assert (var >= 0.5).all() and np.ptp(var) > 0.05, bn.name
        assert attr(bn, "training_mode") in (None, 0), bn.name


def test_cli_builds_a_converter_model_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo_main(["build", "--out", str(tmp_path), "tf2onnx-raw-nhwc", "keras3-mobilenet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " 3 BN " in lines[0] and " 0 BN " in lines[1]
    assert (tmp_path / "tf2onnx-raw-nhwc.onnx").read_bytes() == build("tf2onnx-raw-nhwc").SerializeToString()
    cached = registry.build_onnx("mixnet-concat-bn", cache_dir=tmp_path / "cache", seed=2)
    assert cached.read_bytes() == build("mixnet-concat-bn", 2).SerializeToString()
    with pytest.raises(registry.ZooError, match="no PyTorch module"):
        registry.build_torch("levit-linear-bn")
