"""Fold a module, export it to ONNX, fold what is left there, verify against the unfolded module.

1. :func:`bnfold.torch.fold_module` folds a copy of the module (a TorchScript module is not
   folded at module level: it is exported with ``TrainingMode.PRESERVE`` and the ONNX pass folds it).
2. ``torch.onnx.export`` writes the folded module and, for verification, the *unfolded* one
   (BatchNormalization kept; the exporters' own unchecked Conv+BN fusion does not run).
3. :func:`bnfold.api.fold_loaded` runs the ONNX pass on the folded export, verified against the
   unfolded export: the same fold -> verify -> roll back flow as every other entry point.
4. :func:`bnfold.torch.compare.torch_vs_onnx` runs the result with onnxruntime on the example
   inputs against the module's own torch outputs.
5. Only when both pass (or ``force``) is the model saved at ``path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, VerificationError
from ..report import ExportResult, FoldReport, FoldResult
from ..verify import VerifyOptions, verify_options
from .compare import torch_vs_onnx
from .fold import fold_module
from .messages import first_line, user_code
from .modules import ExampleInputs, as_args, copy_module

__all__ = ["export"]


def export(
    module: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    force: bool = False,
    opset_version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamo: bool = False,
    external_data: bool | None = None,
    samples: int = 3,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    options: VerifyOptions | None = None,
) -> ExportResult:
    """Fold ``module`` (a copy), export it to ONNX at ``path``, fold what is left there, verify.

    The export options are passed to ``torch.onnx.export``. ``dynamo=False`` (the default) uses
    the TorchScript-based exporter with ``training=TrainingMode.PRESERVE`` (the module is in eval
    mode, so BN exports in inference form, but the exporter's own unchecked Conv+BN fusion does
    not run); ``dynamo=True`` uses ``torch.export`` with ``optimize=False`` (so onnxscript's
    BatchNormalization fusion does not pre-empt the checked ONNX pass).

    With ``verify=True`` the saved model must match the *unfolded* module: an ONNX export of it
    (BN kept) on ``samples`` seeded inputs (``verification``; ONNX folds that diverge are rolled
    back), and the module's torch outputs on ``example_inputs`` (``extra["torch_vs_onnx"]``, a
    :class:`~bnfold.report.VerifyReport`). Tolerances are ``atol``/``rtol`` or the verifier's
    per-dtype defaults; ``options`` may carry all of them instead of the keywords. When either
    check fails or cannot run, VerificationError is raised and ``path`` is not written, unless
    ``force``. ``external_data`` is passed to the model writer.
    """
    opts = verify_options(options, seed=seed, samples=samples, atol=atol, rtol=rtol)
    if not isinstance(module, nn.Module):
        raise InputError(f"export: expected a torch.nn.Module, got {type(module).__name__}")
    args = as_args(example_inputs)
    if args is None:
        raise InputError("export: example_inputs are required (a tensor or a tuple of positional inputs)")
    is_script = isinstance(module, torch.jit.ScriptModule)
    exported = ExportOptions(
        opset_version=opset_version,
        input_names=tuple(input_names) if input_names is not None else None,
        output_names=tuple(output_names) if output_names is not None else None,
        dynamic_shapes=dynamic_shapes,
        dynamic_axes=dynamic_axes,
        dynamo=dynamo and not is_script,
    )
    path = os.path.abspath(os.fspath(path))
    with user_code("export: the module's code", any_error=False):
        return _export(
            module, args, path, exported, verify=verify, force=force, opts=opts, external_data=external_data
        )


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: str,
    exported: ExportOptions,
    *,
    verify: bool,
    force: bool,
    opts: VerifyOptions,
    external_data: bool | None,
) -> ExportResult:
    reference = copy_module(module).eval()
    if isinstance(module, torch.jit.ScriptModule):
        folded, module_report = reference, FoldReport()
    else:
        folded, module_report = fold_module(module, example_inputs=args)
    extra: dict[str, Any] = {"exporter": "dynamo" if exported.dynamo else "torchscript"}

    def result(onnx_result: FoldResult, written: str) -> ExportResult:
        return ExportResult(
            path=written,
            module_report=module_report,
            onnx_report=onnx_result.report,
            verification=onnx_result.verification,
            extra=extra,
        )

    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        candidate = _load(torch_to_onnx(folded, args, os.path.join(tmp, "candidate.onnx"), exported))
        if not verify:
            onnx_result = _fold_loaded(candidate, tmp, options=opts, force=force, reference=None)
        else:
            # the reference takes the candidate's input names, so both are fed the same samples;
            # output names stay the exporter's unless given: verify matches outputs by position
            inputs = tuple(i.name for i in candidate.graph.input)
            names = dataclasses.replace(exported, input_names=inputs)
            ref_path = torch_to_onnx(reference, args, os.path.join(tmp, "reference.onnx"), names)
            try:
                onnx_result = _fold_loaded(candidate, tmp, options=opts, force=force, reference=ref_path)
            except VerificationError as exc:  # still fails after rolling back: report both checks
                done = exc.result
                onnx_result = FoldResult(
                    model=done.payload, report=done.report, verification=done.verification
                )
            with torch.no_grad():
                expected = reference(*args)
            check = torch_vs_onnx(onnx_result.model, args, expected, atol=opts.atol, rtol=opts.rtol)
            extra["torch_vs_onnx"] = check
            problems = [
                f"{what}: {vr.status.value}: {vr.message}"
                for what, vr in (
                    ("ONNX vs unfolded ONNX export", onnx_result.verification),
                    ("ONNX vs torch", check),
                )
                if not vr.passed
            ]
            if problems and not force:
                raise VerificationError(
                    f"verification failed: {'; '.join(problems)}",
                    report=onnx_result.verification,
                    result=result(onnx_result, ""),
                )
        _save(onnx_result.model, path, source_dir=tmp, external_data=external_data)
    return result(onnx_result, path)


def _fold_loaded(
    model: Any, base_dir: str, *, options: VerifyOptions, force: bool, reference: str | None
) -> FoldResult:
    """The ONNX pass on the exported model, verified against ``reference`` when one is given."""
    from .. import api

    return api.fold_loaded(
        model,
        inplace=True,
        base_dir=base_dir,
        verify=reference is not None,
        options=options,
        force=force,
        reference=reference,
        intermediates=False,
    )


@dataclass(frozen=True)
class ExportOptions:
    """What ``torch.onnx.export`` is told, besides the module and its inputs."""

    opset_version: int | None
    input_names: tuple[str, ...] | None
    output_names: tuple[str, ...] | None
    dynamic_shapes: Any
    dynamic_axes: Mapping[str, Any] | None
    dynamo: bool


def torch_to_onnx(module: nn.Module, args: tuple[Any, ...], f: str, o: ExportOptions) -> str:
    """Export ``module`` to the file ``f`` with BatchNormalization kept; InputError on failure."""
    kw: dict[str, Any] = {
        "opset_version": o.opset_version,
        "input_names": list(o.input_names) if o.input_names is not None else None,
        "output_names": list(o.output_names) if o.output_names is not None else None,
        "dynamic_axes": o.dynamic_axes,
        "dynamo": o.dynamo,
    }
    if o.dynamo:
        kw.update(dynamic_shapes=o.dynamic_shapes, optimize=False)
    else:
        kw.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, f, **kw)
    except Exception as exc:
        raise InputError(f"torch.onnx.export failed: {first_line(exc)}") from exc
    return f


_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress to stdout and log warnings (missing torchvision ops...) to
    stderr; the library never prints, so both are muted for the duration of the export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load(path: str) -> Any:
    from ..onnx.io import load_model

    return load_model(path)


def _save(model: Any, path: str, *, source_dir: str, external_data: bool | None) -> None:
    from ..onnx.io import save_model

    save_model(model, path, source_dir=source_dir, external_data=external_data)
