"""A BatchNorm subclass with its own forward, read as ``rest(batch_norm(x))``.

timm's ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, CSPNet, DenseNet, ...) is a
``BatchNorm2d`` whose forward calls ``F.batch_norm`` on its input with its own statistics, then
``self.drop`` and ``self.act``. Such a module folds like a BatchNorm when its traced forward
proves that shape:

- exactly one ``F.batch_norm``/``torch.batch_norm`` call, on the forward's only input, with the
  module's own ``running_mean``/``running_var``/``weight``/``bias`` and ``training=False``;
- the input is used otherwise only for its metadata (``x.ndim``, ``x.shape``, ``x.size()``...),
  which the fold does not change.

Whatever follows the BN (an activation, dropout, anything else) does not matter to the fold: it
is kept as it is, as a ``torch.fx.GraphModule`` of the rest of the forward that replaces the
module. Anything else is left with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..report import SkipReason
from .messages import first_line
from .paths import metadata_only

_F_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_TORCH_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_BATCH_NORMS = {torch.nn.functional.batch_norm: _F_BATCH_NORM, torch.batch_norm: _TORCH_BATCH_NORM}
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


@dataclass(frozen=True)
class BnForward:
    """The module's forward as ``rest(batch_norm(x, eps))``."""

    eps: float
    rest: nn.Module


def split_forward(bn: nn.Module) -> BnForward | tuple[SkipReason, str]:
    """The BN part and the rest of ``bn``'s own forward, or ``(reason, sentence)``."""
    cls = type(bn).__name__
    # super().forward(x) checks the input's rank in Python, which a symbolic input cannot answer;
    # the rank is checked by the caller (the BN class's accepted ranks) and the BN part is dropped
    own = bn.__dict__.get("_check_input_dim")
    bn._check_input_dim = _any_rank
    try:
        gm = fx.symbolic_trace(bn)
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError...
        return (
            SkipReason.UNTRACEABLE,
            f"torch.fx cannot trace {cls}.forward (its own forward): {first_line(exc)}",
        )
    finally:
        if own is None:
            del bn._check_input_dim
        else:
            bn._check_input_dim = own
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op == "call_function" and n.target in _BATCH_NORMS]
    if len(inputs) != 1 or len(calls) != 1:
        return (
            SkipReason.UNTRACEABLE,
            (
                f"{cls}.forward takes {len(inputs)} inputs and calls batch_norm {len(calls)} times: "
                "only one batch_norm of its one input can be folded"
            ),
        )
    (x,), (call,) = inputs, calls
    args = dict(zip(_BATCH_NORMS[call.target], call.args))
    args.update(call.kwargs)
    problem = _call_problem(bn, x, args) or _input_problem(x, call)
    if problem:
        return problem[0], f"{cls}.forward: {problem[1]}"
    call.replace_all_uses_with(x)
    gm.graph.erase_node(call)
    for node in reversed(nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    rest = fx.GraphModule(gm, gm.graph, f"{cls}AfterBatchNorm")
    return BnForward(eps=float(args.get("eps", _DEFAULTS["eps"])), rest=rest.eval())


def _any_rank(_input: object) -> None:
    return None


def _call_problem(bn: nn.Module, x: fx.Node, args: dict) -> tuple[SkipReason, str] | None:
    if args.get("input") is not x:
        return SkipReason.UNTRACEABLE, "batch_norm does not run on the forward's input"
    if args.get("training", _DEFAULTS["training"]) is not False:
        return SkipReason.TRAINING_MODE, "batch_norm runs with batch statistics (training=True) in eval mode"
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = args.get(name, _DEFAULTS.get(name))
        own = getattr(bn, name, None)
        if value is None and own is None and name in ("weight", "bias"):
            continue
        if not (isinstance(value, fx.Node) and value.op == "get_attr" and value.target == name):
            return SkipReason.NON_CONSTANT_BN_PARAM, f"batch_norm's {name} is not the module's own {name}"
    eps = args.get("eps", _DEFAULTS["eps"])
    if not isinstance(eps, (int, float)):
        return SkipReason.NON_CONSTANT_BN_PARAM, "batch_norm's eps is computed at run time"
    return None


def _input_problem(x: fx.Node, call: fx.Node) -> tuple[SkipReason, str] | None:
    """The input may also be read for its metadata, which folding does not change."""
    for user in x.users:
        if user is not call and not metadata_only(user, x):
            return (
                SkipReason.UNTRACEABLE,
                f"the forward also uses its input in {user.name}, not only the BatchNorm",
            )
    return None
