"""How big a model is: nodes, BatchNormalization nodes, bytes on disk (the ``nodes 12 → 10``
line of a fold and the columns of ``check``). Reads no tensor data."""

from __future__ import annotations

import os

from bnfold.cli.results import ModelStats
from bnfold.onnx.graph import walk_graphs
from bnfold.onnx.io import is_lazy, load_model
from bnfold.onnxlib import onnx


def model_stats(model: onnx.ModelProto, path: str | os.PathLike[str]) -> ModelStats:
    """Node and BatchNormalization counts of ``model``, and the bytes ``path`` takes on disk.

    ``model`` is ``path`` loaded lazily or without its external data, so the external-data
    references are still there to be measured; lazy stubs point into ``path`` itself and are
    not counted twice.
    """
    sites = list(walk_graphs(model))
    nodes = [n for site in sites for n in site.body.node]
    base = os.path.dirname(os.fspath(path))
    external: list[str] = []
    for site in sites:
        for t in site.body.initializer if site.function is None else ():
            if t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t):
                location = next((e.value for e in t.external_data if e.key == "location"), None)
                if location and location not in external:
                    external.append(location)
    size = os.path.getsize(path)
    for location in external:
        full = os.path.join(base, location)
        if os.path.isfile(full):
            size += os.path.getsize(full)
    return ModelStats(
        nodes=len(nodes),
        batchnorm=sum(1 for n in nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")),
        bytes=size,
        external_files=tuple(external),
    )


def stats_for_path(path: str | os.PathLike[str]) -> ModelStats:
    """:func:`model_stats` of the file at ``path`` (a lazy load: no tensor data is read)."""
    return model_stats(load_model(path, lazy=True), path)
