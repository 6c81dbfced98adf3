"""The exported ONNX model against the torch module, on the example inputs.

onnxruntime runs the model at ``ORT_DISABLE_ALL`` (so it cannot fold BN itself) and each output
is compared with the module's torch output by the ONNX verifier's metric
(:class:`bnfold.verify.compare.TensorStats`: an element mismatches when
``|ref - out| > atol + rtol * max|ref|``; integer outputs must be equal). The
result is a :class:`~bnfold.report.VerifyReport` with one ``TensorDiff`` per output;
``NOT_RUN`` (never a pass) when nothing could be compared.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..report import InputSpec, VerifyReport, VerifyStatus
from ..verify.compare import TensorStats
from ..verify.models import session_options
from .fuse import to_numpy
from .messages import first_line


def torch_vs_onnx(
    model: Any, args: tuple[Any, ...], expected: Any, *, atol: float | None, rtol: float | None
) -> VerifyReport:
    """Run ``model`` (an ``onnx.ModelProto``) on ``args`` and compare with ``expected``."""
    import onnxruntime as ort

    start = time.perf_counter()
    tensors = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    refs = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    names = [i.name for i in model.graph.input]
    specs = tuple(
        InputSpec(name=n, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))
        for n, t in zip(names, tensors)
    )
    common = {
        "inputs": specs,
        "samples": 1,
        "input_source": "user",
        "compared_on": "outputs",
        "onnxruntime_version": ort.__version__,
    }

    def not_run(message: str) -> VerifyReport:
        return VerifyReport(
            status=VerifyStatus.NOT_RUN, message=message, seconds=time.perf_counter() - start, **common
        )

    if len(names) != len(tensors):
        return not_run(f"not compared: the ONNX model has {len(names)} inputs for {len(tensors)} tensors")
    so = session_options("ORT_DISABLE_ALL")
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    except Exception as exc:  # noqa: BLE001 - reported as a comparison not run
        return not_run(f"onnxruntime cannot run the folded model: {first_line(exc)}")
    if len(outs) != len(refs):
        return not_run(f"the ONNX model has {len(outs)} outputs, the module {len(refs)}")
    diffs = []
    for o, ref, out in zip(model.graph.output, refs, outs):
        stats = TensorStats(name=o.name, kind="output", user_atol=atol, user_rtol=rtol)
        stats.add(to_numpy(ref), np.asarray(out))
        diffs.append(stats.result())
    failed = [d.name for d in diffs if not d.passed]
    return VerifyReport(
        status=VerifyStatus.FAILED if failed else VerifyStatus.PASSED,
        outputs=tuple(diffs),
        message=f"outputs {', '.join(failed)} differ from the torch module's" if failed else "",
        seconds=time.perf_counter() - start,
        **common,
    )
