"""Recognising the modules the PyTorch pass works with, and tracing with them kept as calls.

- A *BatchNorm* is any ``_BatchNorm`` with the stock forward (BatchNorm{1,2,3}d, their lazy
  forms, SyncBatchNorm), a FrozenBatchNorm (duck-typed: a class name containing
  ``FrozenBatchNorm``, buffers weight/bias/running_mean/running_var and an ``eps``), or a
  ``_BatchNorm`` subclass with its own forward (timm's ``BatchNormAct2d``: its forward is read
  by :mod:`bnfold.torch.bn_forward`). All three are kept as calls when tracing, and each one
  gets a report entry.
- A *producer* is a Conv{1,2,3}d, ConvTranspose{1,2,3}d or Linear that runs the stock forward.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.utils.parametrize
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from ..report import SkipReason

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCERS = (*CONV, *CONV_T, nn.Linear)
BN_RANKS: tuple[tuple[type, frozenset[int]], ...] = (
    (nn.BatchNorm1d, frozenset({2, 3})),
    (nn.LazyBatchNorm1d, frozenset({2, 3})),
    (nn.BatchNorm2d, frozenset({4})),
    (nn.LazyBatchNorm2d, frozenset({4})),
    (nn.BatchNorm3d, frozenset({5})),
    (nn.LazyBatchNorm3d, frozenset({5})),
)
"""Input ranks each BN class accepts (its ``_check_input_dim``); SyncBatchNorm accepts any >= 2."""
FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

ExampleInputs = torch.Tensor | Sequence[Any]


def bn_kind(m: nn.Module) -> str | None:
    """``"bn"`` for a BatchNorm, ``"frozen"`` for a FrozenBatchNorm, ``"custom"`` for a
    ``_BatchNorm`` subclass that overrides ``forward``, else None (see module doc)."""
    if isinstance(m, _BatchNorm):
        return "bn" if type(m).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward) else "custom"
    if "FrozenBatchNorm" in type(m).__name__:
        buffers = m._buffers
        if all(isinstance(buffers.get(k), torch.Tensor) for k in FROZEN_BUFFERS) and isinstance(
            getattr(m, "eps", None), (float, int)
        ):
            return "frozen"
    return None


def producer_base(m: nn.Module) -> type | None:
    """The torch class whose stock forward ``m`` runs (Conv*/ConvTranspose*/Linear), else None."""
    for base in PRODUCERS:
        if isinstance(m, base):
            if type(m).forward is not base.forward:
                return None
            if base in CONV and type(m)._conv_forward is not base._conv_forward:
                return None
            return base
    return None


def weight_problem(prod: nn.Module, pname: str) -> tuple[SkipReason, str] | None:
    """Why the layer's stored weight and bias cannot be rewritten (run-time weights, hooks,
    integer dtypes), or None."""
    weight = prod._parameters.get("weight")
    if torch.nn.utils.parametrize.is_parametrized(prod) or not isinstance(weight, nn.Parameter):
        return (
            SkipReason.NON_CONSTANT_WEIGHT,
            f"{pname}.weight is computed at run time (parametrization or weight_norm)",
        )
    if isinstance(weight, nn.parameter.UninitializedTensorMixin) or weight.is_meta:
        return SkipReason.NON_CONSTANT_WEIGHT, f"{pname}.weight holds no values (lazy or meta)"
    if prod._forward_hooks or prod._forward_pre_hooks:
        return (
            SkipReason.NON_CONSTANT_WEIGHT,
            f"{pname} has forward hooks that may change its weight or output at run time",
        )
    if not weight.is_floating_point() or (prod.bias is not None and not prod.bias.is_floating_point()):
        return SkipReason.UNSUPPORTED_DTYPE, f"{pname}.weight has dtype {weight.dtype}"
    return None


def bn_tensors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """(running_mean, running_var, gamma or None, beta or None) as stored: the same attribute
    names for BatchNorm (``affine=False`` gives None) and FrozenBatchNorm (buffers)."""
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


class BnIndex:
    """Which modules of a tree contain a BatchNorm, computed once (linear in the tree's size)."""

    def __init__(self, root: nn.Module) -> None:
        self._with_bn: set[int] = set()
        self._visit(root, set())

    def _visit(self, m: nn.Module, seen: set[int]) -> bool:
        if id(m) in seen:
            return id(m) in self._with_bn
        seen.add(id(m))
        found = bn_kind(m) is not None
        for child in m.children():
            found = self._visit(child, seen) or found
        if found:
            self._with_bn.add(id(m))
        return found

    def contains_bn(self, m: nn.Module) -> bool:
        return id(m) in self._with_bn


class LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps BatchNorm-like modules and Conv/Linear modules as calls.

    It also finds the name of a parameter or buffer read in a forward (``x * self.gamma``) in a
    dict: ``fx.Tracer.getattr`` searches ``root.named_parameters()`` on every read, which makes
    tracing quadratic in depth for models with a layer scale in every block."""

    def __init__(self, index: BnIndex) -> None:
        super().__init__()
        self.index = index
        self._names: tuple[nn.Module, dict[int, str], dict[int, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if bn_kind(m) or (isinstance(m, PRODUCERS) and not self.index.contains_bn(m)):
            return True  # a Conv/Linear subclass with its own forward stays a call, reported as such
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, torch.Tensor) and not self.param_shapes_constant:
            if self._names is None or self._names[0] is not self.root:
                params = {id(p): n for n, p in self.root.named_parameters()}
                buffers = {id(b): n for n, b in self.root.named_buffers()}
                self._names = (self.root, params, buffers)
            _, params, buffers = self._names
            name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
            if name is None and self.proxy_buffer_attributes:
                name = buffers.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace(module: nn.Module, index: BnIndex) -> fx.GraphModule:
    tracer = LeafTracer(index)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def as_args(example_inputs: ExampleInputs | None) -> tuple[Any, ...] | None:
    """Positional arguments from a tensor or a tuple/list of them; None stays None."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs: expected a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def copy_module(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.export modules warn about deprecated pytree specs
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)
