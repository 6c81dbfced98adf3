"""Fold BatchNorm into the preceding Conv/ConvTranspose/Linear at the PyTorch module level.

In inference mode a BatchNorm is a per-channel affine map on axis 1 of its input
(``torch.nn.BatchNorm{1,2,3}d``; ``eps`` defaults to 1e-5)::

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta = scale * x + shift

When ``x`` is the output of a layer that is linear in its weight along the output-channel
axis, the map folds into the layer (``b = 0`` when the layer has no bias)::

    W' = W * scale      along the weight's output-channel axis
    b' = (b - running_mean) * scale + beta

The output-channel axis of the weight is 0 for ``Conv{1,2,3}d`` ``(C_out, C_in/g, k...)``
and ``Linear`` ``(out, in)``; ``ConvTranspose{1,2,3}d`` stores ``(C_in, C_out/g, k...)``, so
the scale runs along axis 1 *within each group*: the weight is viewed as
``(g, C_in/g, C_out/g, k...)`` and scaled by ``scale.view(g, 1, C_out/g, 1...)``.
``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)`` reshapes the scale to
``(1, C_out, 1...)``, which is right only for ``groups == 1``; grouped ConvTranspose uses the
grouped form here. The fusion helpers compute in the weight's dtype; here every operand is
widened to float64 on the CPU first and the results are rounded once to the layer's dtype.
A result that overflows, turns NaN, or flushes an output channel that was non-zero to all
zeros (float16: ``gamma/sqrt(var+eps)`` beyond 65504...) is not folded
(``SkipReason.NOT_REPRESENTABLE``), the same rule as :func:`bnfold.fold_math.cast_exact`.

Pairs come from dataflow, never from the order in which modules were registered:

1. ``torch.fx`` traces the module (Conv/ConvTranspose/Linear and every BatchNorm-like module
   are leaves). A BN call folds when its input is the output of a Conv/ConvTranspose/Linear
   call that feeds nothing else, the BN uses running statistics, and the BN's channel axis
   (axis 1) is provably the layer's output-channel axis.
2. Where the whole module cannot be traced (data-dependent control flow...), each child that
   contains a BatchNorm is traced on its own, recursively. BatchNorms called directly by an
   untraceable ``forward`` are reported as ``SkipReason.UNTRACEABLE`` with the tracer's message.
   Inside such a child a fold is made only as an in-place swap (the child keeps its class). An
   untraceable ``forward`` that also calls the child's inner Conv or BN directly cannot be seen
   by tracing: with ``example_inputs`` the call counts of one eager run prove it does not (else
   the pair is skipped as UNTRACEABLE); without them it is assumed. :func:`export` always has
   example inputs and verifies the result.

The channel axis. ``BatchNorm1d`` on ``Linear`` output normalizes axis 1; that is the feature
axis only for a rank-2 ``(N, F)`` input. On ``(N, L, F)`` it normalizes ``L`` and a fold would
scale features by the wrong statistics (``torch.fx.experimental.optimization.fuse`` does
exactly that when ``L == F``). Linear pairs therefore fold only when the rank is proven by
running ``example_inputs`` through the traced graph; without them they are skipped with
``CHANNEL_AXIS_MISMATCH``. Conv pairs fold without shapes: ``BatchNorm2d``/``3d`` only accept
the batched rank; ``Conv1d`` -> ``BatchNorm1d`` on *unbatched* ``(C, L)`` input would be a
mismatch, which is detected when ``example_inputs`` are given and otherwise assumed away.

Shared modules. A Conv module called twice (once followed by a BN, once not) keeps its
weights: the folded call gets its own new module, registered under a fresh name
(``<name>_bnfolded``), and the other call still runs the original. A BN module called at two
places is removed only where it folds.

The result. ``fold_module`` folds *inference* behaviour: it calls ``.eval()`` on the module it
returns. When every fold is a plain swap (each folded Conv and BN is called once and
registered once), the result is the caller's class with the Conv replaced by a folded copy and
the BN by ``nn.Identity``. When a fold needs a rewritten forward (a shared Conv, a BN called at
two places), the result is the traced ``torch.fx.GraphModule``, whose ``forward`` is the traced
graph with the folded BN calls removed (methods other than ``forward``, and hooks on the root
module, do not carry over). Inside an untraceable module only swaps are made.

Export. :func:`export` folds at module level, exports with ``torch.onnx.export``, runs the ONNX
pass (:func:`bnfold.onnx_fold.fold_onnx`) on the result to catch what the module pass left,
saves, and verifies the ONNX model against the *unfolded* module: with onnxruntime against the
module's own torch outputs on the example inputs, and with :func:`bnfold.verify.verify`
against an ONNX export of the unfolded module on seeded samples.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.utils.parametrize
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .errors import InputError, VerificationError
from .report import ExportResult, Folded, FoldReport, Skipped, SkipReason, VerifyReport

__all__ = ["export", "fold_module"]

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONV, *_CONV_T, nn.Linear)
_BN_RANKS: tuple[tuple[type, frozenset[int]], ...] = (
    (nn.BatchNorm1d, frozenset({2, 3})),
    (nn.LazyBatchNorm1d, frozenset({2, 3})),
    (nn.BatchNorm2d, frozenset({4})),
    (nn.LazyBatchNorm2d, frozenset({4})),
    (nn.BatchNorm3d, frozenset({5})),
    (nn.LazyBatchNorm3d, frozenset({5})),
)
"""Input ranks each BN class accepts (its ``_check_input_dim``); SyncBatchNorm accepts any >= 2."""
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_FOLDED_SUFFIX = "_bnfolded"

ExampleInputs = torch.Tensor | Sequence[Any]


# --------------------------------------------------------------------------- public API


def fold_module(
    module: nn.Module, *, example_inputs: ExampleInputs | None = None, inplace: bool = False
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of ``module`` into the Conv/ConvTranspose/Linear before it.

    ``example_inputs`` (a tensor or a tuple of positional arguments) are run once through the
    traced graph to prove the rank of each layer's output; Linear -> BatchNorm1d pairs fold only
    with them (see the module docstring). ``inplace=False`` works on a deep copy and leaves
    ``module`` untouched; ``inplace=True`` skips the copy: ``module`` is put in eval mode and
    its submodules may be replaced, so use the returned module and not the argument.

    Returns ``(folded, report)``: ``folded`` is in eval mode (the fold is of inference
    behaviour) and is ``module``'s class, or a ``torch.fx.GraphModule`` when a fold needed a
    rewritten forward. ``report`` has one entry per BatchNorm module called in the forward
    (all BatchNorm modules where that cannot be traced): folded, or skipped with a reason.

    Raises InputError when ``module`` is not an ``nn.Module``, is a TorchScript module (use
    :func:`export`, which folds those in ONNX), or fails on ``example_inputs``.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise InputError(
            "fold_module: TorchScript modules have no traceable Python forward; "
            "use bnfold.export(...), which folds them in the exported ONNX model"
        )
    if not isinstance(module, nn.Module):
        raise InputError(f"fold_module: expected a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(example_inputs)
    model = module if inplace else _copy_module(module)
    model.eval()
    if not any(_bn_kind(m) for m in model.modules()):
        return model, FoldReport()
    if _bn_kind(model):
        detail = "the module is itself a BatchNorm: its input is the model input, nothing absorbs it"
        return model, FoldReport(skipped=(Skipped(bn="", reason=SkipReason.NO_PRODUCER, detail=detail),))
    folder = _Folder(model, args)
    result = folder.run().eval()
    folded = tuple(e for e in folder.entries if isinstance(e, Folded))
    skipped = tuple(e for e in folder.entries if isinstance(e, Skipped))
    return result, FoldReport(folded=folded, skipped=skipped)


def export(
    module: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    force: bool = False,
    opset_version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamo: bool = False,
    external_data: bool | None = None,
    samples: int = 3,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> ExportResult:
    """Fold ``module`` (a copy), export it to ONNX at ``path``, fold what is left there, verify.

    The export options are passed to ``torch.onnx.export``. ``dynamo=False`` (the default) uses
    the TorchScript-based exporter with ``training=TrainingMode.PRESERVE`` (the module is in eval
    mode, so BN exports in inference form, but the exporter's own unchecked Conv+BN fusion does
    not run); ``dynamo=True`` uses ``torch.export`` with ``optimize=False`` (so onnxscript's
    BatchNormalization fusion does not pre-empt the checked ONNX pass). A TorchScript module is
    not folded at module level: it is exported with ``PRESERVE`` and folded by the ONNX pass.

    With ``verify=True`` the saved model must match the *unfolded* module: onnxruntime's outputs
    on ``example_inputs`` against the module's torch outputs (``extra["torch_vs_onnx"]``), and
    :func:`bnfold.verify.verify` against an ONNX export of the unfolded module (BN kept) on
    ``samples`` seeded inputs (``verification``). Tolerances are ``atol``/``rtol`` or the
    verifier's per-dtype defaults. When either fails, VerificationError is raised and ``path`` is
    not written, unless ``force``. ``external_data`` is passed to :func:`bnfold.io.save_model`.
    """
    from .onnx_fold import fold_onnx
    from .verify import verify as verify_models

    if not isinstance(module, nn.Module):
        raise InputError(f"export: expected a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(example_inputs)
    if args is None:
        raise InputError("export: example_inputs are required (a tensor or a tuple of positional inputs)")
    path = os.path.abspath(os.fspath(path))
    is_script = isinstance(module, torch.jit.ScriptModule)
    reference = _copy_module(module).eval()
    if is_script:
        folded, module_report = reference, FoldReport()
    else:
        folded, module_report = fold_module(module, example_inputs=args)
    options = _ExportOptions(
        opset_version=opset_version,
        input_names=tuple(input_names) if input_names is not None else None,
        output_names=tuple(output_names) if output_names is not None else None,
        dynamic_shapes=dynamic_shapes,
        dynamic_axes=dynamic_axes,
        dynamo=dynamo and not is_script,
    )
    extra: dict[str, Any] = {"exporter": "dynamo" if options.dynamo else "torchscript"}
    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        candidate = _load(_torch_to_onnx(folded, args, os.path.join(tmp, "candidate.onnx"), options))
        onnx_result = fold_onnx(candidate, inplace=True, base_dir=tmp)
        model = onnx_result.model
        verification: VerifyReport | None = None
        if verify:
            names = _ExportOptions(
                opset_version=opset_version,
                input_names=tuple(i.name for i in model.graph.input),
                output_names=options.output_names,  # else exporter-chosen; verify matches by position
                dynamic_shapes=dynamic_shapes,
                dynamic_axes=dynamic_axes,
                dynamo=options.dynamo,
            )
            ref_path = _torch_to_onnx(reference, args, os.path.join(tmp, "reference.onnx"), names)
            verification = verify_models(
                ref_path, model, seed=seed, samples=samples, atol=atol, rtol=rtol, intermediates=False
            )
            with torch.no_grad():
                expected = reference(*args)
            extra["torch_vs_onnx"] = _torch_vs_onnx(model, args, expected, atol=atol, rtol=rtol)
            problems = []
            if not verification.passed:
                problems.append(
                    f"ONNX vs unfolded ONNX export: {verification.status.value}: {verification.message}"
                )
            if not extra["torch_vs_onnx"]["passed"]:
                problems.append(f"ONNX vs torch: {extra['torch_vs_onnx']['message']}")
            if problems and not force:
                result = ExportResult(
                    path="",
                    module_report=module_report,
                    onnx_report=onnx_result.report,
                    verification=verification,
                    extra=extra,
                )
                raise VerificationError(
                    f"verification failed: {'; '.join(problems)}", report=verification, result=result
                )
        _save(model, path, source_dir=tmp, external_data=external_data)
    return ExportResult(
        path=path,
        module_report=module_report,
        onnx_report=onnx_result.report,
        verification=verification,
        extra=extra,
    )


# --------------------------------------------------------------------------- recognising modules


def _bn_kind(m: nn.Module) -> str | None:
    """``"bn"`` for a BatchNorm (any ``_BatchNorm`` with the stock forward, SyncBatchNorm
    included), ``"frozen"`` for a FrozenBatchNorm (duck-typed: class name containing
    ``FrozenBatchNorm``, buffers weight/bias/running_mean/running_var, an ``eps``), else None.
    A ``_BatchNorm`` subclass that overrides ``forward`` is not a BatchNorm here: it is traced
    through like any other module."""
    if isinstance(m, _BatchNorm) and type(m).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return "bn"
    if "FrozenBatchNorm" in type(m).__name__:
        buffers = m._buffers
        if all(isinstance(buffers.get(k), torch.Tensor) for k in _FROZEN_BUFFERS) and isinstance(
            getattr(m, "eps", None), (float, int)
        ):
            return "frozen"
    return None


def _producer_base(m: nn.Module) -> type | None:
    """The torch class whose stock forward ``m`` runs (Conv*/ConvTranspose*/Linear), else None."""
    for base in _PRODUCERS:
        if isinstance(m, base):
            if type(m).forward is not base.forward:
                return None
            if base in _CONV and type(m)._conv_forward is not base._conv_forward:
                return None
            return base
    return None


def _contains_bn(m: nn.Module) -> bool:
    return any(_bn_kind(x) for x in m.modules())


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps BatchNorm-like modules and Conv/Linear modules as calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _bn_kind(m) or (isinstance(m, _PRODUCERS) and not _contains_bn(m)):
            return True  # a Conv/Linear subclass with its own forward stays a call, reported as such
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class _Site:
    """One BN call that folds: its node, the producer's node and module, the folded module."""

    bn_node: fx.Node
    prod_node: fx.Node
    producer: nn.Module
    fused: nn.Module


