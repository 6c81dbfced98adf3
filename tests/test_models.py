"""Tests for the reference model zoo (models/): builders, ONNX export, registry, large generator, CLI, demo."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from models import large, registry
from models.__main__ import main as zoo_main

try:
    import torch
except ImportError:  # the registry, the large generator and the CLI work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

REPO = Path(__file__).resolve().parents[1]
SMALL = models.names(large=False)
LARGE = models.names(large=True)


def _session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _attr(node: onnx.NodeProto, name: str) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def exported(zoo_dir: Path) -> dict[str, Path]:
    """Small zoo models exported once per session (seed 0, opset 17), shared by the tests below."""
    return {name: models.build_onnx(name, cache_dir=zoo_dir) for name in SMALL}


# --------------------------------------------------------------------------- registry


def test_import_models_builds_nothing_and_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, models; "
        "assert 'torch' not in sys.modules, 'importing models imported torch'; "
        "print(len(models.REGISTRY), models.REGISTRY['densenet'].expected_unfoldable)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(len(models.REGISTRY)), "7"]


def test_registry_entries_are_consistent() -> None:
    from bnfold.report import SkipReason

    codes = {r.value for r in SkipReason}
    assert {"resnet-basic", "densenet", "unet", "linear-bn1d-3d", "detection-head", "demo"} <= set(SMALL)
    assert LARGE == ["large-100", "large-250", "large-500", "large-2500"]
    for name, spec in models.REGISTRY.items():
        assert spec.name == name
        assert set(spec.inputs) == set(spec.dtypes), name
        assert 0 <= spec.expected_unfoldable <= spec.bn_count, name
        assert bool(spec.unfoldable_reasons) == bool(spec.expected_unfoldable), name
        assert set(spec.unfoldable_reasons) <= codes, name
        if spec.large:
            assert spec.source == "generated" and spec.builder is None and spec.size_mb, name
            assert spec.bn_count == large.plan(spec.size_mb).bn_count
        else:
            assert spec.source == "torch" and spec.builder is not None and not spec.size_mb, name


def test_large_2500_really_needs_external_data() -> None:
    spec = models.get("large-2500")
    assert spec.external_data
    assert large.plan(spec.size_mb).weight_bytes > 2**31
    assert not any(models.get(n).external_data for n in ("large-100", "large-250", "large-500"))


def test_unknown_name_and_torch_for_generated_model_raise() -> None:
    with pytest.raises(models.ZooError, match="unknown model 'nope'; known: resnet-basic"):
        models.get("nope")
    with pytest.raises(models.ZooError, match="generated directly as ONNX"):
        models.build_torch("large-100")


# --------------------------------------------------------------------------- builders


@needs_torch
def test_builders_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = models.build_torch("detection-head", seed=3).state_dict()
    b = models.build_torch("detection-head", seed=3).state_dict()
    c = models.build_torch("detection-head", seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tower.weight"], c["tower.weight"])
    assert not torch.equal(a["bn_p3.running_mean"], c["bn_p3.running_mean"])


@needs_torch
def test_example_inputs_match_example_arrays() -> None:
    arrays = models.example_arrays("detection-head", seed=5)
    tensors = models.example_inputs("detection-head", seed=5)
    assert list(arrays) == ["input"]
    assert len(tensors) == 1 and np.array_equal(tensors[0].numpy(), arrays["input"])
    assert not np.array_equal(models.example_arrays("detection-head", seed=6)["input"], arrays["input"])


@needs_torch
@pytest.mark.parametrize("name", SMALL, ids=SMALL)
def test_bn_statistics_are_non_trivial(name: str) -> None:
    module = models.build_torch(name)
    assert not module.training
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == models.get(name).bn_count
    for bn in bns:
        assert not bn.training
        assert (bn.running_mean != 0).all()
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert bn.running_var.std() > 0.05
        if bn.affine:
            assert (bn.weight.abs() >= 0.5).all() and (bn.weight.abs() <= 1.5).all()
            assert (bn.weight != 1).all() and (bn.bias != 0).all()
    means = torch.cat([bn.running_mean for bn in bns])
    assert 0.25 < means.abs().mean() < 0.55  # N(0, 0.5): E|x| = 0.4
    gammas = torch.cat([bn.weight for bn in bns if bn.affine] or [torch.ones(1)])
    assert len(gammas) == 1 or (gammas < 0).any()  # some flipped signs


# --------------------------------------------------------------------------- export


@needs_torch
@pytest.mark.parametrize("name", SMALL, ids=SMALL)
def test_export_keeps_bn_and_matches_torch(name: str, exported: dict[str, Path]) -> None:
    spec = models.get(name)
    model = onnx.load(exported[name])
    onnx.checker.check_model(model, full_check=True)
    assert models.count_bn(model) == spec.bn_count
    assert [i.name for i in model.graph.input] == list(spec.inputs)
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert all(_attr(n, "training_mode") == 0 for n in bns)
    assert (model.opset_import[0].domain, model.opset_import[0].version) == ("", 17)

    with torch.no_grad():
        expected = models.build_torch(name)(*models.example_inputs(name))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    got = _session(exported[name]).run(None, models.example_arrays(name))
    assert len(got) == len(expected) == len(spec.outputs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-5)
        assert np.abs(g).max() > 1e-2  # not a degenerate model whose outputs vanish


@needs_torch
@pytest.mark.parametrize("opset", [9, 13, 15], ids=["opset9", "opset13", "opset15"])
def test_export_at_other_opsets(opset: int, tmp_path: Path) -> None:
    path = models.export_onnx("resnet-basic", tmp_path / "m.onnx", opset=opset)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == opset
    assert models.count_bn(model) == 6
    got = _session(path).run(None, models.example_arrays("resnet-basic"))[0]
    with torch.no_grad():
        expected = models.build_torch("resnet-basic")(*models.example_inputs("resnet-basic")).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


@needs_torch
def test_build_onnx_caches_by_fingerprint(tmp_path: Path) -> None:
    first = models.build_onnx("linear-bn1d-3d", cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = models.build_onnx("linear-bn1d-3d", cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert first.name.startswith("linear-bn1d-3d-s0-")
    assert models.onnx_path("linear-bn1d-3d", cache_dir=tmp_path, seed=1) != first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


# --------------------------------------------------------------------------- the pitfalls each fixture must keep


@needs_torch
def test_detection_head_shares_tower_weight_between_bn_and_plain_uses(exported: dict[str, Path]) -> None:
    """The shared-weight fixture (PITFALLS #1): one initializer, three Convs, two followed by different BNs."""
    model = onnx.load(exported["detection-head"])
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "tower.weight"]
    assert len(convs) == 3
    readers = Counter(n.op_type for c in convs for n in model.graph.node if c.output[0] in n.input)
    assert readers == {"BatchNormalization": 2, "Relu": 1}
    bn_scales = {n.input[1] for n in model.graph.node if n.op_type == "BatchNormalization"}
    assert {"bn_p3.weight", "bn_p4.weight"} <= bn_scales


