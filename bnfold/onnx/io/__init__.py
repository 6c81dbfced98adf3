"""ONNX file I/O: lazy loading, typed references to tensor data, streaming atomic saves.

``wire``      the protobuf wire format (varints, fields, the descriptors' field numbers)
``diagnose``  why a file is not an ONNX model, in one phrase
``external``  external data references: parsed as onnxruntime does, resolved safely; typed stubs
``tensors``   tensor values checked against type and shape, read embedded or from files
``validate``  names that must decode as UTF-8
``load``      ``load_model``, eager or lazy (stubs into the file, no payload read)
``sink``      buffered sequential writes and in-kernel copies
``atomic``    the one atomic-write primitive (text, model, model + data), staging, cleanup
``save``      ``save_model``: the wire format written directly, payloads streamed
"""

from __future__ import annotations

from .atomic import remove_stale, write_text_atomic
from .external import Source, Stub, data_files, is_lazy, source_dir_of, stub_of
from .load import LAZY_THRESHOLD, load_model
from .save import EXTERNAL_THRESHOLD, save_model
from .tensors import materialize, read_array
from .wire import copy_except

__all__ = [
    "EXTERNAL_THRESHOLD",
    "LAZY_THRESHOLD",
    "Source",
    "Stub",
    "copy_except",
    "data_files",
    "is_lazy",
    "load_model",
    "materialize",
    "read_array",
    "remove_stale",
    "save_model",
    "source_dir_of",
    "stub_of",
    "write_text_atomic",
]
