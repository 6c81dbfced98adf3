# SHIM: removed at integration
"""Old home of bnfold's ONNX I/O; it lives in :mod:`bnfold.onnx.io` now."""

from bnfold.onnx.io import (  # noqa: F401
    EXTERNAL_THRESHOLD,
    LAZY_THRESHOLD,
    copy_except,
    is_lazy,
    load_model,
    materialize,
    read_array,
    save_model,
    write_text_atomic,
)
from bnfold.onnx.io.external import model_tensors as _model_tensors  # noqa: F401
from bnfold.onnx.io.save import PROTOBUF_LIMIT as _PROTOBUF_LIMIT  # noqa: F401
from bnfold.onnx.io.save import payload_len_from_sizes as _payload_len_from_sizes  # noqa: F401
from bnfold.onnx.io.sink import copy_range as _copy_range  # noqa: F401
from bnfold.onnx.io.wire import varint as _varint  # noqa: F401
from bnfold.onnx.io.wire import varint_len as _varint_len  # noqa: F401
