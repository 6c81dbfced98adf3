"""Load the user's PyTorch artifacts for the CLI, without unpickling arbitrary objects.

- ``.pt2`` (``torch.export.save``): ``torch.export.load(path).module()``, with the archive's
  example inputs when it stores them, once :mod:`bnfold.torch.archive` found nothing in it that
  loading would unpickle or execute (or the caller passed ``trust_pickles=True``).
- A TorchScript archive (``torch.jit.save``; a zip holding ``code/`` and ``constants.pkl``):
  ``torch.jit.load``. A ScriptModule has no traceable Python forward, so it is not folded at
  module level: :func:`bnfold.torch.export` exports it to ONNX with
  ``training=TrainingMode.PRESERVE`` and the ONNX pass folds it.
- Anything else saved with ``torch.save`` (a pickled module, a state dict) is refused: pass a
  factory (``package.module:callable``) and the state dict as weights, which are loaded with
  ``torch.load(..., weights_only=True)``.

This module does not import torch at import time, so :func:`require_torch` can say how to
install it.
"""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

from ..errors import InputError, MissingDependencyError
from .archive import unsafe_members
from .messages import few, first_line, user_code

__all__ = ["TORCH_MISSING", "load_factory", "load_torch_artifact", "require_torch"]

TORCH_MISSING = "install the torch extra: pip install 'bnfold[torch]' (see README: Choosing your torch)"


def require_torch() -> Any:
    """Return the ``torch`` module, or raise MissingDependencyError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(TORCH_MISSING) from exc
    return torch


def load_torch_artifact(
    path: str | os.PathLike[str], *, trust_pickles: bool = False
) -> tuple[Any, tuple[Any, ...] | None]:
    """``(module, example_inputs or None)`` from a ``.pt2`` export archive or a TorchScript file.

    A ``.pt2`` archive is inspected before ``torch.export.load`` sees it: members it would unpickle
    or execute (:mod:`bnfold.torch.archive`) are refused with an InputError unless
    ``trust_pickles=True`` says the file comes from a trusted source."""
    torch = require_torch()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a PyTorch file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    if path.lower().endswith(".pt2"):
        if not trust_pickles:
            _refuse_unsafe_archive(path)
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise InputError(f"{path}: not a torch.export archive ({first_line(exc)})") from exc
        return program.module(), _example_args(program)
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path}: not a TorchScript archive (legacy pickle format); bnfold never unpickles arbitrary "
            "objects: pass --factory package.module:callable with --weights state_dict.pt"
        )
    if not _is_torchscript(path):
        raise InputError(
            f"{path}: a torch.save() pickle (module or state dict), not TorchScript; bnfold never unpickles "
            "arbitrary objects: pass --factory package.module:callable with --weights state_dict.pt"
        )
    try:
        return torch.jit.load(path, map_location="cpu"), None
    except Exception as exc:
        raise InputError(f"{path}: cannot load TorchScript ({first_line(exc)})") from exc


def load_factory(spec: str, weights: str | os.PathLike[str] | None) -> Any:
    """Build a module by calling ``package.module:callable`` with no arguments (the current
    directory is importable), then load ``weights`` (a state dict, or a checkpoint holding one
    under ``state_dict`` or ``model``) with ``torch.load(weights_only=True)``, strictly."""
    torch = require_torch()
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"--factory {spec!r}: expected 'package.module:callable'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    where = f"--factory {spec!r}"
    with user_code(f"{where}: cannot import {mod_name!r}"):
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise InputError(f"{where}: {mod_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{where}: {attr!r} is not callable")
    with user_code(f"{where}: calling it with no arguments failed"):
        module = obj()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{where}: returned {type(module).__name__}, not a torch.nn.Module")
    state = _load_state_dict(torch, os.fspath(weights)) if weights is not None else None
    with user_code(f"{where}: the module it returned failed"):
        if state is not None:
            _load_weights(module, spec, state, os.fspath(weights))
        return module.eval()


def _load_weights(module: Any, spec: str, state: Mapping[str, Any], path: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(
            f"{path}: does not fit {spec}(): missing {few(missing)}, unexpected {few(unexpected)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # size mismatches; the message is several lines
        why = " ".join(line.strip() for line in str(exc).splitlines()[1:3]) or first_line(exc)
        raise InputError(f"{path}: does not fit {spec}(): {why}") from exc


def _load_state_dict(torch: Any, path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"{path}: not loadable with torch.load(weights_only=True) ({first_line(exc)}); "
            "save the state dict (module.state_dict()), not the module"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InputError(f"{path}: not a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _refuse_unsafe_archive(path: str) -> None:
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a torch.export archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as z:
            unsafe = unsafe_members(z)
    except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a torch.export archive ({first_line(exc)})") from exc
    if unsafe:
        raise InputError(
            f"{path}: holds members that torch.export.load would unpickle or execute ({few(unsafe)}); "
            "bnfold refuses to run code from a model file: pass trust_pickles=True "
            "(CLI: --trust-pickles) only if you trust where the file comes from"
        )


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in f"/{n}" for n in names) and any(n.endswith("constants.pkl") for n in names)


def _example_args(program: Any) -> tuple[Any, ...] | None:
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    return tuple(args) if not kwargs else None
