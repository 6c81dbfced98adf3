"""How much BN-like work bnfold and its peers fold on the converter-shaped models (issue 12).

Usage (from the repository root, with the ``bench`` extra installed)::

    python benchmarks/bn_coverage.py                   # every model in models.registry.CONVERTERS
    python benchmarks/bn_coverage.py --models keras3-mobilenet trap-mul-last-axis --json out.json
    python benchmarks/bn_coverage.py --models --files exported.onnx   # real exports only

For each model (``models.converters``, seed 0) and each tool, BN-like structures are counted before
and after, and the tool's output is run against the original, both by onnxruntime at
``ORT_DISABLE_ALL`` on the same seeded inputs (``models.registry.example_arrays``). An output
whose relative error (max |ref - out| / max |ref|, over the finite reference values) exceeds
1e-3 is flagged WRONG. A markdown table goes to stdout.

A BN-like structure is one of
    bn      a BatchNormalization node (anywhere in the main graph),
    affine  a chain of Mul/Div (and Add/Sub) by per-channel constants after a layer,
    bias    a chain of Add/Sub only by per-channel constants after a Conv, ConvTranspose or Gemm
            (after a MatMul, ``MatMul -> Add`` is how a linear layer with a bias is written: no
            bias input could absorb it, so it is not counted),
where a layer is Conv, ConvTranspose, Gemm or MatMul; the chain may look through Identity,
Dropout and Transpose (the channel axis follows the permutation), and every tensor on it has a
single reader. Per-channel follows numpy broadcasting: the constant, left-padded with 1s to the
tensor's rank, may differ from 1 on the channel axis only (so (C,) on a 4-D NCHW tensor is NOT
per-channel: it broadcasts over the last axis). The channel axis of Conv/ConvTranspose/Gemm
output is 1, of MatMul output the last.

Tools (each in its own process, so a crash costs one cell)
    bnfold          ``bnfold.fold_onnx(model, verify=False)``
    ort-basic       onnxruntime ``ORT_ENABLE_BASIC`` with ``optimized_model_filepath``
    onnxslim        ``onnxslim.slim(model)``
    onnxsim         ``onnxsim.simplify(model, check_n=0)``
    onnxscript      ``onnxscript.optimizer.optimize(model)``
    onnxoptimizer   ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import onnx

from models import registry

WRONG_RTOL = 1e-3
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
LOOK_THROUGH = frozenset({"Identity", "Dropout", "Transpose"})
AFFINE = frozenset({"Mul", "Div", "Add", "Sub"})
TOOLS = ("bnfold", "ort-basic", "onnxslim", "onnxsim", "onnxscript", "onnxoptimizer")
MODULES = {
    "bnfold": "bnfold",
    "ort-basic": "onnxruntime",
    "onnxslim": "onnxslim",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript",
    "onnxoptimizer": "onnxoptimizer",
}
IDEAL = {
    "resnetv2-preact": 3,
    "mxnet-bn-data": 1,
    "trap-div-by-zero": 1,
    "trap-reshape-merges-channel": 1,
    "trap-concat-branch-shared": 1,
}
"""BN-like structures a correct folder leaves (every other model: 0), per the builders' docstrings."""


# --------------------------------------------------------------------------- the counter


@dataclass(frozen=True)
class Structures:
    bn: int = 0
    affine: int = 0
    bias: int = 0

    @property
    def total(self) -> int:
        return self.bn + self.affine + self.bias

    def __str__(self) -> str:
        parts = [f"{n} {k}" for k, n in (("bn", self.bn), ("affine", self.affine), ("bias", self.bias)) if n]
        return f"{self.total} ({', '.join(parts)})" if parts else "0"


