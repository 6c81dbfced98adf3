"""Where ``bnfold MODEL`` reads and writes: the source, the output path (``OUT`` or ``-o``;
default ``<stem>.folded.onnx`` beside MODEL; ``<stem>.folded.onnx`` inside a folder given as
``-o deploy/``, created when missing), never over the input without ``--in-place``, never over a
special file, and report files never over a model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import typer

from bnfold.cli.options import UsageError
from bnfold.errors import BnfoldError, InputError
from bnfold.onnx.io import model_files
from bnfold.onnx.io.atomic import check_output

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".ts")
"""Inputs handled by the PyTorch path: ``torch.export`` archives (.pt2) and TorchScript."""


@dataclass(frozen=True)
class Target:
    """What a fold reads and where it writes."""

    source: str
    """A model path, or the ``--factory`` spec."""
    output: str
    new_folders: tuple[str, ...] = ()
    """Folders of ``output`` that do not exist yet (``-o deploy/``), outermost first."""


def refuse_special(path: str) -> None:
    """Refuse an output bnfold must not replace with a regular file: a device, a FIFO, a link
    into ``/proc`` or ``/dev`` (``/proc/self/fd/1`` is whatever stdout is), a folder that does
    not exist or that it cannot write in."""
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if not os.path.islink(hop):
            break
        hop = os.path.abspath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
        if hop.startswith(("/proc/", "/dev/")):
            raise InputError(f"{path}: is a link to {hop}, not a regular file; refusing to replace it")
    check_output(os.path.abspath(path), path)


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file (through links too); paths not there yet compare by real path."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def default_output(source: str) -> str:
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(source), f"{stem}.folded.onnx")


def resolve_paths(
    model: str | None, out: str | None, output: str | None, *, in_place: bool, factory: str | None
) -> Target:
    """The source and the output path (``out`` is the second positional, ``output`` is ``-o``),
    checked before any work: refuses to overwrite the input without --in-place, a special file,
    an unwritable folder."""
    if factory is not None and model is not None and out is None and output is None:
        if os.path.lexists(model):  # a model given by mistake, or an old output: never replaced silently
            raise typer.BadParameter(
                f"give either MODEL or --factory, not both ({model} exists; to replace it, pass -o {model})",
                param_hint="MODEL",
            )
        model, out = None, model  # `bnfold --factory pkg:make OUT`: the factory is the model
    if out is not None and output is not None:
        raise UsageError(f"the output is given twice ({out} and -o {output}); give OUT or -o, not both")
    output = output if output is not None else out
    if output == "":
        raise typer.BadParameter("the output path is empty", param_hint="-o/--output")
    if factory is not None:
        if model is not None:
            raise typer.BadParameter("give either MODEL or --factory, not both", param_hint="MODEL")
        if output is None:
            raise typer.BadParameter("--factory needs -o/--output", param_hint="-o/--output")
        refuse_special(output)
        return Target(factory, output)
    if model is None:
        raise UsageError("missing MODEL (bnfold MODEL [OUT])")
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
        return Target(model, model)
    new_folders: tuple[str, ...] = ()
    if output is None:
        output = default_output(model)
    elif output.endswith(("/", os.sep)) or os.path.isdir(output):
        new_folders = tuple(_missing_folders(output))
        output = os.path.join(output, os.path.basename(default_output(model)))
    if same_file(output, model):
        raise typer.BadParameter(
            f"{output} is the input model; pass --in-place to overwrite it", param_hint="-o/--output"
        )
    if not new_folders:
        refuse_special(output)
    return Target(model, output, new_folders)


def _missing_folders(folder: str) -> Iterator[str]:
    """The folders on the way to ``folder`` that do not exist, outermost first; refuses a
    path whose existing part is not a folder."""
    missing: list[str] = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise InputError(f"{folder}: {path} exists and is not a folder")
        missing.append(path)
        path = os.path.dirname(path)
    if missing and not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: cannot create it: permission denied in {path}")
    return reversed(missing)


def make_folders(folders: tuple[str, ...]) -> None:
    """Create the missing folders of ``-o deploy/``, outermost first."""
    for folder in folders:
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            raise InputError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from exc


def remove_empty_folders(folders: tuple[str, ...]) -> None:
    """Undo :func:`make_folders` where nothing was written, so a refused fold leaves no trace."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def refuse_report_over(report: str | None, option: str, protected: Iterable[str]) -> None:
    """Refuse a report path (``--json-file``, ``--junit-xml``) that names a model or an output."""
    if report is None:
        return
    for path in protected:
        if same_file(report, path):
            raise typer.BadParameter(
                f"{report} names a model of this run ({path}); write the report elsewhere", param_hint=option
            )


def refuse_writing_over_data(models: Iterable[str], targets: Iterable[str | None]) -> None:
    """Refuse a target (the output, a report) that is an external-data file one of ``models``
    reads: the model would lose its weights. A model that cannot be read protects only itself
    (its own error is reported where it is loaded)."""
    wanted = [t for t in targets if t]
    for model in models if wanted else ():
        if not model.lower().endswith(".onnx"):
            continue
        try:
            data = model_files(model) - {os.path.realpath(model)}
        except (BnfoldError, OSError, ValueError):
            continue
        for target in wanted:
            if os.path.realpath(target) in data:
                raise InputError(
                    f"{target}: is a data file of {model} (its weights); refusing to overwrite it (write elsewhere)"
                )


def check_writable(path: str | None, option: str) -> None:
    """Refuse a report path whose folder does not exist, or that names a special file or an
    unwritable place, before doing any work."""
    if path is None:
        return
    if path == "":
        raise typer.BadParameter("the report path is empty", param_hint=option)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise typer.BadParameter(f"{path} is a directory", param_hint=option)
    if not os.path.isdir(folder):
        raise typer.BadParameter(f"{path}: folder {folder} does not exist", param_hint=option)
    refuse_special(path)
