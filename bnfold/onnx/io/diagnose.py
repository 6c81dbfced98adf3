"""Why a file is not an ONNX model, in one phrase: the wrong kind of file, truncated, or corrupt."""

from __future__ import annotations

from typing import Any

from bnfold.errors import InputError
from bnfold.onnxlib import onnx

from .wire import Buffer, WireError, field_table, iter_fields


def magic_hint(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it is recognisably not an ONNX model."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint?), not an ONNX model; export it with torch.onnx.export"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself; run `git lfs pull` to fetch it"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "an HTML/XML page (a failed download?), not an ONNX model"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (a Keras model?), not an ONNX model"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle (a PyTorch checkpoint?), not an ONNX model"
    if stripped.startswith((b"ir_version", b"<")):
        return "ONNX text format, not a binary ONNX model; convert it with onnx.parser"
    return None


def first_wire_error(
    data: Buffer, start: int, end: int, descriptor: Any, where: str, depth: int = 0
) -> tuple[WireError | None, int, str] | None:
    """The first place ``data[start:end]`` stops being a well-formed ``descriptor`` message.

    Returns ``(wire_error_or_None, byte, where)``; None when the bytes look well formed.
    """
    fields = field_table(descriptor)
    try:
        for number, wire_type, field_start, value_start, value_end in iter_fields(data, start, end):
            info = fields.get(number)
            if info is None or wire_type not in info[1]:
                return None, field_start, f"unexpected field {number} in {where}"
            if info[2] is not None and depth < 64:  # deeper nesting: protobuf's own limit decides
                found = first_wire_error(
                    data, value_start, value_end, info[2], f"{where}.{info[0]}", depth + 1
                )
                if found is not None:
                    return found
    except WireError as err:
        if err.number in fields:
            where = f"{where}.{fields[err.number][0]}"
        return err, err.pos, where
    return None


def diagnose(data: Buffer, size: int) -> str:
    """One phrase saying why ``data`` does not parse as a ModelProto."""
    hint = magic_hint(bytes(data[:64]))
    if hint:
        return hint
    found = first_wire_error(data, 0, size, onnx.ModelProto.DESCRIPTOR, "model")
    if found is None:
        return "corrupt ONNX model (protobuf parse failed)"
    err, pos, where = found
    if err is not None and err.truncated:
        needed = f"needs {err.needed} bytes" if err.needed else "runs past the end"
        return (
            f"truncated: {where} (from byte {pos}) {needed} but the file has {size}; "
            "the copy or download was probably cut short"
        )
    if where == "model" or where.startswith("unexpected field") and where.endswith(" in model"):
        what = where if err is None else "malformed field"
        return f"not an ONNX model (protobuf parse failed at byte {pos}: {what})"
    what = where if err is None else f"malformed field in {where}"
    return f"corrupt ONNX model (protobuf parse failed at byte {pos}: {what})"


def check_model_fields(model: onnx.ModelProto, path: str) -> None:
    """Refuse a message that parses but is not a model (no graph, IR version or opset)."""
    missing = [
        what
        for what, ok in (
            ("graph", model.HasField("graph")),
            ("ir_version", model.HasField("ir_version")),
            ("opset_import", len(model.opset_import) > 0),
        )
        if not ok
    ]
    if missing:
        raise InputError(f"{path}: not an ONNX model (it parses, but has no {', no '.join(missing)})")