@needs_torch
def test_linear_bn1d_3d_normalizes_the_sequence_axis(exported: dict[str, Path]) -> None:
    """PITFALLS #2: L == F, so a fold that ignores the axis would still find matching shapes."""
    model = onnx.load(exported["linear-bn1d-3d"])
    producers = _producers(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = []
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        ops.append(producers[bn.input[0]].op_type)
        assert inits[bn.input[1]].shape == (16,)
    assert ops == ["Add", "MatMul"]
    assert models.get("linear-bn1d-3d").inputs["input"] == (2, 16, 16)


@needs_torch
def test_exporter_quirks_the_fixtures_rely_on(exported: dict[str, Path]) -> None:
    """Identity-fed BN variance (resnet-basic), Constant-fed BN scale/bias and a Transpose-computed
    MatMul weight (mlp-bn1d), a grouped ConvTranspose feeding a BN (unet)."""
    resnet = onnx.load(exported["resnet-basic"])
    producers = _producers(resnet)
    identity_fed = [
        n for n in resnet.graph.node
        if n.op_type == "BatchNormalization" and n.input[4] in producers
    ]  # fmt: skip
    assert [producers[n.input[4]].op_type for n in identity_fed] == ["Identity"]

    mlp = onnx.load(exported["mlp-bn1d"])
    producers = _producers(mlp)
    bns = [n for n in mlp.graph.node if n.op_type == "BatchNormalization"]
    assert [producers[n.input[0]].op_type for n in bns] == ["Gemm", "MatMul", "Gemm"]
    matmul = producers[bns[1].input[0]]
    assert producers[matmul.input[1]].op_type == "Transpose"
    assert producers[bns[2].input[1]].op_type == "Constant"

    unet = onnx.load(exported["unet"])
    producers = _producers(unet)
    groups = sorted(
        _attr(producers[n.input[0]], "group") or 1
        for n in unet.graph.node
        if n.op_type == "BatchNormalization" and producers[n.input[0]].op_type == "ConvTranspose"
    )
    assert groups == [1, 4]


@needs_torch
def test_densenet_unfoldable_bns_follow_concat(exported: dict[str, Path]) -> None:
    model = onnx.load(exported["densenet"])
    producers = _producers(model)
    kinds = Counter(
        producers[n.input[0]].op_type for n in model.graph.node if n.op_type == "BatchNormalization"
    )
    assert kinds == {"Concat": 7, "Conv": 6}
    assert models.get("densenet").expected_unfoldable == kinds["Concat"]


@needs_torch
def test_zoo_expectations_match_the_onnx_pass(exported: dict[str, Path]) -> None:
    """Every BN the registry calls foldable is folded by analyze_onnx, the others are skipped with
    one of the listed reasons."""
    from bnfold import analyze_onnx

    for name, path in exported.items():
        spec = models.get(name)
        report = analyze_onnx(str(path))
        assert report.bn_total == spec.bn_count, name
        assert len(report.folded) == spec.expected_foldable, (name, report.skipped)
        assert {s.reason.value for s in report.skipped} <= set(spec.unfoldable_reasons), (
            name,
            report.skipped,
        )


# --------------------------------------------------------------------------- demo


@needs_torch
def test_demo_is_committed_small_and_regenerates_identically(tmp_path: Path) -> None:
    committed = onnx.load(models.DEMO_PATH)
    assert models.DEMO_PATH.stat().st_size < 2 * 1024 * 1024
    assert models.count_bn(committed) == models.get("demo").bn_count == 18
    fresh_path = models.write_demo(tmp_path / "demo.onnx")
    fresh = onnx.load(fresh_path)
    assert [n.SerializeToString() for n in fresh.graph.node] == [
        n.SerializeToString() for n in committed.graph.node
    ]
    assert fresh.graph.input == committed.graph.input and fresh.graph.output == committed.graph.output
    assert fresh.opset_import == committed.opset_import
    ref = {i.name: onnx.numpy_helper.to_array(i) for i in committed.graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in fresh.graph.initializer}
    assert ref.keys() == new.keys()
    assert all(np.array_equal(ref[k], new[k]) for k in ref)
    if fresh.producer_version == committed.producer_version:  # same torch: same bytes
        assert fresh_path.read_bytes() == models.DEMO_PATH.read_bytes()


# --------------------------------------------------------------------------- large


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
def test_build_large_tiny(external: bool, tmp_path: Path) -> None:
    path = large.build_large(2, tmp_path / "big.onnx", external_data=external, seed=1)
    plan = large.plan(2)
    data = tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["big.onnx", "big.onnx.data"] if external else ["big.onnx"]
    )

    meta = onnx.load(path, load_external_data=False)
    assert models.count_bn(meta) == plan.bn_count
    assert Counter(n.op_type for n in meta.graph.node) == {
        "Conv": plan.conv_blocks + 1, "BatchNormalization": plan.bn_count, "Relu": plan.bn_count,
        "Gemm": large.GEMM_BN_BLOCKS + 1, "GlobalAveragePool": 1, "Flatten": 1,
    }  # fmt: skip
    external_tensors = [t for t in meta.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    total = path.stat().st_size + (data.stat().st_size if external else 0)
    assert 0.9 * plan.weight_bytes < total < 1.2 * plan.weight_bytes
    assert abs(plan.weight_bytes - 2 * large.MB) < 0.1 * 2 * large.MB
    if external:
        assert path.stat().st_size < 64 * 1024
        assert {t.name for t in external_tensors} >= {"stem.weight", "block0.weight", "fc0.weight"}
        offsets = [int(e.value) for t in external_tensors for e in t.external_data if e.key == "offset"]
        assert all(o % 4096 == 0 for o in offsets)
    else:
        assert not external_tensors
    onnx.checker.check_model(str(path), full_check=True)

    x = np.random.default_rng(0).standard_normal(large.INPUT_SHAPE).astype(np.float32)
    (out,) = _session(path).run(None, {"input": x})
    assert out.shape == (1, large.NUM_CLASSES) and np.isfinite(out).all() and np.abs(out).max() > 1e-2


def test_build_large_is_deterministic_and_same_weights_either_way(tmp_path: Path) -> None:
    a = large.build_large(1, tmp_path / "a.onnx", seed=2)
    b = large.build_large(1, tmp_path / "b.onnx", seed=2)
    assert a.read_bytes() == b.read_bytes()
    ext = large.build_large(1, tmp_path / "ext" / "c.onnx", external_data=True, seed=2)
    embedded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(a).graph.initializer}
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(ext).graph.initializer}
    assert embedded.keys() == loaded.keys()
    assert all(np.array_equal(embedded[k], loaded[k]) for k in embedded)
    other = large.build_large(1, tmp_path / "d.onnx", seed=3)
    assert other.read_bytes() != a.read_bytes()