class _Folder:
    """Walks the module tree: traces what it can, folds, records one report entry per BN."""

    def __init__(self, root: nn.Module, args: tuple[Any, ...] | None) -> None:
        self.root = root
        self.args = args
        self.entries: list[Folded | Skipped] = []
        self.reported: set[int] = set()
        self.path_count = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.done: dict[int, nn.Module] = {}
        # Filled by _capture() when the root is untraceable and example inputs exist.
        self.captured = False
        self.call_count: Counter[int] = Counter()
        self.calls: dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]] = defaultdict(list)

    def run(self) -> nn.Module:
        return self._unit(self.root, "", is_root=True)

    # ---- one traceable unit, or its children

    def _unit(self, module: nn.Module, prefix: str, *, is_root: bool) -> nn.Module:
        if id(module) in self.done:
            return self.done[id(module)]
        try:
            gm = _trace(module)
        except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError...
            log.debug("torch.fx cannot trace %s: %s", prefix or "the model", exc)
            result = self._descend(module, prefix, exc)
        else:
            result = self._fold_traced(module, gm, prefix, is_root=is_root)
        self.done[id(module)] = result
        return result

    def _descend(self, module: nn.Module, prefix: str, exc: Exception) -> nn.Module:
        if not self.captured and self.args is not None:
            self._capture()
        where = prefix.rstrip(".") or "the model"
        why = f"torch.fx cannot trace {where} ({type(module).__name__}.forward), which calls it: {_first_line(exc)}"
        for name, child in module.named_children():
            qual = prefix + name
            if _bn_kind(child):
                if id(child) in self.reported:
                    continue
                self.reported.add(id(child))
                note = (
                    " (not called on the example inputs)"
                    if self.captured and not self.call_count[id(child)]
                    else ""
                )
                self.entries.append(Skipped(bn=qual, reason=SkipReason.UNTRACEABLE, detail=why + note))
            elif _contains_bn(child):
                self._unit(child, qual + ".", is_root=False)  # folds by swapping inside child
        return module

    def _capture(self) -> None:
        """Run the model once on the example inputs, recording every module's calls (for the
        ranks inside traceable children, and to tell which BNs are called at all)."""
        assert self.args is not None
        handles = []
        wanted = {id(m) for m in self.root.modules() if _contains_bn(m)}

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.call_count[id(mod)] += 1
            if id(mod) in wanted:
                self.calls[id(mod)].append((args, kwargs))

        for m in self.root.modules():
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                self.root(*self.args)
        except Exception as exc:
            raise InputError(f"example_inputs: the module fails on them: {_first_line(exc)}") from exc
        finally:
            for h in handles:
                h.remove()
        self.captured = True

    # ---- folding inside one traced graph

    def _fold_traced(self, module: nn.Module, gm: fx.GraphModule, prefix: str, *, is_root: bool) -> nn.Module:
        ranks = self._ranks(gm, module, is_root=is_root)
        mods = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        calls = Counter(n.target for n in nodes if n.op == "call_module")
        attr_targets = [str(n.target) for n in nodes if n.op == "get_attr"]

        def attrs_read(path: str) -> bool:
            return any(t == path or t.startswith(path + ".") for t in attr_targets)

        def swappable(site: _Site) -> str:
            """'' when replacing the producer and the BN in place is exact, else why not."""
            p, b = str(site.prod_node.target), str(site.bn_node.target)
            for path, what in ((p, "producer"), (b, "BatchNorm")):
                m = mods[path]
                if calls[path] != 1:
                    return f"the {what} {prefix}{path} is called {calls[path]} times"
                if self.path_count[id(m)] != 1:
                    return f"the {what} {prefix}{path} is registered under {self.path_count[id(m)]} names"
                if attrs_read(path):
                    return f"the forward reads attributes of the {what} {prefix}{path}"
                if self.captured and not is_root and self.call_count[id(m)] != self.call_count[id(module)]:
                    return f"the {what} {prefix}{path} is also called outside {prefix.rstrip('.')}"
            return ""

        by_bn: dict[str, list[fx.Node]] = {}
        for n in nodes:
            if n.op == "call_module" and _bn_kind(mods[str(n.target)]):
                by_bn.setdefault(str(n.target), []).append(n)

        plans: list[tuple[str, list[_Site | Skipped]]] = []
        for target, bn_nodes in by_bn.items():
            bn = mods[target]
            if id(bn) in self.reported:
                continue
            self.reported.add(id(bn))
            plans.append((target, [self._check(n, bn, prefix, mods, ranks) for n in bn_nodes]))

        sites = [o for _, outcomes in plans for o in outcomes if isinstance(o, _Site)]
        blockers = {id(s): swappable(s) for s in sites}
        rewrite = is_root and any(blockers.values())
        if not is_root:  # inside an untraceable parent only exact swaps are allowed
            where = prefix.rstrip(".")
            plans = [
                (
                    target,
                    [
                        Skipped(
                            bn=prefix + target,
                            reason=SkipReason.UNTRACEABLE,
                            detail=f"folding needs a rewritten forward ({blockers[id(o)]}), but the module "
                            f"that calls {where} cannot be traced",
                            producer=prefix + str(o.prod_node.target),
                            producer_op=type(o.producer).__name__,
                        )
                        if isinstance(o, _Site) and blockers[id(o)]
                        else o
                        for o in outcomes
                    ],
                )
                for target, outcomes in plans
            ]
            sites = [o for _, outcomes in plans for o in outcomes if isinstance(o, _Site)]

        names = (
            self._apply_rewrite(gm, sites, calls, attrs_read) if rewrite else self._apply_swaps(module, sites)
        )
        for target, outcomes in plans:
            self.entries.append(
                _entry(prefix + target, outcomes, {id(s): prefix + names[id(s)] for s in sites})
            )
        if not sites:
            return module
        return gm.eval() if rewrite else module

    def _apply_swaps(self, module: nn.Module, sites: list[_Site]) -> dict[int, str]:
        names = {}
        for s in sites:
            _set_submodule(module, str(s.prod_node.target), s.fused)
            _set_submodule(module, str(s.bn_node.target), nn.Identity())
            names[id(s)] = str(s.prod_node.target)
        return names

    def _apply_rewrite(
        self, gm: fx.GraphModule, sites: list[_Site], calls: Counter, attrs_read
    ) -> dict[int, str]:
        names = {}
        for s in sites:
            target = str(s.prod_node.target)
            if calls[target] == 1 and not attrs_read(target):
                _set_submodule(gm, target, s.fused)
                name = target
            else:  # the producer runs elsewhere too: the folded call gets its own module
                name = _fresh_name(gm, target)
                gm.add_submodule(name, s.fused)
                s.prod_node.target = name
            s.bn_node.replace_all_uses_with(s.prod_node)
            gm.graph.erase_node(s.bn_node)
            names[id(s)] = name
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return names

    # ---- one BN call

    def _check(
        self,
        node: fx.Node,
        bn: nn.Module,
        prefix: str,
        mods: dict[str, nn.Module],
        ranks: dict[str, set[int]],
    ) -> _Site | Skipped:
        """Fold one BN call, or say why not. Handles: BatchNorm{1,2,3}d and SyncBatchNorm with
        running statistics (affine or not), FrozenBatchNorm buffers; producers Conv{1,2,3}d,
        ConvTranspose{1,2,3}d (any groups), Linear; float16/bfloat16/float32/float64 weights."""
        name = prefix + str(node.target)
        kind = _bn_kind(bn)

        def skip(reason: SkipReason, detail: str, producer: str = "", op: str = "") -> Skipped:
            return Skipped(bn=name, reason=reason, detail=detail, producer=producer, producer_op=op)

        if kind == "bn" and (bn.running_mean is None or bn.running_var is None):
            return skip(
                SkipReason.TRAINING_MODE,
                "track_running_stats=False: the BatchNorm normalizes with batch statistics even in eval mode",
            )
        stats = _bn_tensors(bn)
        if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in stats if t is not None):
            return skip(
                SkipReason.NON_CONSTANT_BN_PARAM, "lazy BatchNorm not initialized yet: run it once first"
            )
        if any(t is not None and not t.is_floating_point() for t in stats):
            return skip(SkipReason.UNSUPPORTED_DTYPE, "BatchNorm statistics are not floating point")
        if bn._forward_hooks or bn._forward_pre_hooks:
            return skip(
                SkipReason.NON_CONSTANT_BN_PARAM, "the BatchNorm has forward hooks, which folding would drop"
            )

        if len(node.args) + len(node.kwargs) != 1:
            return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, "the BatchNorm is called with extra arguments")
        src = node.args[0] if node.args else next(iter(node.kwargs.values()))
        if not isinstance(src, fx.Node) or src.op == "placeholder":
            return skip(SkipReason.NO_PRODUCER, "its input is a model input: nothing to absorb it")
        if src.op == "get_attr":
            return skip(SkipReason.NO_PRODUCER, f"its input is the stored tensor {prefix}{src.target}")
        prod = mods.get(str(src.target)) if src.op == "call_module" else None
        base = _producer_base(prod) if prod is not None else None
        if base is None:
            return skip(
                SkipReason.UNSUPPORTED_PRODUCER, f"its input comes from {_describe(src, prod, prefix)}"
            )
        pname, op = prefix + str(src.target), type(prod).__name__

        if len(src.users) > 1:
            others = [u for u in src.users if u is not node]
            what = ", ".join("the model output" if u.op == "output" else u.name for u in others)
            return skip(
                SkipReason.PRODUCER_OUTPUT_SHARED, f"the output of {pname} also feeds {what}", pname, op
            )
        weight = prod._parameters.get("weight")
        if torch.nn.utils.parametrize.is_parametrized(prod) or not isinstance(weight, nn.Parameter):
            return skip(
                SkipReason.NON_CONSTANT_WEIGHT,
                f"{pname}.weight is computed at run time (parametrization or weight_norm)",
                pname,
                op,
            )
        if isinstance(weight, nn.parameter.UninitializedTensorMixin) or weight.is_meta:
            return skip(
                SkipReason.NON_CONSTANT_WEIGHT, f"{pname}.weight holds no values (lazy or meta)", pname, op
            )
        if prod._forward_hooks or prod._forward_pre_hooks:
            return skip(
                SkipReason.NON_CONSTANT_WEIGHT,
                f"{pname} has forward hooks that may change its weight or output at run time",
                pname,
                op,
            )
        if not weight.is_floating_point() or (prod.bias is not None and not prod.bias.is_floating_point()):
            return skip(SkipReason.UNSUPPORTED_DTYPE, f"{pname}.weight has dtype {weight.dtype}", pname, op)
        channels = prod.out_features if base is nn.Linear else prod.out_channels
        if stats[0].numel() != channels:
            return skip(
                SkipReason.SHAPE_MISMATCH,
                f"{pname} has {channels} output channels, the BatchNorm {stats[0].numel()}",
                pname,
                op,
            )
        axis = _axis_problem(prod, base, bn, ranks.get(src.name))
        if axis:
            return skip(SkipReason.CHANNEL_AXIS_MISMATCH, axis, pname, op)
        fused = _fuse(prod, base, stats, float(bn.eps))
        if isinstance(fused, str):
            return skip(SkipReason.NOT_REPRESENTABLE, fused, pname, op)
        return _Site(bn_node=node, prod_node=src, producer=prod, fused=fused)

    # ---- ranks from the example inputs

    def _ranks(self, gm: fx.GraphModule, module: nn.Module, *, is_root: bool) -> dict[str, set[int]]:
        """Rank of every tensor-valued node over the example runs; {} when unknown."""
        if self.args is None:
            return {}
        runs = [(self.args, {})] if is_root else self.calls.get(id(module), [])
        ranks: dict[str, set[int]] = defaultdict(set)
        for args, kwargs in runs:
            values = _bind(module, gm, args, kwargs)
            if values is None:
                return {}
            recorder = _RankRecorder(gm)
            try:
                with torch.no_grad():
                    recorder.run(*values)
            except Exception as exc:  # noqa: BLE001 - ranks are best-effort; the module itself is run below
                if is_root:
                    try:
                        with torch.no_grad():
                            module(*self.args)
                    except Exception as exc2:
                        raise InputError(
                            f"example_inputs: the module fails on them: {_first_line(exc2)}"
                        ) from exc2
                log.debug("ranks unknown: the traced graph of %s fails: %s", type(module).__name__, exc)
                return {}
            for k, v in recorder.ranks.items():
                ranks[k] |= v
        return dict(ranks)


