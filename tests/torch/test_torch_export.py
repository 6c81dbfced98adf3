"""bnfold.torch.export and bnfold.torch.inputs: fold, export, fold what is left in ONNX, verify.

The saved model is checked independently here: onnxruntime at ORT_DISABLE_ALL on the example
inputs against the *unfolded* module's torch outputs, within 1e-5 of the output's magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnx
from torch import nn

from bnfold.errors import InputError, VerificationError
from bnfold.onnx.fold import count_bn
from bnfold.report import SkipReason
from bnfold.torch import export
from torch_models import (  # noqa: F401 (seeded_torch: autouse fixture)
    BatchNormAct2d,
    Net,
    check_saved,
    randomize,
    seeded_torch,
)


class DataDependent(nn.Module):
    """torch.fx cannot trace the ``if``: ``bn`` is left by the module pass, the ONNX pass folds it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 1e9:
            return y
        return self.bn(self.conv(y))


class LinearOn3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_export_round_trip_is_folded_and_verified(tmp_path):
    module = randomize(Net())
    x = torch.randn(2, 3, 8, 8)
    out = tmp_path / "net.onnx"
    result = export(
        module,
        (x,),
        out,
        input_names=["image"],
        output_names=["features", "logits"],
        opset_version=17,
        dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
    )
    assert result.path == str(out) and out.is_file()
    assert [(f.bn, f.producer) for f in result.module_report.folded] == [
        ("features.1", "features.0"),
        ("features.4", "features.3"),
        ("features.7", "features.6"),
        ("bn", "fc"),
    ]
    assert not result.module_report.skipped and not result.onnx_report.skipped
    assert result.verification is not None and result.verification.passed
    tv = result.extra["torch_vs_onnx"]
    assert tv.passed and [d.name for d in tv.outputs] == ["features", "logits"]
    assert all(d.max_rel < 1e-5 and d.total > 0 for d in tv.outputs)
    model = check_saved(str(out), module, x)
    assert count_bn(model) == 0 and op_types(model).count("ConvTranspose") == 1
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == [
        "features",
        "logits",
    ]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in model.opset_import)
    check_saved(str(out), module, torch.randn(5, 3, 8, 8))  # the dynamic batch axis works


def test_export_with_dynamo_exporter(tmp_path):
    module = randomize(Net())
    x = torch.randn(2, 3, 8, 8)
    result = export(module, (x,), tmp_path / "net.onnx", dynamo=True)
    assert result.extra["exporter"] == "dynamo" and len(result.module_report.folded) == 4
    assert result.verification.passed and result.extra["torch_vs_onnx"].passed
    assert count_bn(check_saved(result.path, module, x)) == 0


def test_onnx_pass_folds_what_the_module_pass_could_not_trace(tmp_path):
    module = randomize(DataDependent())
    x = torch.randn(2, 3, 6, 6)
    result = export(module, x, tmp_path / "dd.onnx")
    assert [f.bn for f in result.module_report.folded] == ["stem.1"]
    (s,) = result.module_report.skipped
    assert s.bn == "bn" and s.reason is SkipReason.UNTRACEABLE
    assert len(result.onnx_report.folded) == 1 and not result.onnx_report.skipped
    assert result.verification.passed
    assert count_bn(check_saved(result.path, module, x)) == 0


def test_unfoldable_bn_stays_in_the_exported_model(tmp_path):
    """Linear on (N, L, F) then BatchNorm1d: neither pass may fold it."""
    module = randomize(LinearOn3D())
    x = torch.randn(3, 6, 6)
    result = export(module, x, tmp_path / "lin3.onnx")
    assert [s.reason for s in result.module_report.skipped] == [SkipReason.CHANNEL_AXIS_MISMATCH]
    assert [s.reason for s in result.onnx_report.skipped] == [SkipReason.CHANNEL_AXIS_MISMATCH]
    assert result.verification.passed
    assert count_bn(check_saved(result.path, module, x)) == 1


def test_torchscript_module_is_folded_in_onnx(tmp_path):
    module = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    scripted = torch.jit.script(module).train()
    x = torch.randn(1, 3, 8, 8)
    result = export(scripted, x, tmp_path / "ts.onnx")
    assert scripted.training, "the caller's module is not changed"
    assert result.module_report.bn_total == 0 and len(result.onnx_report.folded) == 1
    assert result.verification.passed
    assert count_bn(check_saved(result.path, module, x)) == 0


