"""Fold BatchNorm into the preceding Conv/ConvTranspose/Linear at the PyTorch module level.

In inference mode a BatchNorm is a per-channel affine map on axis 1 of its input
(``torch.nn.BatchNorm{1,2,3}d``; ``eps`` defaults to 1e-5)::

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta = scale * x + shift

When ``x`` is the output of a layer that is linear in its weight along the output-channel
axis, the map folds into the layer (the arithmetic and its dtype rules: :mod:`bnfold.torch.fuse`;
which calls fold: :mod:`bnfold.torch.site`). Beyond Conv/ConvTranspose/Linear -> BatchNorm:

- BatchNorm subclasses with their own forward that is BN then anything (timm's
  ``BatchNormAct2d``): the BN part folds, the rest of the forward stays (:mod:`~bnfold.torch.bn_forward`);
- a reshape between the layer and the BN that keeps the channel axis (LeViT's
  ``bn(linear(x).flatten(0, 1))``), proven from the example shapes (:mod:`~bnfold.torch.paths`);
- a forward's own ``x @ W + b`` or ``F.linear(x, W, b)``: W and b absorb it (:mod:`~bnfold.torch.params`);
- when nothing before the BN can absorb it, the Linear after it, also through Dropout and a
  flatten (:mod:`~bnfold.torch.forward`).

Every BatchNorm module gets one report entry: folded, or skipped with a reason (one that no
traced graph calls as a module too).

Pairs come from dataflow, never from the order in which modules were registered:

1. ``torch.fx`` traces the module (Conv/ConvTranspose/Linear and every BatchNorm-like module
   are leaves); each BN call is checked by :func:`bnfold.torch.site.check_call`.
2. Where the whole module cannot be traced (data-dependent control flow...), each child that
   contains a BatchNorm is traced on its own, recursively. BatchNorms called directly by an
   untraceable ``forward`` are reported as ``SkipReason.UNTRACEABLE`` with the tracer's message.
   Inside such a child a fold is made only as an in-place swap (the child keeps its class). An
   untraceable ``forward`` that also calls the child's inner Conv or BN directly cannot be seen
   by tracing: with ``example_inputs`` the call counts of one eager run prove it does not (else
   the pair is skipped as UNTRACEABLE); without them it is assumed. :func:`bnfold.torch.export`
   always has example inputs and verifies the result.

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
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import fx, nn

from ..errors import InputError
from ..report import Folded, FoldReport, Skipped, SkipReason
from .messages import first_line, user_code
from .modules import BnIndex, ExampleInputs, as_args, bn_kind, copy_module, trace
from .params import set_tensor
from .site import GraphFacts, Site, check_call, report_entry

__all__ = ["fold_module"]

log = logging.getLogger(__name__)

FOLDED_SUFFIX = "_bnfolded"
MAX_ROUNDS = 4
"""A Linear between two BNs (BN -> Linear -> BN) absorbs one per round; the next round the other."""


def fold_module(
    module: nn.Module, *, example_inputs: ExampleInputs | None = None, inplace: bool = False
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of ``module`` into the Conv/ConvTranspose/Linear before it.

    ``example_inputs`` (a tensor or a tuple of positional arguments) are run once through the
    traced graph to prove the rank of each layer's output; Linear -> BatchNorm1d pairs fold only
    with them (see :mod:`bnfold.torch.site`). ``inplace=False`` works on a deep copy and leaves
    ``module`` untouched; ``inplace=True`` skips the copy: ``module`` is put in eval mode and
    its submodules may be replaced, so use the returned module and not the argument.

    Returns ``(folded, report)``: ``folded`` is in eval mode (the fold is of inference
    behaviour) and is ``module``'s class, or a ``torch.fx.GraphModule`` when a fold needed a
    rewritten forward. ``report`` has one entry per BatchNorm module: folded (``direction``
    backward or forward, ``through`` the reshapes passed), or skipped with a reason.
    ``example_inputs`` also prove the shapes behind reshapes and forward folds.

    Raises InputError when ``module`` is not an ``nn.Module``, is a TorchScript module (use
    :func:`bnfold.torch.export`, which folds those in ONNX), or fails on ``example_inputs``.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise InputError(
            "fold_module: TorchScript modules have no traceable Python forward; "
            "use bnfold.export(...), which folds them in the exported ONNX model"
        )
    if not isinstance(module, nn.Module):
        raise InputError(f"fold_module: expected a torch.nn.Module, got {type(module).__name__}")
    args = as_args(example_inputs)
    model = module if inplace else copy_module(module)
    model.eval()
    index = BnIndex(model)
    if not index.contains_bn(model):
        return model, FoldReport()
    if bn_kind(model):
        detail = "the module is itself a BatchNorm: its input is the model input, nothing absorbs it"
        return model, FoldReport(skipped=(Skipped(bn="", reason=SkipReason.NO_PRODUCER, detail=detail),))
    bns = [(name, m) for name, m in model.named_modules() if bn_kind(m)]
    folded: list[Folded] = []
    for _ in range(MAX_ROUNDS):
        folder = _Folder(model, args, index)
        with user_code("fold_module: the module's code", any_error=False):
            model = folder.run().eval()
        folder.report_uncalled(bns)
        folded += [e for e in folder.entries if isinstance(e, Folded)]
        if not folder.deferred:
            break
        index = BnIndex(model)  # a layer took one of two maps: the next round folds the other
        bns = [(name, m) for name, m in model.named_modules() if bn_kind(m)]
    skipped = tuple(e for e in folder.entries if isinstance(e, Skipped))
    return model, FoldReport(folded=tuple(folded), skipped=skipped)


class _Folder:
    """Walks the module tree: traces what it can, folds, records one report entry per BN."""

    def __init__(self, root: nn.Module, args: tuple[Any, ...] | None, index: BnIndex) -> None:
        self.root = root
        self.args = args
        self.index = index
        self.entries: list[Folded | Skipped] = []
        self.reported: set[int] = set()
        self.path_count = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.tensor_names = Counter(id(t) for _, t in root.named_parameters(remove_duplicate=False))
        self.tensor_names.update(id(t) for _, t in root.named_buffers(remove_duplicate=False))
        self.done: dict[int, nn.Module] = {}
        self.deferred = False
        # Filled by _capture() when the root is untraceable and example inputs exist.
        self.captured = False
        self.call_count: Counter[int] = Counter()
        self.calls: dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]] = defaultdict(list)

    def run(self) -> nn.Module:
        return self._unit(self.root, "", is_root=True)

    def report_uncalled(self, bns: list[tuple[str, nn.Module]]) -> None:
        """An entry for every BN module no traced graph calls as a module: none is left silently."""
        for name, bn in bns:
            if id(bn) in self.reported:
                continue
            self.reported.add(id(bn))
            ran = (
                f", and it ran {self.call_count[id(bn)]} times on the example inputs" if self.captured else ""
            )
            self.entries.append(
                Skipped(
                    bn=name,
                    reason=SkipReason.UNTRACEABLE,
                    detail="the traced forward never calls it as a module (unused, or run through its "
                    f".forward() or F.batch_norm with its tensors){ran}: no producer can be proven",
                )
            )

    # ---- one traceable unit, or its children

    def _unit(self, module: nn.Module, prefix: str, *, is_root: bool) -> nn.Module:
        if id(module) in self.done:
            return self.done[id(module)]
        try:
            gm = trace(module, self.index)
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
        why = f"torch.fx cannot trace {where} ({type(module).__name__}.forward), which calls it: {first_line(exc)}"
        for name, child in module.named_children():
            qual = prefix + name
            if bn_kind(child):
                if id(child) in self.reported:
                    continue
                self.reported.add(id(child))
                note = (
                    " (not called on the example inputs)"
                    if self.captured and not self.call_count[id(child)]
                    else ""
                )
                self.entries.append(Skipped(bn=qual, reason=SkipReason.UNTRACEABLE, detail=why + note))
            elif self.index.contains_bn(child):
                self._unit(child, qual + ".", is_root=False)  # folds by swapping inside child
        return module

    def _capture(self) -> None:
        """Run the model once on the example inputs, recording every module's calls (for the
        shapes inside traceable children, and to tell which BNs are called at all)."""
        assert self.args is not None
        handles = []

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.call_count[id(mod)] += 1
            if self.index.contains_bn(mod):
                self.calls[id(mod)].append((args, kwargs))

        for m in self.root.modules():
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                self.root(*self.args)
        except Exception as exc:
            raise InputError(f"example_inputs: the module fails on them: {first_line(exc)}") from exc
        finally:
            for h in handles:
                h.remove()
        self.captured = True

    # ---- folding inside one traced graph

    def _fold_traced(self, module: nn.Module, gm: fx.GraphModule, prefix: str, *, is_root: bool) -> nn.Module:
        shapes = self._shapes(gm, module, is_root=is_root)
        mods = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        calls = Counter(n.target for n in nodes if n.op == "call_module")
        read = _attr_roots(nodes)

        def swappable(site: Site) -> str:
            """'' when replacing the producer and the BN in place is exact, else why not."""
            p, b = str(site.prod_node.target), str(site.bn_node.target)
            for path, what in ((p, "producer"), (b, "BatchNorm"))[1 if site.params else 0 :]:
                m = mods[path]
                if calls[path] != 1:
                    return f"the {what} {prefix}{path} is called {calls[path]} times"
                if self.path_count[id(m)] != 1:
                    return f"the {what} {prefix}{path} is registered under {self.path_count[id(m)]} names"
                if path in read:
                    return f"the forward reads attributes of the {what} {prefix}{path}"
                if self.captured and not is_root and self.call_count[id(m)] != self.call_count[id(module)]:
                    return f"the {what} {prefix}{path} is also called outside {prefix.rstrip('.')}"
            return ""

        by_bn: dict[str, list[fx.Node]] = {}
        for n in nodes:
            if n.op == "call_module" and bn_kind(mods[str(n.target)]):
                by_bn.setdefault(str(n.target), []).append(n)

        facts = GraphFacts(
            prefix=prefix,
            root=gm,
            mods=mods,
            shapes=shapes,
            reads=Counter(str(n.target) for n in nodes if n.op == "get_attr"),
            tensor_names=self.tensor_names,
            whole_model=is_root,
        )
        plans: list[tuple[str, list[Site | Skipped]]] = []
        for target, bn_nodes in by_bn.items():
            bn = mods[target]
            if id(bn) in self.reported:
                continue
            self.reported.add(id(bn))
            plans.append((target, [check_call(n, bn, facts) for n in bn_nodes]))

        plans = self._one_map_per_layer(plans, prefix)
        sites = [o for _, outcomes in plans for o in outcomes if isinstance(o, Site)]
        blockers = {id(s): swappable(s) for s in sites}
        rewrite = is_root and any(blockers.values())
        if not is_root:  # inside an untraceable parent only exact swaps are allowed
            plans = [(t, [_swap_only(o, blockers, prefix) for o in outcomes]) for t, outcomes in plans]
            sites = [o for _, outcomes in plans for o in outcomes if isinstance(o, Site)]

        names = _apply_rewrite(gm, sites, calls, read) if rewrite else _apply_swaps(module, sites)
        qualified = {k: prefix + v for k, v in names.items()}
        for target, outcomes in plans:
            self.entries.append(report_entry(prefix + target, outcomes, qualified))
        if not sites:
            return module
        return gm.eval() if rewrite else module

    def _one_map_per_layer(
        self, plans: list[tuple[str, list[Site | Skipped]]], prefix: str
    ) -> list[tuple[str, list[Site | Skipped]]]:
        """A layer call absorbs one BN per round, the one before it first (BN -> Linear -> BN):
        each site's folded layer is computed from the original, so a second would undo the first.
        The other is deferred to the next round."""
        sites = [o for _, outcomes in plans for o in outcomes if isinstance(o, Site)]
        taken: dict[fx.Node, Site] = {}
        for site in sorted(sites, key=lambda x: x.direction != "backward"):
            taken.setdefault(site.prod_node, site)
        deferred = {id(s): taken[s.prod_node] for s in sites if taken[s.prod_node] is not s}
        if not deferred:
            return plans
        self.deferred = True

        def defer(o: Site | Skipped) -> Site | Skipped:
            if not isinstance(o, Site) or id(o) not in deferred:
                return o
            other = prefix + str(deferred[id(o)].bn_node.target)
            return Skipped(
                bn=prefix + str(o.bn_node.target),
                reason=SkipReason.UNSUPPORTED_PRODUCER,
                detail=f"{prefix}{o.prod_node.target} absorbs {other} first; one more round folds this one",
                producer=prefix + str(o.prod_node.target),
                producer_op=o.op_name,
            )

        return [(t, [defer(o) for o in outcomes]) for t, outcomes in plans]

    # ---- shapes from the example inputs

    def _shapes(
        self, gm: fx.GraphModule, module: nn.Module, *, is_root: bool
    ) -> dict[str, list[tuple[int, ...]]]:
        """The shape of every tensor-valued node at each of its executions over the example runs,
        in execution order; {} when unknown."""
        if self.args is None:
            return {}
        runs = [(self.args, {})] if is_root else self.calls.get(id(module), [])
        shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
        for args, kwargs in runs:
            values = _bind(module, gm, args, kwargs)
            if values is None:
                return {}
            recorder = _ShapeRecorder(gm)
            try:
                with torch.no_grad():
                    recorder.run(*values)
            except Exception as exc:  # noqa: BLE001 - shapes are best-effort; the module itself is run below
                if is_root:
                    try:
                        with torch.no_grad():
                            module(*self.args)
                    except Exception as exc2:
                        raise InputError(
                            f"example_inputs: the module fails on them: {first_line(exc2)}"
                        ) from exc2
                log.debug("shapes unknown: the traced graph of %s fails: %s", type(module).__name__, exc)
                return {}
            for k, v in recorder.shapes.items():
                shapes[k] += v
        return dict(shapes)


def _swap_only(outcome: Site | Skipped, blockers: dict[int, str], prefix: str) -> Site | Skipped:
    """Inside an untraceable parent a site that needs a rewritten forward is skipped."""
    if not isinstance(outcome, Site) or not blockers[id(outcome)]:
        return outcome
    return Skipped(
        bn=prefix + str(outcome.bn_node.target),
        reason=SkipReason.UNTRACEABLE,
        detail=f"folding needs a rewritten forward ({blockers[id(outcome)]}), but the module "
        f"that calls {prefix.rstrip('.')} cannot be traced",
        producer=prefix + str(outcome.prod_node.target),
        producer_op=outcome.op_name,
    )


def _attr_roots(nodes: list[fx.Node]) -> set[str]:
    """Every module path some ``get_attr`` node reads from (``a.b.weight`` -> ``a``, ``a.b``)."""
    roots: set[str] = set()
    for n in nodes:
        if n.op == "get_attr":
            parts = str(n.target).split(".")
            roots.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return roots


def _set_params(root: nn.Module, site: Site) -> str:
    """Write a written-out layer's folded tensors; its name for the report is its weight's."""
    for target, tensor in site.params:
        set_tensor(root, target, tensor)
    return site.params[0][0]


def _apply_swaps(module: nn.Module, sites: list[Site]) -> dict[int, str]:
    names = {}
    for s in sites:
        if s.params:
            names[id(s)] = _set_params(module, s)
        else:
            _set_submodule(module, str(s.prod_node.target), s.fused)
            names[id(s)] = str(s.prod_node.target)
        _set_submodule(module, str(s.bn_node.target), s.replacement)
    return names


def _apply_rewrite(gm: fx.GraphModule, sites: list[Site], calls: Counter, read: set[str]) -> dict[int, str]:
    def place(node: fx.Node, module: nn.Module) -> str:
        """Put ``module`` where ``node`` calls; a module also called elsewhere keeps its place
        and this call gets ``module`` under a fresh name."""
        target = str(node.target)
        if calls[target] == 1 and target not in read:
            _set_submodule(gm, target, module)
            return target
        name = _fresh_name(gm, target)
        gm.add_submodule(name, module)
        node.target = name
        return name

    names = {}
    for s in sites:
        if s.params:
            names[id(s)] = _set_params(gm, s)
        else:
            names[id(s)] = place(s.prod_node, s.fused)
        if isinstance(s.replacement, nn.Identity):
            s.bn_node.replace_all_uses_with(s.bn_input)
            gm.graph.erase_node(s.bn_node)
        else:  # a custom BN: the rest of its forward stays
            place(s.bn_node, s.replacement)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return names


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name].append(tuple(out.shape))
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


def _fresh_name(gm: fx.GraphModule, target: str) -> str:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    i, name = 0, leaf + FOLDED_SUFFIX
    while hasattr(owner, name):
        i += 1
        name = f"{leaf}{FOLDED_SUFFIX}{i}"
    return f"{parent}.{name}" if parent else name


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, leaf, module)