class _RankRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ranks: dict[str, set[int]] = defaultdict(set)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.ranks[n.name].add(out.dim())
        return out


def _bind(module: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any] | None:
    """The positional values of ``gm``'s placeholders for a call ``module(*args, **kwargs)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        sig = inspect.signature(module.forward)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            return None
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return None
    values = list(bound.arguments.values())
    return values if len(values) == len(placeholders) else None


def _entry(bn: str, outcomes: list[_Site | Skipped], names: dict[int, str]) -> Folded | Skipped:
    """One report entry for a BN module from the outcomes of all its calls."""
    sites = [o for o in outcomes if isinstance(o, _Site)]
    skips = [o for o in outcomes if isinstance(o, Skipped)]
    if not skips:
        producers = list(dict.fromkeys(names[id(s)] for s in sites))
        ops = list(dict.fromkeys(type(s.producer).__name__ for s in sites))
        return Folded(bn=bn, producer=", ".join(producers), producer_op=", ".join(ops), output="")
    first = skips[0]
    if len(outcomes) > 1:
        done = f"; folded at {len(sites)} of its {len(outcomes)} calls" if sites else ""
        first = Skipped(
            bn=first.bn,
            reason=first.reason,
            detail=f"{first.detail} (one of {len(outcomes)} calls{done})",
            producer=first.producer,
            producer_op=first.producer_op,
        )
    return first


def _describe(src: fx.Node, mod: nn.Module | None, prefix: str) -> str:
    if src.op == "call_module":
        cls = type(mod).__name__ if mod is not None else "?"
        base = next((b for b in _PRODUCERS if mod is not None and isinstance(mod, b)), None)
        why = f", a {base.__name__} subclass with its own forward" if base is not None else ""
        return f"{prefix}{src.target} ({cls}{why})"
    fn = getattr(src.target, "__name__", str(src.target))
    return f"{fn} ({src.op})"


def _fresh_name(gm: fx.GraphModule, target: str) -> str:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    i, name = 0, leaf + _FOLDED_SUFFIX
    while hasattr(owner, name):
        i += 1
        name = f"{leaf}{_FOLDED_SUFFIX}{i}"
    return f"{parent}.{name}" if parent else name


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, leaf, module)


# --------------------------------------------------------------------------- the axis


def _axis_problem(prod: nn.Module, base: type, bn: nn.Module, out_ranks: set[int] | None) -> str:
    """'' when the BN's axis 1 is provably ``prod``'s output-channel axis, else why not."""
    allowed = next((r for cls, r in _BN_RANKS if isinstance(bn, cls)), None)
    bn_cls = type(bn).__name__
    if base is nn.Linear:
        if out_ranks:
            if out_ranks == {2}:
                return ""
            r = max(out_ranks)
            return (
                f"the Linear's output has rank {r} (input (N, ..., F)): {bn_cls} normalizes axis 1, "
                "not the feature axis"
            )
        if allowed is not None and 2 not in allowed:
            return f"{bn_cls} takes rank {min(allowed)} input, so it normalizes axis 1, not the Linear's feature axis"
        return "rank of the Linear's input is unknown; pass example_inputs"
    batched = len(prod.kernel_size) + 2
    if out_ranks:
        if out_ranks == {batched}:
            return ""
        return (
            f"the {base.__name__} runs on unbatched input (output rank {min(out_ranks)}): {bn_cls} "
            "normalizes axis 1, a spatial axis, not the channel axis"
        )
    if allowed is not None and batched not in allowed:
        return (
            f"{bn_cls} does not accept the batched {base.__name__} output (rank {batched}), so it can only run on "
            "unbatched output, where axis 1 is spatial"
        )
    return ""


# --------------------------------------------------------------------------- the arithmetic


def _bn_tensors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """(running_mean, running_var, gamma or None, beta or None) as stored: the same attribute
    names for BatchNorm (``affine=False`` gives None) and FrozenBatchNorm (buffers)."""
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _fuse(prod: nn.Module, base: type, stats: tuple, eps: float) -> nn.Module | str:
    """A copy of ``prod`` with the BN folded in (float64 math, one rounding), or why not."""
    mean, var, gamma, beta = (_f64(t) for t in stats)
    w, b = _f64(prod.weight), _f64(prod.bias)
    if gamma is None:
        gamma = torch.ones_like(mean)
    if beta is None:
        beta = torch.zeros_like(mean)
    if base is nn.Linear:
        w2, b2 = fuse_linear_bn_weights(w, b, mean, var, eps, gamma, beta)
    elif base in _CONV_T and prod.groups > 1:
        w2, b2 = _fuse_grouped_transpose(w, b, mean, var, eps, gamma, beta, prod.groups)
    else:
        w2, b2 = fuse_conv_bn_weights(w, b, mean, var, eps, gamma, beta, transpose=base in _CONV_T)
    w2, b2 = w2.detach(), b2.detach()
    wdtype = prod.weight.dtype
    bdtype = prod.bias.dtype if prod.bias is not None else wdtype
    new_w, why = _cast_exact(w2, wdtype, _out_channel_rows(w2, base, prod))
    if new_w is None:
        return f"weight: {why}"
    new_b, why = _cast_exact(b2, bdtype, b2.reshape(-1, 1))
    if new_b is None:
        return f"bias: {why}"
    fused = copy.deepcopy(prod)
    device = prod.weight.device
    fused.weight = nn.Parameter(new_w.to(device), requires_grad=prod.weight.requires_grad)
    grad_b = prod.bias.requires_grad if prod.bias is not None else prod.weight.requires_grad
    fused.bias = nn.Parameter(new_b.to(device), requires_grad=grad_b)
    return fused


def _fuse_grouped_transpose(
    w: torch.Tensor, b: torch.Tensor | None, mean, var, eps: float, gamma, beta, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvTranspose weight ``(C_in, C_out/g, k...)``: output channel ``gi * C_out/g + j`` is
    column ``j`` of the rows of group ``gi``."""
    scale = gamma * torch.rsqrt(var + eps)
    c_in, c_out_g = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
    s = scale.reshape(groups, 1, c_out_g, *([1] * (w.dim() - 2)))
    b0 = b if b is not None else torch.zeros_like(mean)
    return (grouped * s).reshape(w.shape), (b0 - mean) * scale + beta


