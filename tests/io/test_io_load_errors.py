"""load_model and read_array on bad input: one InputError line each."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from io_models import (  # noqa: F401 - small_stub_threshold is an autouse fixture
    BF16,
    INT4,
    conv_bn_mlp,
    model_bytes,
    save_external,
    small_stub_threshold,
)
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx.io as bio
from bnfold.errors import InputError

# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


BAD_FILES = {
    "empty": (b"", "empty file"),
    "truncated": (model_bytes()[:-3000], "truncated"),
    "random-bytes": (
        bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8)),
        "not an ONNX model",
    ),
    "text": (b"hello world, this is not a model\n" * 5, "not an ONNX model"),
    "zip-torch-checkpoint": (b"PK\x03\x04" + b"\0" * 100, "zip archive"),
    "git-lfs-pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
    "html-error-page": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    "parses-without-graph": (onnx.ModelProto(ir_version=8).SerializeToString(), "no graph"),
    "tensor-not-model": (numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString(), "ONNX"),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("case", sorted(BAD_FILES), ids=sorted(BAD_FILES))
def test_bad_file_raises_one_line_input_error(tmp_path, case, lazy):
    content, fragment = BAD_FILES[case]
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        bio.load_model(path, lazy=lazy)
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message


def test_truncated_file_names_the_byte(tmp_path):
    data = model_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InputError, match=r"truncated: model.graph \(from byte \d+\) needs \d+ bytes but the file has \d+"
    ):
        bio.load_model(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_missing_and_directory_paths(tmp_path, lazy):
    with pytest.raises(InputError, match="no such file") as info:
        bio.load_model(tmp_path / "nope.onnx", lazy=lazy)
    assert "nope.onnx" in str(info.value)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner.onnx").write_bytes(model_bytes())
    with pytest.raises(InputError, match="is a directory.*inner.onnx"):
        bio.load_model(tmp_path / "dir", lazy=lazy)


def test_permission_denied_is_an_input_error(tmp_path, monkeypatch):
    """Simulated, because the suite may run as root (who reads any file)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes())
    real_open = os.open

    def denied(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(InputError, match="m.onnx: permission denied"):
        bio.load_model(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes())
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        bio.load_model(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("damage", ["delete", "truncate"], ids=["missing-data-file", "short-data-file"])
def test_missing_or_short_external_data_names_tensor_and_file(tmp_path, rng, lazy, damage):
    src = str(tmp_path / "m.onnx")
    save_external(conv_bn_mlp(rng), src)
    data = tmp_path / "m.onnx.data"
    if damage == "delete":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError) as info:
        bio.load_model(src, lazy=lazy)
    message = str(info.value)
    assert "m.onnx.data" in message and "tensor 'conv_w'" in message and src in message
    assert ("missing" if damage == "delete" else "too short") in message


@pytest.mark.parametrize(
    "location", ["../secret.bin", "/etc/passwd", "sub/../../x"], ids=["dotdot", "abs", "nested"]
)
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_external_location_escaping_the_model_directory_is_rejected(tmp_path, rng, location, lazy):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 5000)
    (tmp_path / "models").mkdir()
    model = conv_bn_mlp(rng, extras=False)
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "1152")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "models" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="outside the model's directory"):
        bio.load_model(path, lazy=lazy)
    with pytest.raises(InputError, match="outside the model's directory"):
        bio.read_array(w, str(tmp_path / "models"))


def test_lazy_references_in_a_file_are_rejected(tmp_path, rng):
    """A lazily loaded model written with onnx.save carries bnfold's location tokens; reading it
    must fail loudly -- even in the process whose side table still knows the token (it would
    silently read the original file's bytes)."""
    src = tmp_path / "src.onnx"
    onnx.save(conv_bn_mlp(rng, extras=False), src)
    onnx.save(bio.load_model(src, lazy=True), tmp_path / "bad.onnx")
    for lazy in (False, True):
        with pytest.raises(InputError, match="bnfold.onnx.io.save_model"):
            bio.load_model(tmp_path / "bad.onnx", lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_reserved_bnfold_keys_of_older_versions_in_a_file_are_rejected(tmp_path, rng, lazy):
    """Stubs of bnfold before the typed references carried ``bnfold.*`` external-data keys."""
    model = conv_bn_mlp(rng, extras=False)
    w = model.graph.initializer[0]
    (tmp_path / "m.onnx.data").write_bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "m.onnx.data"), ("offset", "0"), ("bnfold.embedded", "1")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="bnfold.onnx.io.save_model"):
        bio.load_model(tmp_path / "m.onnx", lazy=lazy)


def test_stub_of_a_changed_source_file_is_refused(tmp_path, rng):
    """Without the stamp check, stubs would silently read the new file's bytes at the old offsets."""
    src = tmp_path / "src.onnx"
    onnx.save(conv_bn_mlp(rng), src)
    lazy = bio.load_model(src, lazy=True)
    onnx.save(conv_bn_mlp(np.random.default_rng(99)), src)
    with pytest.raises(InputError, match="changed on disk"):
        bio.read_array(lazy.graph.initializer[0])
    with pytest.raises(InputError, match="changed on disk"):
        bio.save_model(lazy, tmp_path / "out.onnx")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(1000, dtype=np.float16) / 7,
        (np.arange(1000, dtype=np.float32) / 7).astype(BF16),
        np.arange(-500, 500, dtype=np.int64).reshape(10, 100),
        (np.arange(-500, 500) % 251 - 125).astype(np.int8).reshape(2, 500),
        np.linspace(-1, 1, 999, dtype=np.float64),
        np.arange(-8, 8, dtype=np.int8).repeat(100).astype(INT4),
    ],
    ids=["float16", "bfloat16", "int64", "int8", "float64", "int4-packed"],
)
@pytest.mark.parametrize("where", ["embedded", "external"], ids=["embedded", "external"])
def test_read_array_dtypes(tmp_path, array, where):
    tensor = numpy_helper.from_array(array, "t")
    if where == "external":
        payload = tensor.raw_data
        (tmp_path / "t.bin").write_bytes(b"x" * 17 + payload)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "t.bin"), ("offset", "17"), ("length", str(len(payload)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    got = bio.read_array(tensor, str(tmp_path))
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_read_array_rejects_a_length_that_does_not_match_the_shape(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\0" * 64)
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [4, 4], np.zeros(16))
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "t.bin"), ("offset", "0"), ("length", "60")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(InputError, match="needs 64 bytes"):
        bio.read_array(tensor, str(tmp_path))
