"""One BatchNorm call in a traced graph: the checks that prove it folds, or the reason it does not.

A BN call folds when its input is the output of a Conv/ConvTranspose/Linear call that feeds
nothing else (reads of its shape aside), possibly through a reshape that keeps the channel
axis, or of a forward's own ``x @ W + b``; the BN uses running statistics; and the BN's channel
axis (axis 1) is provably the layer's output-channel axis. When the layer before it refuses,
the Linear after it is tried (:mod:`bnfold.torch.forward`).

The channel axis. ``BatchNorm1d`` on ``Linear`` output normalizes axis 1; that is the feature
axis only for a rank-2 ``(N, F)`` input. On ``(N, L, F)`` it normalizes ``L`` and a fold would
scale features by the wrong statistics (``torch.fx.experimental.optimization.fuse`` does
exactly that when ``L == F``). Linear pairs therefore fold only when the rank is proven by
running ``example_inputs`` through the traced graph; without them they are skipped with
``CHANNEL_AXIS_MISMATCH``. Conv pairs fold without shapes: ``BatchNorm2d``/``3d`` only accept
the batched rank; ``Conv1d`` -> ``BatchNorm1d`` on *unbatched* ``(C, L)`` input would be a
mismatch, which is detected when ``example_inputs`` are given and otherwise assumed away.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..report import Folded, Skipped, SkipReason
from .bn_forward import split_forward
from .forward import check_forward
from .fuse import affine, fuse
from .modules import BN_RANKS, PRODUCERS, bn_kind, bn_tensors, producer_base, weight_problem
from .params import ParamLayer, fold_params, param_layer
from .paths import channel_kept, look_through_op, metadata_only

Shapes = dict[str, list[tuple[int, ...]]]
"""Node name -> the shape of its tensor at each execution on the example inputs (empty: unknown)."""


@dataclass(frozen=True)
class GraphFacts:
    """What the checks of one traced graph need to know about it and the model around it."""

    prefix: str
    """The traced module's qualified name plus ``.`` ("" for the model)."""
    root: nn.Module
    """The traced GraphModule."""
    mods: dict[str, nn.Module]
    shapes: Shapes
    reads: Counter
    """get_attr target -> how many get_attr nodes read it."""
    tensor_names: Counter
    """id(tensor) -> under how many names the whole model registers it."""
    whole_model: bool
    """The graph is the whole model's forward (not a child of an untraceable module)."""


@dataclass(frozen=True)
class Site:
    """One BN call that folds: its node and input node, the absorbing layer's node and module
    (the producer before the BN, or the layer after it for a forward fold), the folded layer,
    what replaces the BN module (``nn.Identity``, or the rest of a custom BN's forward), and the
    ops looked through between them."""

    bn_node: fx.Node
    bn_input: fx.Node
    prod_node: fx.Node
    producer: nn.Module | None
    fused: nn.Module | None
    replacement: nn.Module
    through: tuple[str, ...] = ()
    direction: str = "backward"
    params: tuple[tuple[str, torch.Tensor], ...] = ()
    """For a layer written in the forward (:mod:`bnfold.torch.params`): get_attr target -> new tensor."""
    op: str = ""
    """The absorbing layer's kind for the report (default: the module's class name)."""

    @property
    def op_name(self) -> str:
        return self.op or type(self.producer).__name__


def check_call(node: fx.Node, bn: nn.Module, facts: GraphFacts) -> Site | Skipped:
    """Fold one BN call, or say why not. Handles: BatchNorm{1,2,3}d and SyncBatchNorm with
    running statistics (affine or not), FrozenBatchNorm buffers, BatchNorm subclasses whose
    own forward is BN then anything (:mod:`bnfold.torch.bn_forward`); producers Conv{1,2,3}d,
    ConvTranspose{1,2,3}d (any groups), Linear, also through a reshape that keeps the channel
    axis; when nothing before the BN absorbs it, the Linear after it (:mod:`bnfold.torch.forward`);
    float16/bfloat16/float32/float64 weights."""
    prefix, mods, shapes = facts.prefix, facts.mods, facts.shapes
    name = prefix + str(node.target)

    def skip(reason: SkipReason, detail: str, producer: str = "", op: str = "") -> Skipped:
        return Skipped(bn=name, reason=reason, detail=detail, producer=producer, producer_op=op)

    problem = _bn_problem(bn)
    if problem is not None:
        return skip(*problem)
    eps, replacement = float(bn.eps), nn.Identity()
    if bn_kind(bn) == "custom":
        split = split_forward(bn)
        if isinstance(split, tuple):
            return skip(*split)
        eps, replacement = split.eps, split.rest
    if len(node.args) + len(node.kwargs) != 1:
        return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, "the BatchNorm is called with extra arguments")
    src = node.args[0] if node.args else next(iter(node.kwargs.values()))
    result = _backward(node, bn, src, eps, replacement, skip, facts)
    if (
        isinstance(result, Site)
        or result.reason not in _TRY_FORWARD
        or not isinstance(replacement, nn.Identity)
    ):
        return result
    forward = check_forward(node, bn, eps, prefix=prefix, mods=mods, shapes=shapes)
    if forward is None or not isinstance(src, fx.Node):
        return result
    if isinstance(forward, Skipped):
        return dataclasses.replace(
            result, detail=f"{result.detail}; folding it forward into {forward.producer}: {forward.detail}"
        )
    user, linear, fused, through = forward
    return Site(
        bn_node=node,
        bn_input=src,
        prod_node=user,
        producer=linear,
        fused=fused,
        replacement=replacement,
        through=through,
        direction="forward",
    )


