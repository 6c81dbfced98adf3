"""ONNX file I/O: lazy loading, typed references to tensor data, streaming atomic saves.

``wire``      the protobuf wire format (varints, fields, the descriptors' field numbers)
``diagnose``  why a file is not an ONNX model, in one phrase
``external``  external data references: parsed as onnxruntime does, resolved safely; typed stubs;
              deferred folds (values computed from a stub's bytes where they are written)
``tensors``   tensor values checked against type and shape, read embedded or from files
``validate``  names that must decode as UTF-8; node arity against the operator schemas
``load``      ``load_model``, eager or lazy (stubs into the file, no payload read)
``sink``      buffered sequential writes, in-kernel copies, deferred folds computed in blocks
``atomic``    the one atomic-write primitive (text, model, model + data), SIGTERM, stale cleanup
``datanames`` which data files a model uses, a save writes and retires; never overwriting inputs
``staging``   a candidate written beside its destination, then published as a pair
``save``      ``save_model``: the wire format written directly, payloads streamed; ``materialize``
"""

from __future__ import annotations

from .atomic import remove_stale, terminate_as_exit, write_text_atomic
from .datanames import ensure_not_overwriting, model_files
from .external import (
    Files,
    Source,
    Stub,
    data_files,
    defer_scaled,
    is_lazy,
    scaled_of,
    source_dir_of,
    stub_of,
)
from .load import LAZY_THRESHOLD, load_model
from .save import EXTERNAL_THRESHOLD, materialize, save_model
from .staging import Staging
from .tensors import read_array
from .wire import copy_except

__all__ = [
    "EXTERNAL_THRESHOLD",
    "LAZY_THRESHOLD",
    "Files",
    "Source",
    "Staging",
    "Stub",
    "copy_except",
    "data_files",
    "defer_scaled",
    "ensure_not_overwriting",
    "is_lazy",
    "load_model",
    "materialize",
    "model_files",
    "read_array",
    "remove_stale",
    "save_model",
    "scaled_of",
    "source_dir_of",
    "stub_of",
    "terminate_as_exit",
    "write_text_atomic",
]