def _out_channel_rows(w: torch.Tensor, base: type, prod: nn.Module) -> torch.Tensor:
    """The weight as (C_out, -1): one row per output channel."""
    if base in _CONV_T:
        g = prod.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        return grouped.permute(0, 2, 1, 3).reshape(g * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _cast_exact(
    v64: torch.Tensor, dtype: torch.dtype, rows64: torch.Tensor
) -> tuple[torch.Tensor | None, str]:
    """Round once to ``dtype``; refuse NaN, overflow, and output channels flushed to all zeros."""
    if torch.isnan(v64).any():
        return None, "the folded values contain NaN"
    out = v64.to(dtype)
    new_inf = torch.isinf(out) & torch.isfinite(v64)
    if new_inf.any():
        worst = float(v64[new_inf].abs().max())
        return None, f"a folded value ({worst:.4g}) overflows {str(dtype).removeprefix('torch.')}"
    rows_out = rows64.to(dtype)
    flushed = (rows64 != 0).any(dim=1) & ~(rows_out != 0).any(dim=1)
    if flushed.any():
        ch = int(torch.nonzero(flushed)[0, 0])
        return None, f"output channel {ch} underflows to zero in {str(dtype).removeprefix('torch.')}"
    return out, ""


# --------------------------------------------------------------------------- export helpers


@dataclass(frozen=True)
class _ExportOptions:
    opset_version: int | None
    input_names: tuple[str, ...] | None
    output_names: tuple[str, ...] | None
    dynamic_shapes: Any
    dynamic_axes: Mapping[str, Any] | None
    dynamo: bool


def _torch_to_onnx(module: nn.Module, args: tuple[Any, ...], f: str, o: _ExportOptions) -> str:
    kw: dict[str, Any] = {
        "opset_version": o.opset_version,
        "input_names": list(o.input_names) if o.input_names is not None else None,
        "output_names": list(o.output_names) if o.output_names is not None else None,
        "dynamic_axes": o.dynamic_axes,
        "dynamo": o.dynamo,
    }
    if o.dynamo:
        kw.update(dynamic_shapes=o.dynamic_shapes, optimize=False)
    else:
        kw.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, f, **kw)
    except Exception as exc:
        raise InputError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    return f