def test_build_large_refuses_to_embed_over_2gb(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"2 GiB limit\); pass external_data=True"):
        large.build_large(2500, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_large_plan_scales_linearly() -> None:
    plans = [large.plan(s) for s in (100, 250, 500, 2500)]
    assert {p.channels for p in plans} == {256}
    for p in plans:
        assert abs(p.weight_bytes / (p.size_mb * large.MB) - 1) < 0.02
    with pytest.raises(ValueError, match="size_mb must be positive"):
        large.plan(0)


# --------------------------------------------------------------------------- CLI


@needs_torch
def test_cli_build_to_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo_main(["build", "--out", str(tmp_path), "linear-bn1d-3d", "mlp-bn1d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["linear-bn1d-3d", "mlp-bn1d"]
    assert str(tmp_path / "linear-bn1d-3d.onnx") in lines[0] and " 2 BN " in lines[0]
    assert " 3 BN " in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear-bn1d-3d.onnx", "mlp-bn1d.onnx"]


def test_cli_unknown_name_exits_2_before_building(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo_main(["build", "--out", str(tmp_path), "mlp-bn1d", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


@needs_torch
def test_cli_list_and_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo_main(["list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(models.REGISTRY)
    assert zoo_main(["demo", "--out", str(tmp_path / "d.onnx")]) == 0
    assert "18 BN" in capsys.readouterr().out
    assert (tmp_path / "d.onnx").read_bytes() == registry.write_demo(tmp_path / "e.onnx").read_bytes()
