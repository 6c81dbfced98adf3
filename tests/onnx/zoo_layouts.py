"""Zoo models written in the two layouts a streaming fold reads: weights embedded in the model
file, and every tensor in one external data file beside it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import onnx

from models import registry

CONV_MODELS = frozenset(
    ("resnet-basic", "resnet-bottleneck", "mobilenetv2", "densenet", "unet", "conv1d-audio", "conv3d-video")
)
"""Zoo models with Conv weights large enough for the streaming paths (deferred, undecided)."""


def write_layouts(root: Path, names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``name -> (embedded path, external path)`` under ``root``."""
    made = {}
    for name in names:
        model = onnx.load(str(registry.build_onnx(name)))
        embedded = root / f"{name}.onnx"
        onnx.save(model, str(embedded))
        external = root / f"{name}-ext" / "model.onnx"
        external.parent.mkdir()
        onnx.save(model, str(external), save_as_external_data=True, location="w.bin", size_threshold=0)
        made[name] = (str(embedded), str(external))
    return made


def read_files(folder: str) -> dict[str, bytes]:
    """Every file of ``folder`` by name: what a fold wrote, to compare byte for byte."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out
