"""Paths that must never be written or read: inputs and their data, special files, data outside
the model's folder, and external-data entries onnxruntime would refuse (issue 10 items 1, 3, 13)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from io_models import conv_bn_mlp, full, save_external, small_stub_threshold  # noqa: F401 - autouse fixture
from onnx import TensorProto, numpy_helper

import bnfold.onnx.io as bio
from bnfold.errors import InputError


def external_tensor(tmp_path, location: str, entries: dict[str, str] | None = None) -> onnx.TensorProto:
    """A 16-float tensor stored at offset 16 of ``w.bin`` in ``tmp_path``, named by ``location``."""
    values = np.arange(16, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 16 + values.tobytes())
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, "offset": "16", "length": "64", **(entries or {})}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


# -- item 1: never overwrite an input or its data -----------------------------------------


def test_output_that_is_the_input_or_its_data_is_refused(tmp_path, rng):
    src = str(tmp_path / "m.onnx")
    save_external(conv_bn_mlp(rng), src)
    before = full(src)
    for output, what in ((src, "the input model"), (src + ".data", "a data file of")):
        with pytest.raises(InputError, match=what):
            bio.ensure_not_overwriting([src], [output])
    link = tmp_path / "alias.onnx.data"
    link.symlink_to("m.onnx.data")
    with pytest.raises(InputError, match="a data file of"):
        bio.ensure_not_overwriting([src], [link])
    bio.ensure_not_overwriting([src], [tmp_path / "out.onnx"])  # anything else is fine
    assert full(src) == before


def test_saving_over_a_data_file_the_model_reads_is_refused(tmp_path, rng):
    """Before: `-o` naming the input's data file replaced the weights with the model."""
    src = str(tmp_path / "m.onnx")
    save_external(conv_bn_mlp(rng), src)
    data = (tmp_path / "m.onnx.data").read_bytes()
    with pytest.raises(InputError, match="external data file the model reads"):
        bio.save_model(bio.load_model(src, lazy=True), tmp_path / "m.onnx.data")
    assert (tmp_path / "m.onnx.data").read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("how", ["save", "staging"])
def test_output_whose_data_name_is_the_inputs_data_file_keeps_it(tmp_path, rng, how):
    """`mv model.onnx orig.onnx; fold orig.onnx -o model.onnx` with the weights in model.onnx.data:
    before, the staged model.onnx.data was renamed over the input's weights."""
    model = conv_bn_mlp(rng)
    save_external(model, str(tmp_path / "model.onnx"))
    os.rename(tmp_path / "model.onnx", tmp_path / "orig.onnx")
    data = (tmp_path / "model.onnx.data").read_bytes()
    lazy = bio.load_model(tmp_path / "orig.onnx", lazy=True)
    dst = tmp_path / "model.onnx"
    if how == "save":
        bio.save_model(lazy, dst)
    else:
        with bio.Staging(dst, reads=[tmp_path / "orig.onnx"]) as stage:
            assert stage.location == "model.onnx.1.data"
            bio.save_model(lazy, stage.path, location=stage.location)
            stage.publish()
    assert (tmp_path / "model.onnx.data").read_bytes() == data
    assert full(str(tmp_path / "orig.onnx")) == full(str(dst)) == model.SerializeToString()


def test_in_place_staging_retires_the_inputs_old_data(tmp_path, rng):
    model = conv_bn_mlp(rng)
    src = tmp_path / "m.onnx"
    save_external(model, str(src))
    with bio.Staging(src, reads=[src]) as stage:
        bio.save_model(bio.load_model(src, lazy=True), stage.path, location=stage.location)
        stage.publish()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data"]
    assert full(str(src)) == model.SerializeToString()


# -- item 3: special files as outputs ----------------------------------------------------


