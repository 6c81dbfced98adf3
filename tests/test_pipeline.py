"""fold_path end to end: lazy load, fold, atomic save, verification, layout kept, source untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import count_bn
from bnfold.errors import InputError
from bnfold.pipeline import fold_path
from conftest import assert_close, run_ort
from onnx_builders import conv_bn


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def write_model(rng, folder: Path, *, external: bool) -> tuple[Path, dict[str, np.ndarray]]:
    """Conv(64->64, 3x3: 147 KB of weights, above the lazy/external thresholds) -> BN -> Relu."""
    g = conv_bn(rng, cin=64, cout=64)
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(
        g.model(), str(path), save_as_external_data=external, location="model.onnx.data", size_threshold=1024
    )
    return path, {"x": g.feeds["x"]}


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_fold_path_folds_keeps_layout_and_leaves_the_source_alone(rng, tmp_path, external, verify):
    src, feeds = write_model(rng, tmp_path / "src", external=external)
    before = digest(src.parent)
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    result = fold_path(src, dst, verify=verify)

    assert digest(src.parent) == before, "the source model or its data file changed"
    assert len(result.report.folded) == 1
    assert (result.verification is not None) == verify
    if verify:
        assert result.verification.passed
    assert sorted(os.listdir(dst.parent)) == (
        ["folded.onnx", "folded.onnx.data"] if external else ["folded.onnx"]
    )
    folded = onnx.load(str(dst))
    assert count_bn(folded) == 0
    onnx.checker.check_model(str(dst), full_check=True)
    assert_close(run_ort(str(src), feeds), run_ort(str(dst), feeds))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_fold_path_needs_an_existing_output_directory(rng, tmp_path, verify):
    src, _ = write_model(rng, tmp_path / "src", external=False)
    with pytest.raises(InputError, match="does not exist"):
        fold_path(src, tmp_path / "missing" / "folded.onnx", verify=verify)
    assert not (tmp_path / "missing").exists()


def test_fold_path_refuses_to_overwrite_its_input(rng, tmp_path):
    src, _ = write_model(rng, tmp_path / "src", external=False)
    before = digest(src.parent)
    with pytest.raises(InputError, match="refusing to overwrite"):
        fold_path(src, src)
    assert digest(src.parent) == before