_TRY_FORWARD = frozenset(
    {
        SkipReason.NO_PRODUCER,
        SkipReason.UNSUPPORTED_PRODUCER,
        SkipReason.PRODUCER_OUTPUT_SHARED,
        SkipReason.CHANNEL_AXIS_MISMATCH,
        SkipReason.AXIS_NOT_PRESERVED,
    }
)
"""Refusals of the layer before the BN after which the layer after it is tried."""


def _backward(
    node: fx.Node,
    bn: nn.Module,
    src: object,
    eps: float,
    replacement: nn.Module,
    skip: Callable[..., Skipped],
    facts: GraphFacts,
) -> Site | Skipped:
    """The BN folded into the layer that produces its input ``src``, possibly through a reshape."""
    prefix, mods, shapes = facts.prefix, facts.mods, facts.shapes
    if not isinstance(src, fx.Node) or src.op == "placeholder":
        return skip(SkipReason.NO_PRODUCER, "its input is a model input: nothing to absorb it")
    if src.op == "get_attr":
        return skip(SkipReason.NO_PRODUCER, f"its input is the stored tensor {prefix}{src.target}")
    bn_input, through = src, ()
    look = look_through_op(src)
    if look is not None and _producer_call(src.args[0], mods) is not None:
        bn_input, src, through = src, src.args[0], (look,)
    prod = _producer_call(src, mods)
    layer = param_layer(src) if prod is None else None
    if layer is not None:
        return _into_params(node, bn, layer, eps, replacement, skip, facts)
    if prod is None:
        mod = mods.get(str(src.target)) if src.op == "call_module" else None
        return skip(SkipReason.UNSUPPORTED_PRODUCER, f"its input comes from {_describe(src, mod, prefix)}")
    base = producer_base(prod)
    pname, op = prefix + str(src.target), type(prod).__name__
    reader = bn_input if through else node
    others = [u for u in src.users if u is not reader and not metadata_only(u, src)]
    others += [u for u in bn_input.users if u is not node] if through else []
    if others:
        what = ", ".join("the model output" if u.op == "output" else u.name for u in others)
        return skip(SkipReason.PRODUCER_OUTPUT_SHARED, f"the output of {pname} also feeds {what}", pname, op)
    problem = weight_problem(prod, pname)
    if problem is None and through:
        problem = _path_problem(prod, base, bn, look, shapes.get(src.name), shapes.get(bn_input.name))
    if problem is None:
        problem = _shape_problem(prod, base, bn, pname, ranks_of(shapes, src.name), axis_proven=bool(through))
    if problem is not None:
        return skip(*problem, pname, op)
    fused = fuse(prod, base, affine(bn_tensors(bn), eps))
    if isinstance(fused, str):
        return skip(SkipReason.NOT_REPRESENTABLE, fused, pname, op)
    return Site(
        bn_node=node,
        bn_input=bn_input,
        prod_node=src,
        producer=prod,
        fused=fused,
        replacement=replacement,
        through=through,
    )


def _into_params(
    node: fx.Node,
    bn: nn.Module,
    layer: ParamLayer,
    eps: float,
    replacement: nn.Module,
    skip: Callable[..., Skipped],
    facts: GraphFacts,
) -> Site | Skipped:
    """The BN folded into the tensors of a layer written out in the forward."""
    done = fold_params(
        layer,
        affine(bn_tensors(bn), eps),
        root=facts.root,
        reads=facts.reads,
        names=facts.tensor_names,
        ranks=ranks_of(facts.shapes, layer.out.name),
        whole_model=facts.whole_model,
    )
    pname = facts.prefix + str(layer.weight.target)
    if isinstance(done[0], SkipReason):
        return skip(done[0], done[1], pname, layer.op)
    params, _ = done
    return Site(
        bn_node=node,
        bn_input=layer.out,
        prod_node=layer.out,
        producer=None,
        fused=None,
        replacement=replacement,
        params=params,
        op=layer.op,
    )