def assert_every_writer_refuses(path, rng, match: str) -> None:
    """save_model, write_text_atomic and Staging all refuse ``path`` with ``match``."""
    with pytest.raises(InputError, match=match):
        bio.save_model(conv_bn_mlp(rng), path)
    with pytest.raises(InputError, match=match):
        bio.write_text_atomic(path, "{}")
    with pytest.raises(InputError, match=match):
        bio.Staging(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_output_is_refused_not_replaced(tmp_path, rng):
    """Before: the FIFO was replaced by a regular file."""
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    assert_every_writer_refuses(fifo, rng, "special file")
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    assert os.listdir(tmp_path) == ["out.onnx"]


@pytest.mark.parametrize("target", ["/dev/null", "/proc/self/fd/1"])
def test_symlink_to_a_device_or_proc_is_refused(tmp_path, rng, target):
    """Before: the link was replaced by a regular file."""
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    link = tmp_path / "out.onnx"
    link.symlink_to(target)
    assert_every_writer_refuses(link, rng, "special file")
    assert os.path.islink(link) and os.readlink(link) == target


def test_dangling_symlink_and_trailing_slash_are_refused(tmp_path, rng):
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(InputError, match="dangling"):
        bio.save_model(conv_bn_mlp(rng), tmp_path / "dangling.onnx")
    with pytest.raises(InputError, match="names a directory"):
        bio.save_model(conv_bn_mlp(rng), f"{tmp_path}/newdir/")
    with pytest.raises(InputError, match="names a directory"):
        bio.write_text_atomic(f"{tmp_path}/report/", "{}")
    assert sorted(os.listdir(tmp_path)) == ["dangling.onnx"]


# -- item 13: external data outside the folder; entries onnxruntime refuses ----------------


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("how", ["file-link", "folder-link"])
def test_external_data_through_a_symlink_leaving_the_folder_is_refused(tmp_path, rng, lazy, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    model = conv_bn_mlp(rng, extras=False)
    save_external(model, str(outside / "m.onnx"))
    (outside / "m.onnx").rename(models / "m.onnx")
    if how == "file-link":
        (models / "m.onnx.data").symlink_to(outside / "m.onnx.data")
    else:
        (models / "data").symlink_to(outside)
        m = onnx.load(models / "m.onnx", load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "data/m.onnx.data"
        (models / "m.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match="outside the model's directory"):
        bio.load_model(models / "m.onnx", lazy=lazy)


def test_symlink_inside_the_folder_is_followed(tmp_path):
    (tmp_path / "blobs").mkdir()
    tensor = external_tensor(tmp_path, "link.bin")
    os.rename(tmp_path / "w.bin", tmp_path / "blobs" / "w.bin")
    (tmp_path / "link.bin").symlink_to("blobs/w.bin")
    np.testing.assert_array_equal(bio.read_array(tensor, str(tmp_path)), np.arange(16, dtype=np.float32))


@pytest.mark.parametrize(
    "value", [" 16", "16 ", "+16", "0x10", "1_6", "16.0", "-16", "", "\u0663", "99999999999999999999"]
)
@pytest.mark.parametrize("key", ["offset", "length"])
def test_offsets_and_lengths_onnxruntime_refuses_are_refused(tmp_path, key, value):
    """Python's int() accepts ' 16', '+16', '1_6' and Arabic-Indic digits; onnxruntime does not."""
    tensor = external_tensor(tmp_path, "w.bin")
    next(e for e in tensor.external_data if e.key == key).value = value
    with pytest.raises(InputError, match=f"invalid external data {key}"):
        bio.read_array(tensor, str(tmp_path))


def test_forms_onnxruntime_accepts_are_read(tmp_path):
    for entries in ({"offset": "016"}, {"checksum": "abc"}):
        tensor = external_tensor(tmp_path, "./w.bin", entries)
        np.testing.assert_array_equal(bio.read_array(tensor, str(tmp_path)), np.arange(16, dtype=np.float32))
    tensor = external_tensor(tmp_path, "w.bin")
    del tensor.external_data[2]  # no length: to the end of the file
    np.testing.assert_array_equal(bio.read_array(tensor, str(tmp_path)), np.arange(16, dtype=np.float32))


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"foo": "1"}, "unknown external data key 'foo'"), ({"location": "w.bin"}, "'location' twice")],
    ids=["unknown-key", "duplicate-key"],
)
def test_unknown_or_repeated_keys_are_refused(tmp_path, extra, message):
    tensor = external_tensor(tmp_path, "w.bin")
    for key, value in extra.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(InputError, match=message):
        bio.read_array(tensor, str(tmp_path))
    model = conv_bn_mlp(np.random.default_rng(3), extras=False)
    model.graph.initializer.append(tensor)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=message):
        bio.load_model(tmp_path / "m.onnx")


def test_read_array_of_a_stub_needs_no_folder(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_mlp(rng), src)
    lazy = bio.load_model(src, lazy=True)
    w = next(t for t in lazy.graph.initializer if t.name == "conv_w")
    assert bio.is_lazy(w)
    expected = numpy_helper.to_array(next(t for t in onnx.load(src).graph.initializer if t.name == "conv_w"))
    np.testing.assert_array_equal(bio.read_array(w), expected)
