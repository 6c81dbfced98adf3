"""bnfold.torch.inputs and bnfold.torch.archive: loading the user's PyTorch files without running
code from them (pickles, AOTInductor libraries, sys.exit in a factory)."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from bnfold.errors import InputError, MissingDependencyError
from bnfold.onnx.fold import count_bn
from bnfold.torch import export
from torch_models import check_saved, randomize, seeded_torch  # noqa: F401 (autouse fixture)


def test_require_torch_says_how_to_install(monkeypatch):
    from bnfold.torch import inputs

    assert inputs.require_torch() is torch
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        inputs.require_torch()
    assert str(info.value) == (
        "install the torch extra: pip install 'bnfold[torch]' (see README: Choosing your torch)"
    )


def test_load_pt2_archive_gives_module_and_example_inputs(tmp_path):
    from bnfold.torch.inputs import load_torch_artifact

    module = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (x,)), path)
    loaded, example = load_torch_artifact(path)
    assert len(example) == 1 and torch.equal(example[0], x)
    result = export(loaded, example, tmp_path / "m.onnx")
    assert len(result.onnx_report.folded) == 1 and result.verification.passed
    assert count_bn(check_saved(result.path, module, x)) == 0


def test_load_torchscript_archive(tmp_path):
    from bnfold.torch.inputs import load_torch_artifact

    module = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    loaded, example = load_torch_artifact(path)
    assert isinstance(loaded, torch.jit.ScriptModule) and example is None
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


class _Evil:
    """Unpickling this would create a file: proof that bnfold does not unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: torch.save({"w": torch.ones(2)}, p), "not TorchScript"),
        (lambda p: torch.save(_Evil(p.with_name("pwned")), p), "never unpickles"),
        (
            lambda p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
            "legacy pickle",
        ),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: None, "no such file"),
    ],
    ids=["state-dict", "pickled-object", "legacy-pickle", "empty", "directory", "missing"],
)
def test_load_torch_artifact_refuses_what_it_cannot_load_safely(tmp_path, make, words):
    from bnfold.torch.inputs import load_torch_artifact

    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(InputError, match=words) as info:
        load_torch_artifact(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


FACTORY_SOURCE = """
import sys
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

def not_a_module():
    return 42

class Holder:
    @staticmethod
    def make():
        return build()

def exits():
    raise SystemExit(0)

class ExitsInEval(nn.Sequential):
    def eval(self):
        sys.exit(3)

def exits_later():
    return ExitsInEval(nn.Conv2d(3, 4, 3))
"""


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """A package on the current directory, as the CLI user would have it."""
    name = f"userzoo_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_load_factory_builds_and_loads_weights(tmp_path, factory_dir):
    from bnfold.torch.inputs import load_factory

    ref = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pt")
    module = load_factory(f"{factory_dir}:build", str(tmp_path / "w.pt"))
    assert not module.training
    for k, v in ref.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    assert isinstance(load_factory(f"{factory_dir}:Holder.make", None), nn.Sequential)


@pytest.mark.parametrize(
    ("spec", "weights", "words"),
    [
        ("no_colon", None, "expected 'package.module:callable'"),
        ("nosuchpackage_xyz:build", None, "cannot import"),
        ("{pkg}:missing", None, "has no attribute"),
        ("{pkg}:not_a_module", None, "not a torch.nn.Module"),
        ("{pkg}:build", "wrong-keys", "does not fit"),
        ("{pkg}:build", "wrong-shape", "does not fit"),
        ("{pkg}:build", "pickled-object", "weights_only=True"),
        ("{pkg}:build", "missing", "no such file"),
    ],
    ids=[
        "bad-spec",
        "no-module",
        "no-attribute",
        "not-a-module",
        "wrong-keys",
        "wrong-shape",
        "pickled-object",
        "missing-weights",
    ],
)
def test_load_factory_errors_are_one_line(tmp_path, factory_dir, spec, weights, words):
    from bnfold.torch.inputs import load_factory

    w = None
    if weights is not None:
        w = tmp_path / "w.pt"
        good = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()
        if weights == "wrong-keys":
            torch.save({"conv.weight": torch.ones(1)}, w)
        elif weights == "wrong-shape":
            torch.save({**good, "0.weight": torch.ones(4, 3, 5, 5)}, w)
        elif weights == "pickled-object":
            torch.save(_Evil(tmp_path / "pwned"), w)
    with pytest.raises(InputError, match=words) as info:
        load_factory(spec.format(pkg=factory_dir), None if w is None else str(w))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- sys.exit in user code


@pytest.mark.parametrize(
    ("attr", "words"),
    [("exits", "calling it with no arguments failed: it called sys.exit(0)"), ("exits_later", "sys.exit(3)")],
    ids=["factory-exits", "returned-module-exits"],
)
def test_factory_calling_sys_exit_is_an_input_error(factory_dir, attr, words):
    """SystemExit from the factory used to escape the loader: the CLI ended with exit 0, having
    written nothing and said nothing. It is an InputError with one line."""
    from bnfold.torch.inputs import load_factory

    with pytest.raises(InputError) as info:
        load_factory(f"{factory_dir}:{attr}", None)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_factory_module_exiting_at_import_is_an_input_error(tmp_path, monkeypatch):
    from bnfold.torch.inputs import load_factory

    name = f"exits_at_import_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("import sys\nsys.exit('bye')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        with pytest.raises(InputError, match=r"cannot import .*sys.exit\('bye'\)"):
            load_factory(f"{name}:build", None)
    finally:
        sys.modules.pop(name, None)


class ExitsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 1e9:  # untraceable: the eager run on the example inputs reaches the exit
            return x
        sys.exit(5)


def test_forward_calling_sys_exit_is_an_input_error(tmp_path):
    from bnfold.torch import fold_module

    module, x = randomize(ExitsInForward()), torch.randn(1, 3, 8, 8)
    with pytest.raises(InputError, match=r"sys.exit\(5\)"):
        fold_module(module, example_inputs=(x,))
    with pytest.raises(InputError, match=r"sys.exit\(5\)"):
        export(module, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- hostile .pt2 archives


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy the zip ``src`` to ``dst`` with ``edit(name_without_archive_folder, data) -> data | None``
    (None drops the member) and ``edit("+", None) -> {name: data}`` for members to add."""
    with zipfile.ZipFile(src) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    folder = items[0][0].filename.split("/", 1)[0]
    with zipfile.ZipFile(dst, "w") as z:
        for info, data in items:
            new = edit(info.filename.split("/", 1)[1], data)
            if new is not None:
                z.writestr(info, new)
        for name, data in (edit("+", None) or {}).items():
            z.writestr(f"{folder}/{name}", data)


def _pickled_weight(marker: Path):
    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return _pickled(_Evil(marker)) if name == "data/weights/weight_0" else data

    return edit


def _pickled_sample_inputs(marker: Path):
    return lambda name, data: _pickled(_Evil(marker)) if name == "data/sample_inputs/model.pt" else data


def _opaque_constant(marker: Path):
    def edit(name, data):
        if name == "+":
            return {"data/constants/opaque_obj_0": _pickled(_Evil(marker))}
        if name == "data/constants/model_constants_config.json":
            entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
            return json.dumps({"config": {"evil": entry}}).encode()
        return data

    return edit


def _aoti_library(marker: Path):
    return lambda name, data: {"data/aotinductor/model/model.so": b"\x7fELF"} if name == "+" else data


HOSTILE = [
    ("pickled-weight", _pickled_weight, ["data/weights/weight_0"], True),
    ("sample-inputs-fallback", _pickled_sample_inputs, ["data/sample_inputs/model.pt"], True),
    ("opaque-constant", _opaque_constant, ["data/constants/opaque_obj_0"], False),
    ("aotinductor-library", _aoti_library, ["data/aotinductor/model/model.so"], False),
]


@pytest.fixture
def clean_pt2(tmp_path) -> Path:
    module = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 8, 8),)), path)
    return path


@pytest.mark.parametrize(("make", "members", "runs"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_pt2_members_that_would_run_code_are_refused(tmp_path, clean_pt2, make, members, runs):
    """torch.export.load unpickles weights marked use_pickle and opaque constants, falls back to
    full unpickling for example inputs its restricted unpickler refuses, and loads AOTInductor
    libraries: a crafted archive ran code on load. bnfold inspects the archive first."""
    from bnfold.torch.inputs import load_torch_artifact

    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt2"
    _rewrite(clean_pt2, path, make(marker))
    with pytest.raises(InputError) as info:
        load_torch_artifact(path)
    message = str(info.value)
    assert "\n" not in message and "--trust-pickles" in message and "trust_pickles=True" in message
    assert all(m in message for m in members), message
    assert not marker.exists(), "bnfold ran code from the archive"
    if runs:  # the premise: this archive really runs code when trusted (and torch then fails on it)
        with pytest.raises(InputError):
            load_torch_artifact(path, trust_pickles=True)
        assert marker.exists()


def test_clean_pt2_archive_has_no_unsafe_members(clean_pt2):
    from bnfold.torch.archive import unsafe_members

    with zipfile.ZipFile(clean_pt2) as z:
        assert unsafe_members(z) == []


def test_cli_refuses_a_pickling_pt2_unless_trusted(tmp_path, clean_pt2):
    """The CLI had no way to say "I trust this archive": --trust-pickles passes the library's
    trust_pickles=True through; without it the archive is refused before any code runs."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt2"
    _rewrite(clean_pt2, path, _pickled_weight(marker))
    out = tmp_path / "out.onnx"
    refused = CliRunner().invoke(app, [str(path), "-o", str(out), "--shape", "x=1x3x8x8"])
    assert refused.exit_code == 2, refused.output
    assert "--trust-pickles" in refused.output and not marker.exists() and not out.exists()
    trusted = CliRunner().invoke(app, [str(path), "-o", str(out), "--shape", "x=1x3x8x8", "--trust-pickles"])
    assert marker.exists(), trusted.output  # the flag reached the loader: the pickle ran
    assert trusted.exit_code == 2 and not out.exists()  # and torch then fails on the crafted weight


def test_cli_trust_pickles_is_for_pytorch_inputs(tmp_path):
    from typer.testing import CliRunner

    from bnfold.cli import app

    result = CliRunner().invoke(app, ["models/demo.onnx", "-o", str(tmp_path / "o.onnx"), "--trust-pickles"])
    assert result.exit_code == 2 and "--trust-pickles" in result.output
