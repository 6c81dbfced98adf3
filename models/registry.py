"""The reference model zoo: metadata for every model, and functions that build, export and cache them.

Importing this module builds nothing and does not import torch: the PyTorch builders live in
``models.torch_zoo`` and are imported on first use, so ONNX-only users can read the metadata
(shapes, BN counts, which BNs are expected to stay) without torch installed.

ONNX files come from the legacy TorchScript exporter with BatchNormalization kept::

    torch.onnx.export(m, args, f, dynamo=False, training=TrainingMode.PRESERVE,
                      do_constant_folding=False, opset_version=17, ...)

and are cached under ``models/.cache/`` (git-ignored) by :func:`build_onnx`, keyed by a
fingerprint of the builder sources and library versions, so an edited builder never serves a
stale file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import large as _large
from models.converters import catalog as _catalog

if TYPE_CHECKING:
    import onnx
    import torch

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_DIR = PACKAGE_DIR / ".cache"
DEMO_PATH = PACKAGE_DIR / "demo.onnx"
DEFAULT_OPSET = 17


class ZooError(ValueError):
    """An unknown model name, or a request the model cannot satisfy (e.g. torch for a generated model)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One reference model.

    ``expected_unfoldable`` BNs must survive bnfold's ONNX pass, each skipped with one of
    ``unfoldable_reasons`` (``bnfold.report.SkipReason`` codes); ``notes`` says why. Every other
    BN (``bn_count - expected_unfoldable``) is expected to fold.
    """

    name: str
    description: str
    inputs: dict[str, tuple[int, ...]] = field(hash=False)
    """Graph input name -> static shape."""
    dtypes: dict[str, str] = field(hash=False)
    """Graph input name -> numpy dtype name."""
    outputs: tuple[str, ...] = ("output",)
    source: str = "torch"
    """``torch`` (exported from ``builder``), ``generated`` (written by ``models.large``) or
    ``converter`` (written by ``models.converters``, listed in ``CONVERTERS``)."""
    builder: Callable[[int], Any] | None = field(default=None, compare=False)
    """seed -> eval-mode ``torch.nn.Module`` for torch sources; None for generated models."""
    bn_count: int
    """BatchNormalization nodes in the ONNX export."""
    expected_unfoldable: int = 0
    unfoldable_reasons: tuple[str, ...] = ()
    notes: str = ""
    has_convtranspose: bool = False
    shared_weights: bool = False
    """A weight initializer read by several layers, not all of them followed by the same BN."""
    large: bool = False
    size_mb: float | None = None
    external_data: bool = False

    @property
    def expected_foldable(self) -> int:
        return self.bn_count - self.expected_unfoldable


def _torch_builder(function: str) -> Callable[[int], Any]:
    """A builder that imports ``models.torch_zoo`` (and so torch) only when called."""

    def build(seed: int) -> Any:
        from models import torch_zoo

        return getattr(torch_zoo, function)(seed)

    build.__name__ = build.__qualname__ = function
    return build


def _image(n: int = 1, c: int = 3, hw: int = 32) -> dict[str, tuple[int, ...]]:
    return {"input": (n, c, hw, hw)}


_F32 = {"input": "float32"}

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="resnet-basic",
        description="ResNet basic blocks: identity shortcut, strided block with 1x1 conv+BN projection",
        inputs=_image(),
        dtypes=_F32,
        builder=_torch_builder("build_resnet_basic"),
        bn_count=6,
        notes=(
            "The shortcut BN's running_var equals its weight, so the exporter deduplicates them: "
            "in ONNX its var input is Identity(weight initializer), and that initializer has two readers."
        ),
    ),
    ModelSpec(
        name="resnet-bottleneck",
        description="ResNet bottleneck blocks (1x1-3x3-1x1), projection shortcuts, one strided",
        inputs=_image(),
        dtypes=_F32,
        builder=_torch_builder("build_resnet_bottleneck"),
        bn_count=9,
    ),
    ModelSpec(
        name="mobilenetv2",
        description="MobileNetV2: depthwise 3x3, inverted residuals, linear bottleneck, ReLU6",
        inputs=_image(hw=64),
        dtypes=_F32,
        builder=_torch_builder("build_mobilenetv2"),
        bn_count=10,
    ),
    ModelSpec(
        name="mobilenetv3",
        description="MobileNetV3-style: squeeze-excite (HardSigmoid), HardSwish, 5x5 depthwise, eps 1e-3",
        inputs=_image(hw=64),
        dtypes=_F32,
        builder=_torch_builder("build_mobilenetv3"),
        bn_count=10,
    ),
    ModelSpec(
        name="efficientnet",
        description="EfficientNet-style MBConv: SE, SiLU (Sigmoid*Mul), 5x5 depthwise, eps 1e-3",
        inputs=_image(hw=64),
        dtypes=_F32,
        builder=_torch_builder("build_efficientnet"),
        bn_count=10,
    ),
    ModelSpec(
        name="densenet",
        description="DenseNet-style: pre-activation BN->ReLU->Conv, BN after Concat, transition layer",
        inputs=_image(),
        dtypes=_F32,
        builder=_torch_builder("build_densenet"),
        bn_count=13,
        expected_unfoldable=7,
        unfoldable_reasons=("unsupported-producer",),
        notes=(
            "7 pre-activation BNs read a Concat (5 dense layers, the transition, the final norm) and "
            "feed a ReLU: nothing before them can absorb an affine map and a ReLU sits between them "
            "and the next conv. The 6 others (stem, the BN after each dense layer's 1x1 conv) fold."
        ),
    ),
    ModelSpec(
        name="inception",
        description="Inception-style branches (1x1, 3x3, 1x3->3x1, pool->1x1) joined by Concat, eps 1e-3",
        inputs=_image(),
        dtypes=_F32,
        builder=_torch_builder("build_inception"),
        bn_count=12,
    ),
    ModelSpec(
        name="unet",
        description="UNet-style: conv(bias)+BN encoder, ConvTranspose+BN decoder (one with groups=4), skips",
        inputs=_image(),
        dtypes=_F32,
        builder=_torch_builder("build_unet"),
        bn_count=9,
        has_convtranspose=True,
        notes="ConvTranspose2d(32->16, k3, s2, output_padding=1, bias) and ConvTranspose2d(16->8, k2, s2, groups=4).",
    ),
    ModelSpec(
        name="conv1d-audio",
        description="Conv1d+BN1d on a waveform: strided, depthwise, dilated (bias), ConvTranspose1d+BN",
        inputs={"input": (1, 1, 512)},
        dtypes=_F32,
        builder=_torch_builder("build_conv1d_audio"),
        bn_count=5,
        has_convtranspose=True,
    ),
    ModelSpec(
        name="conv3d-video",
        description="Conv3d+BN3d on (N, C, T, H, W): 3x3x3, (2+1)D factorised, depthwise 3-D",
        inputs={"input": (1, 3, 4, 16, 16)},
        dtypes=_F32,
        builder=_torch_builder("build_conv3d_video"),
        bn_count=4,
    ),
    ModelSpec(
        name="mlp-bn1d",
        description="MLP on (N, F): Linear+BN1d as Gemm, bias-free Linear as MatMul, BN1d(affine=False)",
        inputs={"input": (2, 32)},
        dtypes=_F32,
        builder=_torch_builder("build_mlp_bn1d"),
        bn_count=3,
        notes=(
            "All 3 fold. Linear(bias=False) exports as MatMul(x, Transpose(W)): the weight is a "
            "Transpose of an initializer, constant but computed by a node. BN1d(affine=False) "
            "exports its scale/bias as Constant nodes."
        ),
    ),
    ModelSpec(
        name="linear-bn1d-3d",
        description="Linear on (N, L, F) with L == F, then BatchNorm1d(L): BN normalizes axis 1 = L",
        inputs={"input": (2, 16, 16)},
        dtypes=_F32,
        builder=_torch_builder("build_linear_bn1d_3d"),
        bn_count=2,
        expected_unfoldable=2,
        unfoldable_reasons=("channel-axis-mismatch", "unsupported-producer", "non-constant-weight"),
        notes=(
            "Must NOT fold: BN's channel axis is 1 (sequence positions) while the Linear's output "
            "features are the last axis; shapes line up only because L == F. One Linear has a bias "
            "(MatMul -> Add -> BN), one has none (MatMul(x, Transpose(W)) -> BN)."
        ),
    ),
    ModelSpec(
        name="linear-transpose-bn1d",
        description="Linear on (N, L, F) -> Transpose -> BatchNorm1d(features) -> Transpose",
        inputs={"input": (2, 12, 16)},
        dtypes=_F32,
        builder=_torch_builder("build_linear_transpose_bn1d"),
        bn_count=1,
        expected_unfoldable=0,
        notes=(
            "Folded by tracking the channel axis through the Transpose: BN1d normalizes axis 1 of "
            "the transposed tensor, which is the Linear's output-feature (last) axis before it."
        ),
    ),
    ModelSpec(
        name="detection-head",
        description="Backbone + FPN + a tower conv shared by 3 scales: BN at P3, another BN at P4, none at P5",
        inputs=_image(hw=64),
        dtypes=_F32,
        outputs=("cls_p3", "box_p3", "cls_p4", "box_p4", "cls_p5", "box_p5"),
        builder=_torch_builder("build_detection_head"),
        bn_count=6,
        shared_weights=True,
        notes=(
            "tower.weight is one initializer read by three Conv nodes. All 6 BNs fold, but the P3 and "
            "P4 folds must each get their own copy of the weight, and P5 must keep the original."
        ),
    ),
    ModelSpec(
        name="demo",
        description="The README demo (models/demo.onnx): MobileNet-ish, 17 foldable BN + 1 BN after Concat",
        inputs=_image(hw=64),
        dtypes=_F32,
        builder=_torch_builder("build_demo"),
        bn_count=18,
        expected_unfoldable=1,
        unfoldable_reasons=("unsupported-producer",),
        notes="The last BN normalizes the Concat of a 1x1 and a 3x3 branch: no single conv can absorb it.",
    ),
)


def _large_spec(size_mb: int, *, external_data: bool = False) -> ModelSpec:
    p = _large.plan(size_mb)
    how = "external data (one .data file)" if external_data else "weights embedded"
    return ModelSpec(
        name=f"large-{size_mb}",
        description=(
            f"Generated {size_mb} MiB Conv3x3->BN->Relu stack x{p.conv_blocks} (C={p.channels}) "
            f"+ Gemm->BN, {how}"
        ),
        inputs={"input": _large.INPUT_SHAPE},
        dtypes=_F32,
        source="generated",
        bn_count=p.bn_count,
        large=True,
        size_mb=size_mb,
        external_data=external_data,
    )


_SPECS += (
    _large_spec(100),
    _large_spec(250),
    _large_spec(500),
    _large_spec(2500, external_data=True),
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def _converter(entry: _catalog.Entry) -> ModelSpec:
    return ModelSpec(
        name=entry.name,
        description=entry.description,
        inputs=entry.inputs,
        dtypes=dict.fromkeys(entry.inputs, "float32"),
        outputs=entry.outputs,
        source="converter",
        bn_count=entry.bn_count,
        notes=entry.notes,
    )


CONVERTERS: dict[str, ModelSpec] = {e.name: _converter(e) for e in _catalog.CATALOG}
"""Converter-shaped models (``models.converters``, issue 12), apart from ``REGISTRY`` so that the zoo's
fold expectations and tests stay as they are. :func:`get`, :func:`build_onnx` and ``python -m models
build NAME`` find them by name."""


def converter_names() -> list[str]:
    return list(CONVERTERS)


def names(*, large: bool | None = False) -> list[str]:
    """Registry names: small ones by default, large ones with ``large=True``, all with ``None``."""
    return [n for n, s in REGISTRY.items() if large is None or s.large == large]


def get(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; known: {', '.join([*REGISTRY, *CONVERTERS])}") from None


def _builder(name: str) -> Callable[[int], Any]:
    builder = get(name).builder
    if builder is None:
        raise ZooError(f"{name} is generated directly as ONNX (no PyTorch module); use build_onnx")
    return builder


def build_torch(name: str, *, seed: int = 0) -> torch.nn.Module:
    """The model as an eval-mode ``torch.nn.Module`` with randomized BN statistics, deterministic in ``seed``."""
    return _builder(name)(seed)


def example_arrays(name: str, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs as numpy arrays (no torch needed), keyed by graph input name."""
    spec = get(name)
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(spec.dtypes[k]) for k, shape in spec.inputs.items()}


