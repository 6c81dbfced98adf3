"""The options the commands share, as ``Annotated`` typer options, and how their values are
parsed (``--shape NAME=DIMS``, ``--json [PATH]``). Used by :mod:`bnfold.cli.fold` and
:mod:`bnfold.cli.check`; nothing here runs a model."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from bnfold.cli.results import EXIT_OK
from bnfold.cli.versions import versions_line

UsageError = click_exceptions.UsageError
"""A wrong command line: ``bnfold: error: MESSAGE (see 'bnfold --help')``, exit 2."""

MAX_DIM = 2**31 - 1
"""The largest dimension ``--shape`` accepts (onnxruntime's own limit per axis on most builds)."""

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)*$")


def normalize_json_args(args: Sequence[str]) -> list[str]:
    """``--json`` optionally takes a path; click options cannot, so rewrite before parsing:

    ``--json`` alone → stdout;  ``--json -`` / ``--json=-`` → stdout;
    ``--json=PATH`` and ``--json PATH.json`` → ``--json-file PATH``.
    A bare ``--json`` followed by anything else stays a flag, so ``--json a.onnx`` never
    overwrites a model.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--json="):
            value = arg[len("--json=") :]
            out.extend(["--json"] if value in ("", "-") else ["--json-file", value])
        elif (
            arg == "--json"
            and i + 1 < len(args)
            and (args[i + 1] == "-" or args[i + 1].lower().endswith(".json"))
        ):
            out.extend(["--json"] if args[i + 1] == "-" else ["--json-file", args[i + 1]])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """An input's shape, as bnfold, onnxsim, onnxslim and polygraphy write it:

    ``NAME=1x3x224x224``, ``NAME=1,3,224,224``, ``NAME:1,3,224,224``, ``NAME:[1,3,224,224]``
    → ``("NAME", (1, 3, 224, 224))``. With ``=`` the last ``=`` splits (names may hold ``:``,
    as TensorFlow's ``input:0``); without it, the last ``:``.
    """
    sep = "=" if "=" in spec else ":"
    name, found, dims = spec.rpartition(sep)
    if not found or not name:
        raise typer.BadParameter(
            f"'{spec}' is not NAME=DIMS or NAME:DIMS, e.g. input=1x3x224x224", param_hint="--shape"
        )
    body = dims.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    if not _SHAPE_RE.match(body):
        raise typer.BadParameter(
            f"'{spec}': dimensions must be positive integers joined by 'x' or ',', e.g. {name}=1x3x224x224",
            param_hint="--shape",
        )
    shape = tuple(int(d) for d in re.split(r"[x,]", body.replace(" ", "")))
    if any(d <= 0 for d in shape):
        raise typer.BadParameter(f"'{spec}': dimensions must be positive", param_hint="--shape")
    if any(d > MAX_DIM for d in shape):
        raise typer.BadParameter(f"'{spec}': a dimension is larger than {MAX_DIM}", param_hint="--shape")
    return name, shape


def _shape_callback(values: list[str] | None) -> list[str] | None:
    shapes = {}
    for spec in values or []:
        name, shape = parse_shape(spec)
        if name in shapes:
            raise typer.BadParameter(f"input '{name}' is given twice", param_hint="--shape")
        shapes[name] = shape
    return values


def shapes_of(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """The ``--shape`` values as ``{name: dims}`` (already checked by the option's callback)."""
    return dict(parse_shape(v) for v in values) if values else None


def _version_callback(value: bool) -> None:
    if value:
        print(versions_line())
        raise typer.Exit(EXIT_OK)


def _inputs_path(value: str | None) -> str | None:
    """``--inputs`` names an .npz file or a folder (a FIFO or device would hang or crash the reader)."""
    if value is not None and os.path.exists(value) and not (os.path.isfile(value) or os.path.isdir(value)):
        raise typer.BadParameter(f"{value} is not a regular file or a folder", param_hint="--inputs")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


VersionOption = Annotated[
    bool,
    typer.Option("--version", callback=_version_callback, is_eager=True, help="Print versions and exit."),
]
ShapeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        metavar="NAME=DIMS",
        callback=_shape_callback,
        help="Shape of an input for verification/export: input=1x3x224x224, input:1,3,224,224 or "
        "input:[1,3,224,224]. Repeatable.",
        show_default=False,
    ),
]
InputsOption = Annotated[
    str | None,
    typer.Option(
        "--inputs",
        callback=_inputs_path,
        metavar="NPZ|DIR",
        help="Verify on these inputs: an .npz (keys = input names) or a folder of TensorProto .pb files.",
        show_default=False,
    ),
]
SeedOption = Annotated[
    int, typer.Option("--seed", min=0, metavar="N", help="Seed of the generated verification inputs.")
]
MAX_SAMPLES = 1_000_000
"""More samples than anyone waits for; a 20-digit --samples is a typo, not a plan."""

SamplesOption = Annotated[
    int,
    typer.Option(
        "--samples",
        min=1,
        max=MAX_SAMPLES,
        metavar="N",
        help="Number of generated input samples to verify on.",
    ),
]


AtolOption = Annotated[
    float | None,
    typer.Option(
        "--atol",
        callback=_finite,
        min=0.0,
        metavar="FLOAT",
        help="Absolute tolerance (default: 0, per dtype).",
        show_default=False,
    ),
]
RtolOption = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        callback=_finite,
        min=0.0,
        metavar="FLOAT",
        help="Relative tolerance, of the tensor's magnitude (default: per dtype; 1e-4 for float32).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the full report as JSON on stdout, and nothing else there. "
        "--json=PATH or --json PATH.json writes it to a file instead.",
    ),
]
JsonFileOption = Annotated[
    str | None,
    typer.Option("--json-file", metavar="PATH", help="Write the JSON report to PATH.", show_default=False),
]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Exit 1 if any BatchNormalization remains, for any reason.")
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print only errors.")]
VerboseOption = Annotated[
    bool, typer.Option("-v", "--verbose", help="List every BN and compared tensor; log each step on stderr.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
