"""bnfold.fold_module beside torch.fx's fuse on every small zoo model.

Prints a markdown table: BN folded/left and the largest output error relative to the
unfolded module's output magnitude. Run: ``python benchmarks/torch_compare.py``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnfold import fold_module
from models import registry


def rel_err(ref: object, out: object) -> float:
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return max(
        float((r.double() - o.double()).abs().max() / max(float(r.double().abs().max()), 1e-12))
        for r, o in zip(refs, outs)
    )


def bn_count(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def main() -> None:
    warnings.filterwarnings("ignore")
    print(
        "| model | BN | bnfold folded / left | bnfold max rel err | fx fuse BN left | fx fuse max rel err |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name in registry.names(large=False):
        model = registry.build_torch(name).eval()
        x = registry.example_inputs(name)
        with torch.no_grad():
            ref = model(*x)
            folded, report = fold_module(model, example_inputs=x)
            ours = rel_err(ref, folded(*x))
            try:
                fx = fuse(copy.deepcopy(model))
                theirs, left = f"{rel_err(ref, fx(*x)):.1e}", str(bn_count(fx))
            except (
                TypeError,
                RuntimeError,
                AttributeError,
                ValueError,
            ) as exc:  # fx fuse raising is a result
                theirs, left = f"fails: {type(exc).__name__}", "-"
        print(
            f"| {name} | {bn_count(model)} | {len(report.folded)} / {len(report.skipped)} | {ours:.1e} "
            f"| {left} | {theirs} |"
        )


if __name__ == "__main__":
    main()
