"""onnx, imported only as far as the job needs it.

``import onnx`` runs the package's whole ``__init__``: helper, compose, serialization, the dtype
mapping and, through it, ml_dtypes. With ml_dtypes 0.7.0 that import alone takes 0.5 s (0.07 s
with 0.6.0), longer than folding a 100 MB model. A fold without verification only parses,
rewrites and writes protobuf messages, and for that it needs the message classes, which onnx
generates into one self-contained module, ``onnx/onnx_ml_pb2.py`` (10 ms).

``onnx`` here stands in for the package. A message class or enum (``onnx.ModelProto``,
``onnx.TensorProto.FLOAT``) comes from that generated module, executed alone; anything else
(``onnx.helper``, ``onnx.shape_inference``, ``onnx.defs``, ...) imports the real package on first
use and is taken from it. The classes are the same objects either way, since protobuf keeps one
class per descriptor in its default pool, so messages made before and after the real import mix
freely and ``isinstance`` holds. When the real package is already imported, or the generated
module cannot be found or run alone, everything comes from the real package.

Use ``from bnfold.onnxlib import onnx`` where a module would ``import onnx``; type checkers see
the real package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import TYPE_CHECKING, Any

__all__ = ["full_import", "onnx", "real_onnx_imported"]

_PRIVATE_NAME = "bnfold._onnx_ml_pb2"
_messages: types.ModuleType | None = None


def _load_messages() -> types.ModuleType:
    """onnx's generated message module, executed alone; the real package if that fails."""
    global _messages
    if _messages is not None:
        return _messages
    if "onnx" in sys.modules:
        _messages = full_import()
        return _messages
    try:
        spec = importlib.util.find_spec("onnx")  # finds the package without running it
        if spec is None or spec.origin is None:
            raise ImportError("onnx not found")
        path = os.path.join(os.path.dirname(spec.origin), "onnx_ml_pb2.py")
        module_spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        module.ModelProto  # noqa: B018 - the layout is what we expect
    except Exception:  # noqa: BLE001 - any surprise: the ordinary import decides
        module = full_import()
    _messages = module
    return module


def full_import() -> types.ModuleType:
    """The real onnx package (imported now if it was not)."""
    import onnx as real

    return real


def real_onnx_imported() -> bool:
    """Whether this process has imported onnx's package (tests use it)."""
    return "onnx" in sys.modules


class _Onnx(types.ModuleType):
    """Message classes and enums from the generated module; the rest from the real package."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        messages = _load_messages()
        value = getattr(messages, name, None)
        if value is None or name[0].islower():  # helper, defs, shape_inference, load, ...
            value = getattr(full_import(), name)
        setattr(self, name, value)  # later lookups find it directly
        return value


if TYPE_CHECKING:
    import onnx
else:
    onnx = _Onnx("onnx")