def example_inputs(name: str, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The same values as :func:`example_arrays`, as a tuple of torch tensors in input order."""
    import torch

    return tuple(torch.from_numpy(a) for a in example_arrays(name, seed=seed).values())


def count_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph (the zoo has no subgraphs)."""
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(
    name: str, path: str | os.PathLike[str], *, seed: int = 0, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a torch zoo model to ``path`` with BatchNormalization kept, and check the BN count.

    Uses the legacy TorchScript exporter (``dynamo=False``) in ``TrainingMode.PRESERVE`` without
    constant folding, so BN nodes stay in the graph (eval mode: ``training_mode=0``).
    """
    import warnings

    import onnx
    import torch

    spec = get(name)
    module = build_torch(name, seed=seed)
    args = example_inputs(name, seed=seed)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            opset_version=opset,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
        )
    data = buf.getvalue()
    found = count_bn(onnx.load_from_string(data))
    if found != spec.bn_count:
        raise ZooError(f"{name}: export has {found} BatchNormalization nodes, expected {spec.bn_count}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    return path


def _fingerprint(spec: ModelSpec, seed: int, opset: int) -> str:
    h = hashlib.sha256(f"{spec.name}|{seed}|{opset}".encode())
    if spec.source == "torch":
        sources = ("torch_zoo.py", "registry.py")
        versions = ("torch", "onnx")
    elif spec.source == "converter":
        sources = tuple(
            sorted(str(p.relative_to(PACKAGE_DIR)) for p in (PACKAGE_DIR / "converters").glob("*.py"))
        )
        versions = ("numpy", "onnx")
    else:
        sources = ("large.py",)
        versions = ("numpy", "onnx")
    for src in sources:
        h.update((PACKAGE_DIR / src).read_bytes())
    for dist in versions:
        h.update(importlib.metadata.version(dist).encode())
    return h.hexdigest()[:10]


def onnx_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Where :func:`build_onnx` caches ``name`` (the file may not exist yet)."""
    spec = get(name)
    opset = _large.OPSET if spec.large else DEFAULT_OPSET
    directory = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    return directory / f"{name}-s{seed}-{_fingerprint(spec, seed, opset)}.onnx"


def build_onnx(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, force: bool = False
) -> Path:
    """The ONNX file of ``name``, built on first use and cached (default ``models/.cache/``).

    Torch models are exported by :func:`export_onnx` at opset 17; large ones are generated by
    :func:`models.large.build_large` (``large-2500`` with its weights in ``<file>.data``).
    """
    path = onnx_path(name, cache_dir=cache_dir, seed=seed)
    if path.exists() and not force:
        return path
    return write_onnx(name, path, seed=seed)


def write_onnx(name: str, path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build ``name`` into ``path`` unconditionally (no cache), torch export or generated."""
    spec = get(name)
    if spec.size_mb is not None:
        return _large.build_large(spec.size_mb, path, external_data=spec.external_data, seed=seed)
    if spec.source == "converter":
        from models import converters

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, converters.build(name, seed).SerializeToString())
        return path
    return export_onnx(name, path, seed=seed)


def write_demo(path: str | os.PathLike[str] = DEMO_PATH) -> Path:
    """Regenerate the committed demo model (seed 0, opset 17); byte-identical for a given torch version."""
    return export_onnx("demo", path, seed=0, opset=DEFAULT_OPSET)