def test_diverging_export_raises_and_writes_nothing_unless_forced(tmp_path, monkeypatch):
    """A wrong fold in the ONNX pass (simulated: one weight scaled by 1.01) must be caught by
    both checks; the file appears only with force=True."""
    from bnfold import api

    real = api.fold_model

    def corrupt(model, **kw):
        report = real(model, **kw)
        init = model.graph.initializer[0]
        arr = onnx.numpy_helper.to_array(init) * np.float32(1.01)
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return report

    monkeypatch.setattr(api, "fold_model", corrupt)
    module = randomize(Net())
    x = torch.randn(2, 3, 8, 8)
    out = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError) as info:
        export(module, x, out)
    assert not out.exists()
    assert info.value.report is not None and not info.value.report.passed
    assert not info.value.result.extra["torch_vs_onnx"].passed
    result = export(module, x, out, force=True)
    assert out.is_file() and not result.verification.passed


class EfficientStem(nn.Module):
    """EfficientNet-style stem and head: Conv -> BatchNormAct2d(SiLU), a depthwise conv -> BatchNormAct2d,
    pooled features -> BatchNorm1d -> Linear (the BN folds forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.norm = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.bn2(self.dw(self.bn1(self.conv(x))))
        return y, self.fc(self.norm(y.mean((2, 3))))


def test_export_folds_batchnorm_act_and_forward_folds_at_module_level(tmp_path):
    """The module pass's new shapes export and verify: no BN reaches the ONNX pass."""
    module = randomize(EfficientStem())
    x = torch.randn(2, 3, 16, 16)
    result = export(module, x, tmp_path / "stem.onnx")
    folded = {f.bn: (f.producer, f.direction) for f in result.module_report.folded}
    assert folded == {"bn1": ("conv", "backward"), "bn2": ("dw", "backward"), "norm": ("fc", "forward")}
    assert not result.module_report.skipped and result.onnx_report.bn_total == 0
    assert result.verification.passed and result.extra["torch_vs_onnx"].passed
    assert count_bn(check_saved(result.path, module, x)) == 0


def test_export_without_verification_still_folds(tmp_path):
    result = export(randomize(Net()), torch.randn(2, 3, 8, 8), tmp_path / "nv.onnx", verify=False)
    assert result.verification is None and "torch_vs_onnx" not in result.extra
    assert count_bn(onnx.load(result.path)) == 0


def test_export_rejects_missing_example_inputs(tmp_path):
    with pytest.raises(InputError, match="example_inputs"):
        export(Net(), None, tmp_path / "x.onnx")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bnfold.torch.compare


def test_torch_vs_onnx_is_a_verify_report_and_not_run_is_never_a_pass(tmp_path):
    """The comparison with the torch module used to be a dict that said ``"passed": True`` when
    the input counts differed and nothing was compared; it is a VerifyReport, NOT_RUN there."""
    from bnfold.report import VerifyStatus
    from bnfold.torch.compare import torch_vs_onnx

    module = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    result = export(module, x, tmp_path / "m.onnx", verify=False)
    model = onnx.load(result.path)
    with torch.no_grad():
        expected = module(x)
    ok = torch_vs_onnx(model, (x,), expected, atol=None, rtol=None)
    assert ok.status is VerifyStatus.PASSED and ok.compared_on == "outputs" and ok.samples == 1
    (diff,) = ok.outputs
    assert diff.kind == "output" and diff.total == expected.numel() and diff.rtol == 1e-4
    assert diff.max_rel < 1e-5 and diff.shape == tuple(expected.shape)
    wrong = torch_vs_onnx(model, (x,), expected * 1.01, atol=None, rtol=None)
    assert wrong.status is VerifyStatus.FAILED and not wrong.passed and wrong.outputs[0].mismatched > 0
    missing = torch_vs_onnx(model, (x, x), expected, atol=None, rtol=None)
    assert missing.status is VerifyStatus.NOT_RUN and not missing.passed and not missing.outputs
    assert "1 inputs for 2 tensors" in missing.message