def _constants(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors that are constants: initializers that are not graph inputs, Constant outputs."""
    inputs = {i.name for i in graph.input}
    out = {t.name: tuple(t.dims) for t in graph.initializer if t.name not in inputs}
    for n in graph.node:
        if (
            n.op_type == "Constant"
            and n.attribute
            and n.attribute[0].name in ("value", "value_float", "value_floats")
        ):
            value = onnx.helper.get_attribute_value(n.attribute[0])
            out[n.output[0]] = tuple(value.dims) if n.attribute[0].name == "value" else np.shape(value)
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a tool's output that inference rejects: no shapes, fewer chains
        inferred = model
    g = inferred.graph
    out: dict[str, tuple[int | None, ...]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


def per_channel(const: tuple[int, ...], rank: int, axis: int, channels: int | None) -> bool:
    """Whether a constant of shape ``const`` broadcast against a rank-``rank`` tensor varies along ``axis`` only."""
    if len(const) > rank:
        return False
    padded = (1,) * (rank - len(const)) + tuple(const)
    return all(d == 1 for i, d in enumerate(padded) if i != axis) and padded[axis] in (
        1,
        channels or padded[axis],
    )


def count_structures(model: onnx.ModelProto) -> Structures:
    """BN-like structures of the main graph (see the module docstring)."""
    g = model.graph
    consts, shapes = _constants(g), _shapes(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in set(n.input):
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    bn = sum(n.op_type == "BatchNormalization" for n in g.node)
    affine = bias = 0
    for layer in g.node:
        if layer.op_type not in LAYERS or not layer.output:
            continue
        tensor = layer.output[0]
        rank = len(shapes[tensor]) if tensor in shapes else None
        if rank is None:
            continue
        axis = rank - 1 if layer.op_type == "MatMul" else 1
        ops: list[str] = []
        while tensor not in outputs and len(readers.get(tensor, [])) == 1:
            (node,) = readers[tensor]
            if node.op_type in LOOK_THROUGH and node.input[0] == tensor:
                if node.op_type == "Transpose":
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    axis = perm.index(axis) if perm else rank - 1 - axis
                tensor = node.output[0]
                continue
            if node.op_type not in AFFINE or len(node.input) != 2:
                break
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            if other == tensor or other not in consts:
                break
            if node.op_type in ("Div", "Sub") and node.input[0] != tensor:  # c / x, c - x: not affine in x
                break
            channels = shapes.get(tensor, (None,) * rank)[axis]
            if not per_channel(consts[other], rank, axis, channels):
                break
            ops.append(node.op_type)
            tensor = node.output[0]
        if any(op in ("Mul", "Div") for op in ops):
            affine += 1
        elif ops and layer.op_type != "MatMul":
            bias += 1
    return Structures(bn, affine, bias)


# --------------------------------------------------------------------------- tools (child processes)


def _apply(tool: str, src: str, dst: str) -> None:
    if tool == "bnfold":
        import bnfold

        onnx.save(bnfold.fold_onnx(src, verify=False).model, dst)
    elif tool == "ort-basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    elif tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(src)), dst)
    elif tool == "onnxsim":
        import onnxsim

        onnx.save(onnxsim.simplify(onnx.load(src), check_n=0)[0], dst)
    elif tool == "onnxscript":
        import onnxscript.optimizer

        onnx.save(onnxscript.optimizer.optimize(onnx.load(src)), dst)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    else:
        raise ValueError(f"unknown tool {tool}")


def child_main(tool: str, pairs: Sequence[str]) -> int:
    """Apply ``tool`` to each ``src=dst`` pair; one JSON line per pair (an error is a result)."""
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    for pair in pairs:
        src, dst = pair.split("=", 1)
        try:
            _apply(tool, src, dst)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported in the table
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        print(json.dumps({"src": src, "error": error}), flush=True)
    return 0


def run_tool(tool: str, jobs: list[tuple[str, str]]) -> dict[str, str | None]:
    """``src -> error or None``; a model whose child process died is retried alone."""
    results: dict[str, str | None] = {}

    def launch(batch: list[tuple[str, str]]) -> None:
        argv = [sys.executable, __file__, "--child", tool, *(f"{s}={d}" for s, d in batch)]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                results[entry["src"]] = entry["error"]
        if proc.returncode != 0 and len(batch) == 1 and batch[0][0] not in results:
            results[batch[0][0]] = f"crashed (exit {proc.returncode})"

    launch(jobs)
    for job in jobs:
        if job[0] not in results:
            launch([job])
    return results


# --------------------------------------------------------------------------- comparison


def _run(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    """max |ref - out| / max |ref| over the finite reference values; inf where non-finite values differ."""
    if ref.shape != out.shape:
        return float("inf")
    r, o = ref.astype(np.float64), out.astype(np.float64)
    same = (r == o) | (np.isnan(r) & np.isnan(o))
    finite = np.isfinite(r) & np.isfinite(o)
    if (~same & ~finite).any():
        return float("inf")
    scale = max(float(np.abs(r[np.isfinite(r)]).max(initial=0.0)), 1e-30)
    return float(np.abs(r[~same] - o[~same]).max(initial=0.0)) / scale


@dataclass
class Cell:
    after: Structures | None = None
    error: float | None = None
    failure: str | None = None

    @property
    def wrong(self) -> bool:
        return self.error is not None and not self.error <= WRONG_RTOL

    def __str__(self) -> str:
        if self.failure:
            return self.failure
        text = f"{self.after} · {self.error:.1e}"
        return f"**WRONG** {text}" if self.wrong else text


def graph_feeds(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for any model from its graph inputs (symbolic dims as 1)."""
    model = onnx.load(path, load_external_data=False)
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def measure(sources: dict[str, str], tools: Sequence[str], workdir: Path) -> dict[str, Any]:
    """``sources``: name -> ONNX path. Inputs: the registry's for its models, else :func:`graph_feeds`."""
    names = list(sources)
    before = {n: count_structures(onnx.load(p)) for n, p in sources.items()}
    cells: dict[str, dict[str, Cell]] = {n: {} for n in names}
    feeds = {
        n: registry.example_arrays(n, seed=0) if n in registry.CONVERTERS else graph_feeds(p)
        for n, p in sources.items()
    }
    refs: dict[str, list[np.ndarray] | str] = {}
    for name, src in sources.items():
        try:
            refs[name] = _run(src, feeds[name])
        except Exception as exc:  # noqa: BLE001 - a broken export is a result too
            refs[name] = f"original does not run: {type(exc).__name__}"
    for tool in tools:
        if importlib.util.find_spec(MODULES[tool]) is None:
            for n in names:
                cells[n][tool] = Cell(failure="not installed")
            continue
        jobs = [(p, str(workdir / f"{k}.{tool}.onnx")) for k, p in enumerate(sources.values())]
        errors = run_tool(tool, jobs)
        for (name, src), (_, dst) in zip(sources.items(), jobs, strict=True):
            if errors.get(src):
                cells[name][tool] = Cell(failure=f"failed: {errors[src]}")
                continue
            ref = refs[name]
            if isinstance(ref, str):
                cells[name][tool] = Cell(failure=ref)
                continue
            try:
                out = _run(dst, feeds[name])
                err = max(relative_error(r, o) for r, o in zip(ref, out, strict=True))
            except Exception as exc:  # noqa: BLE001 - an output onnxruntime cannot run is a result
                cells[name][tool] = Cell(failure=f"does not run: {type(exc).__name__}")
                continue
            cells[name][tool] = Cell(count_structures(onnx.load(dst)), err)
    return {"before": before, "cells": cells}


def _model_bytes(name: str) -> bytes:
    from models import converters

    return converters.build(name, 0).SerializeToString()


def render(names: Sequence[str], tools: Sequence[str], result: dict[str, Any]) -> str:
    before, cells = result["before"], result["cells"]
    lines = [
        "| model | before | correct folder | " + " | ".join(tools) + " |",
        "|---|---|---|" + "---|" * len(tools),
    ]
    for n in names:
        ideal = str(IDEAL.get(n, 0)) if n in registry.CONVERTERS else "?"
        row = [n, str(before[n]), ideal] + [str(cells[n][t]) for t in tools]
        lines.append("| " + " | ".join(row) + " |")
    ideal = sum(IDEAL.get(n, 0) for n in names if n in registry.CONVERTERS)
    totals = ["**total**", str(sum(before[n].total for n in names)), str(ideal)]
    for t in tools:
        done = [cells[n][t] for n in names if cells[n][t].after is not None]
        wrong = sum(c.wrong for c in done)
        left = sum(c.after.total for c in done)  # type: ignore[union-attr]
        missing = len(names) - len(done)
        totals.append(f"{left} left, {wrong} WRONG" + (f", {missing} no output" if missing else ""))
    lines.append("| " + " | ".join(totals) + " |")
    legend = (
        f"\nCells: BN-like structures left after the tool (bn / affine Mul-Add chains / bias Adds after a layer) "
        f"· max relative output error against the original, both at ORT_DISABLE_ALL; **WRONG** when > {WRONG_RTOL:g}. "
        "'correct folder' is what a folder that is exact and complete leaves."
    )
    return "\n".join(lines) + "\n" + legend


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        return child_main(args[1], args[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="*", default=None, help="converter models (default: all)")
    parser.add_argument(
        "--files", nargs="*", default=[], type=Path, help="also these ONNX files (real exports)"
    )
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    opts = parser.parse_args(args)
    models = registry.converter_names() if opts.models is None else opts.models
    for name in models:
        if registry.get(name).source != "converter":
            parser.error(f"{name} is not a converter model")
    with tempfile.TemporaryDirectory(prefix="bnfold-coverage-") as tmp:
        sources = {}
        for name in models:
            sources[name] = str(Path(tmp) / f"{name}.onnx")
            Path(sources[name]).write_bytes(_model_bytes(name))
        sources.update({f.name: str(f.resolve()) for f in opts.files})
        result = measure(sources, opts.tools, Path(tmp))
    print(render(list(sources), opts.tools, result))
    if opts.json is not None:
        data = {
            "before": {n: asdict(s) for n, s in result["before"].items()},
            "cells": {
                n: {
                    t: {"after": asdict(c.after) if c.after else None, "error": c.error, "failure": c.failure}
                    for t, c in row.items()
                }
                for n, row in result["cells"].items()
            },
        }
        opts.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
