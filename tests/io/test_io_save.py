"""save_model: the 2 GB limit, atomic writes, bad output paths."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from io_models import (  # noqa: F401 - small_stub_threshold is an autouse fixture
    conv_bn_mlp,
    full,
    small_stub_threshold,
    tmp_files,
)
from onnx import TensorProto, numpy_helper

import bnfold.onnx.io as bio
from bnfold.errors import BnfoldError, InputError
from bnfold.onnx.io import save as save_mod
from bnfold.onnx.io import sink as sink_mod
from bnfold.onnx.io import wire

# ---------------------------------------------------------------------------------------------
# 2 GB limit, length computation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**31 + 5], ids=lambda n: f"L{n}"
)
def test_payload_length_is_recovered_from_message_sizes(length):
    head = 37
    total = head + 1 + len(wire.varint(length)) + length
    assert save_mod.payload_len_from_sizes(total, head) == length
    assert wire.varint_len(length) == len(wire.varint(length))


def test_over_the_limit_embedded_raises_and_writes_nothing(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(save_mod, "PROTOBUF_LIMIT", 20_000)
    out = tmp_path / "out.onnx"
    with pytest.raises(BnfoldError, match="external data") as info:
        bio.save_model(conv_bn_mlp(rng), out, external_data=False)
    assert "out.onnx" in str(info.value) and "2 GB" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_in_memory_model_over_the_limit_gets_external_data_at_the_given_location(tmp_path, rng, monkeypatch):
    model = conv_bn_mlp(rng)
    monkeypatch.setattr(save_mod, "PROTOBUF_LIMIT", 20_000)
    out = str(tmp_path / "out.onnx")
    bio.save_model(model, out, location="weights.bin")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "weights.bin"]
    onnx.checker.check_model(out)
    assert full(out) == model.SerializeToString()


def test_over_the_limit_switches_to_external_data(tmp_path, rng, monkeypatch):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    monkeypatch.setattr(save_mod, "PROTOBUF_LIMIT", 20_000)
    out = str(tmp_path / "out.onnx")
    bio.save_model(bio.load_model(src, lazy=True), out)
    assert os.path.getsize(out) <= 20_000
    assert os.path.exists(out + ".data")
    assert full(out) == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# atomicity
# ---------------------------------------------------------------------------------------------


def _fail_copy(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_failure_mid_write_leaves_destination_untouched(tmp_path, rng, monkeypatch, external):
    model = conv_bn_mlp(rng)
    src = str(tmp_path / "src.onnx")
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    monkeypatch.setattr(sink_mod, "copy_range", _fail_copy)
    with pytest.raises(BnfoldError, match="No space left"):
        bio.save_model(bio.load_model(src, lazy=True), out, external_data=external)
    assert out.read_bytes() == b"previous model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert tmp_files(str(tmp_path)) == []


def test_interrupt_during_fsync_cleans_up(tmp_path, rng, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bio.save_model(conv_bn_mlp(rng), tmp_path / "out.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.path.join(p, "missing", "out.onnx"), "does not exist"),
        (lambda p: p, "is a directory"),
    ],
    ids=["missing-directory", "output-is-directory"],
)
def test_bad_output_path(tmp_path, rng, make, message):
    with pytest.raises(InputError, match=message):
        bio.save_model(conv_bn_mlp(rng), make(str(tmp_path)))


def test_explicit_location_that_escapes_is_rejected(tmp_path, rng):
    with pytest.raises(InputError, match="relative path"):
        bio.save_model(conv_bn_mlp(rng), tmp_path / "out.onnx", external_data=True, location="../x.data")


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_large_in_memory_tensors_are_written_without_encoding_them(tmp_path, rng, external, monkeypatch):
    """A fold's new weights are in-memory tensors: their payload is written between the head's
    fields, never through ByteSize/SerializeToString of the whole tensor; the bytes are the same."""
    model = conv_bn_mlp(rng)
    for i, dtype in enumerate((np.float32, np.float16, np.float64)):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.normal(size=(70_000 + i)).astype(dtype), f"big{i}")
        )
    model.graph.initializer[-1].doc_string = "after raw_data? no: doc_string is field 12, raw_data 9"
    encoded = []

    def spy(method):
        real = getattr(TensorProto, method)

        def encode(self, *args, **kwargs):
            if self.name.startswith("big") and self.HasField("raw_data"):
                encoded.append((method, self.name))
            return real(self, *args, **kwargs)

        return encode

    out = tmp_path / "out.onnx"
    expected = model.SerializeToString()
    for method in ("SerializeToString", "ByteSize"):
        monkeypatch.setattr(TensorProto, method, spy(method))
    bio.save_model(model, out, external_data=external)
    monkeypatch.undo()
    assert encoded == []
    if external:
        assert full(str(out)) == expected
    else:
        assert out.read_bytes() == expected