_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress to stdout and log warnings (missing torchvision ops...) to
    stderr; the library never prints, so both are muted for the duration of the export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load(path: str) -> Any:
    try:
        from .io import load_model
    except ImportError:  # pragma: no cover - io.py is written in parallel
        import onnx

        return onnx.load(path)
    return load_model(path)


def _save(model: Any, path: str, *, source_dir: str, external_data: bool | None) -> None:
    try:
        from .io import save_model
    except ImportError:  # pragma: no cover - io.py is written in parallel
        import onnx

        onnx.save(model, path)
        return
    save_model(model, path, source_dir=source_dir, external_data=external_data)


def _torch_vs_onnx(
    model: Any, args: tuple[Any, ...], expected: Any, *, atol: float | None, rtol: float | None
) -> dict[str, Any]:
    """Run ``model`` with onnxruntime (ORT_DISABLE_ALL) on the example inputs and compare each
    output with the torch output, as ``max |ref - out| <= atol + rtol * max|ref|``."""
    import onnxruntime as ort

    from .verify import DEFAULT_RTOL

    tensors = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    refs = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    inputs = [i.name for i in model.graph.input]
    if len(inputs) != len(tensors):
        return {
            "passed": True,
            "compared": False,
            "outputs": {},
            "message": f"not compared: the ONNX model has {len(inputs)} inputs for {len(tensors)} tensors",
        }
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(inputs, tensors)})
    except Exception as exc:  # noqa: BLE001 - reported as a failed comparison
        return {
            "passed": False,
            "compared": False,
            "outputs": {},
            "message": f"onnxruntime cannot run the folded model: {_first_line(exc)}",
        }
    if len(outs) != len(refs):
        return {
            "passed": False,
            "compared": False,
            "outputs": {},
            "message": f"the ONNX model has {len(outs)} outputs, the module {len(refs)}",
        }
    per: dict[str, Any] = {}
    failed = []
    for name, ref_t, out in zip((o.name for o in model.graph.output), refs, outs):
        ref = ref_t.detach().cpu().to(torch.float64).numpy() if ref_t.is_floating_point() else ref_t.numpy()
        got = np.asarray(out, dtype=np.float64) if ref_t.is_floating_point() else np.asarray(out)
        if not ref_t.is_floating_point():
            ok = ref.shape == got.shape and bool(np.array_equal(ref, got))
            per[name] = {
                "max_abs": 0.0 if ok else float("inf"),
                "max_rel": 0.0 if ok else float("inf"),
                "passed": ok,
            }
        else:
            tol_r = (
                rtol if rtol is not None else DEFAULT_RTOL.get(str(ref_t.dtype).removeprefix("torch."), 1e-4)
            )
            tol_a = atol if atol is not None else 0.0
            if ref.shape != got.shape:
                per[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "passed": False}
            else:
                scale = float(np.abs(ref).max()) if ref.size else 0.0
                max_abs = float(np.abs(ref - got).max()) if ref.size else 0.0
                max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
                ok = max_abs <= tol_a + tol_r * scale
                per[name] = {
                    "max_abs": max_abs,
                    "max_rel": max_rel,
                    "rtol": tol_r,
                    "atol": tol_a,
                    "passed": ok,
                }
        if not per[name]["passed"]:
            failed.append(name)
    message = "" if not failed else f"outputs {', '.join(failed)} differ from the torch module's"
    return {"passed": not failed, "compared": True, "outputs": per, "message": message}


# --------------------------------------------------------------------------- small helpers


def _as_args(example_inputs: ExampleInputs | None) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs: expected a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def _copy_module(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.export modules warn about deprecated pytree specs
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
