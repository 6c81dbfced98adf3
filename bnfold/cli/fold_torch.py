"""``bnfold model.pt2`` / ``bnfold --factory pkg.mod:make``: load the PyTorch model, build its
example inputs from ``--shape``/``--inputs``, and fold, export and verify it with
:func:`bnfold.torch.export`. torch is imported only here, and only when this path runs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bnfold.cli.request import FoldRequest, not_written, written
from bnfold.cli.results import FoldOutcome
from bnfold.cli.stats import stats_for_path
from bnfold.cli.versions import install_command
from bnfold.errors import InputError, MissingDependencyError, VerificationError


def fold_torch(req: FoldRequest, *, progress: Callable[[str], None]) -> FoldOutcome:
    """Run a PyTorch fold request; a failed verification is an outcome, not an exception."""
    import bnfold.torch as bt

    try:
        bt.require_torch()
    except MissingDependencyError:
        raise MissingDependencyError(
            f"{req.source}: PyTorch inputs need torch: {install_command('torch')} "
            "(README: Choosing your torch)"
        ) from None
    start = time.perf_counter()
    if req.factory is not None:
        progress(f"building {req.factory}()")
        module, example = bt.load_factory(req.factory, req.weights), None
    else:
        progress(f"loading {req.source}")
        module, example = bt.load_torch_artifact(req.source, trust_pickles=req.trust_pickles)
    opts = req.options
    if opts.shapes or opts.inputs:
        example = example_inputs(opts.shapes, opts.inputs, seed=opts.seed)
    if example is None:
        raise InputError(
            f"{req.source}: no example inputs to export with; pass --shape NAME=1x3x224x224 "
            "(one per input, in order) or --inputs data.npz"
        )
    progress("folding and exporting to ONNX")
    try:
        result = bt.export(
            module,
            example,
            req.output,
            verify=req.verify,
            force=req.force,
            options=dataclasses.replace(opts, inputs=None, shapes=None),
            external_data=req.external_data,
            input_names=list(opts.shapes) if opts.shapes and not opts.inputs else None,
            output_names=list(req.output_names) or None,
        )
    except VerificationError as exc:
        partial = exc.result
        return not_written(
            req,
            exc,
            start=start,
            report=getattr(partial, "onnx_report", None),
            module_report=getattr(partial, "module_report", None),
            export=getattr(partial, "extra", None),
        )
    return written(
        req,
        report=result.onnx_report,
        verification=result.verification,
        start=start,
        module_report=result.module_report,
        after=stats_for_path(req.output),
        export=dict(result.extra),
    )


def example_inputs(shapes: Mapping[str, Sequence[int]] | None, inputs: Any, *, seed: int) -> tuple[Any, ...]:
    """Positional example inputs: the arrays of --inputs in file order, or seeded float32 normal
    samples of each --shape in the order given."""
    import numpy as np
    import torch

    if inputs is not None:
        from bnfold.verify import load_inputs

        sample = load_inputs(inputs)[0]
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in sample.values())
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in (shapes or {}).values())
