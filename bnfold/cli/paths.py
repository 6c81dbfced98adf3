"""Where ``bnfold MODEL`` reads and writes: the source, the output path (default
``<stem>.folded.onnx`` beside MODEL; into a folder given as ``-o``), never over the input
without ``--in-place``."""

from __future__ import annotations

import os

import typer

from bnfold.cli.options import UsageError
from bnfold.errors import InputError

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".ts")
"""Inputs handled by the PyTorch path: ``torch.export`` archives (.pt2) and TorchScript."""


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file (through links too); paths not there yet compare by real path."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def default_output(source: str) -> str:
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(source), f"{stem}.folded.onnx")


def resolve_paths(
    model: str | None, output: str | None, *, in_place: bool, factory: str | None
) -> tuple[str, str]:
    """The source and the output path, refusing to overwrite the input without --in-place."""
    if factory is not None:
        if model is not None:
            raise typer.BadParameter("give either MODEL or --factory, not both", param_hint="MODEL")
        if output is None:
            raise typer.BadParameter("--factory needs -o/--output", param_hint="-o/--output")
        return f"{factory}", output
    if model is None:
        raise UsageError("missing MODEL (bnfold MODEL -o OUT)")
    if os.path.isdir(model):
        raise InputError(f"{model}: is a directory, not a model (bnfold check takes directories)")
    if not os.path.exists(model):
        raise InputError(f"{model}: no such file")
    if in_place:
        if output is not None and not same_file(output, model):
            raise typer.BadParameter(
                "--in-place writes over MODEL; drop -o or --in-place", param_hint="--in-place"
            )
        if model.lower().endswith(TORCH_SUFFIXES):
            raise typer.BadParameter("--in-place needs an ONNX model", param_hint="--in-place")
        return model, model
    if output is None:
        output = default_output(model)
    elif os.path.isdir(output):
        output = os.path.join(output, os.path.basename(default_output(model)))
    if same_file(output, model):
        raise typer.BadParameter(
            f"{output} is the input model; pass --in-place to overwrite it", param_hint="-o/--output"
        )
    return model, output