def _producer_call(node: object, mods: dict[str, nn.Module]) -> nn.Module | None:
    """The module a ``call_module`` node runs when it is a stock Conv/ConvTranspose/Linear."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = mods.get(str(node.target))
    return mod if mod is not None and producer_base(mod) is not None else None


def _path_problem(
    prod: nn.Module, base: type, bn: nn.Module, look: str, before: list | None, after: list | None
) -> tuple[SkipReason, str] | None:
    """A reshape-like op between the layer and the BN must move the layer's channel axis to the
    BN's axis 1 on every example run (:func:`bnfold.torch.paths.channel_kept`)."""
    if not before or not after or len(before) != len(after):
        return (
            SkipReason.AXIS_NOT_PRESERVED,
            (
                f"the {look} between the {base.__name__} and the BatchNorm keeps the channel axis only for "
                "some shapes; pass example_inputs to prove it"
            ),
        )
    allowed = next((r for cls, r in BN_RANKS if isinstance(bn, cls)), None)
    for s_in, s_out in zip(before, after):
        axis = len(s_in) - 1 if base is nn.Linear else 1
        if not channel_kept(s_in, s_out, axis) or (allowed is not None and len(s_out) not in allowed):
            return (
                SkipReason.AXIS_NOT_PRESERVED,
                (
                    f"the {look} from {list(s_in)} to {list(s_out)} does not put the {base.__name__}'s "
                    f"channel axis {axis} on the BatchNorm's axis 1"
                ),
            )
    return None


def _bn_problem(bn: nn.Module) -> tuple[SkipReason, str] | None:
    if bn_kind(bn) != "frozen" and (bn.running_mean is None or bn.running_var is None):
        return (
            SkipReason.TRAINING_MODE,
            "track_running_stats=False: the BatchNorm normalizes with batch statistics even in eval mode",
        )
    stats = bn_tensors(bn)
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in stats if t is not None):
        return SkipReason.NON_CONSTANT_BN_PARAM, "lazy BatchNorm not initialized yet: run it once first"
    if any(t is not None and not t.is_floating_point() for t in stats):
        return SkipReason.UNSUPPORTED_DTYPE, "BatchNorm statistics are not floating point"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return SkipReason.NON_CONSTANT_BN_PARAM, "the BatchNorm has forward hooks, which folding would drop"
    return None


def _shape_problem(
    prod: nn.Module, base: type, bn: nn.Module, pname: str, out_ranks: set[int] | None, *, axis_proven: bool
) -> tuple[SkipReason, str] | None:
    channels = prod.out_features if base is nn.Linear else prod.out_channels
    if bn.running_mean.numel() != channels:
        return (
            SkipReason.SHAPE_MISMATCH,
            f"{pname} has {channels} output channels, the BatchNorm {bn.running_mean.numel()}",
        )
    axis = "" if axis_proven else axis_problem(prod, base, bn, out_ranks)
    return (SkipReason.CHANNEL_AXIS_MISMATCH, axis) if axis else None


def ranks_of(shapes: Shapes, name: str) -> set[int] | None:
    """The ranks a node's tensor had on the example inputs, or None when unknown."""
    seen = shapes.get(name)
    return {len(shape) for shape in seen} if seen else None


def axis_problem(prod: nn.Module, base: type, bn: nn.Module, out_ranks: set[int] | None) -> str:
    """'' when the BN's axis 1 is provably ``prod``'s output-channel axis, else why not."""
    allowed = next((r for cls, r in BN_RANKS if isinstance(bn, cls)), None)
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


def _describe(src: fx.Node, mod: nn.Module | None, prefix: str) -> str:
    if src.op == "call_module":
        cls = type(mod).__name__ if mod is not None else "?"
        base = next((b for b in PRODUCERS if mod is not None and isinstance(mod, b)), None)
        why = f", a {base.__name__} subclass with its own forward" if base is not None else ""
        return f"{prefix}{src.target} ({cls}{why})"
    fn = getattr(src.target, "__name__", str(src.target))
    return f"{fn} ({src.op})"


def report_entry(bn: str, outcomes: list[Site | Skipped], names: dict[int, str]) -> Folded | Skipped:
    """One report entry for a BN module from the outcomes of all its calls (``names``: the
    module name each folded site's producer ends up under)."""
    sites = [o for o in outcomes if isinstance(o, Site)]
    skips = [o for o in outcomes if isinstance(o, Skipped)]
    if not skips:
        producers = list(dict.fromkeys(names[id(s)] for s in sites))
        ops = list(dict.fromkeys(s.op_name for s in sites))
        through = tuple(dict.fromkeys(op for s in sites for op in s.through))
        direction = ", ".join(dict.fromkeys(s.direction for s in sites))
        return Folded(
            bn=bn,
            producer=", ".join(producers),
            producer_op=", ".join(ops),
            output="",
            direction=direction,
            through=through,
        )
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
