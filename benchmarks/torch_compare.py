"""bnfold.fold_module beside torch.fx's fuse: correctness on the zoo, time on deep models.

Prints two markdown tables:

1. every small zoo model: BN folded/left, the largest output error relative to the unfolded
   module's output magnitude, and the time of each tool;
2. scaling: fold_module's CPU time per block on stacks of 100, 400 and 1600 Conv+BN blocks
   (flat, in stages of 10, under an untraceable root, and with a layer-scale parameter read in
   every block). A constant per-block time means linear in module count.

Times are CPU seconds (``time.process_time``, best of ``--repeat``) with one torch thread, so
that other processes on the machine move them less. Run: ``python benchmarks/torch_compare.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnfold.torch import fold_module
from models import registry


def rel_err(ref: object, out: object) -> float:
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return max(
        float((r.double() - o.double()).abs().max() / max(float(r.double().abs().max()), 1e-12))
        for r, o in zip(refs, outs)
    )


def bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def cpu_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def zoo_table(repeat: int) -> None:
    print(
        "| model | BN | bnfold folded / left | bnfold max rel err | bnfold s | fx fuse BN left | fx fuse max rel err | fx fuse s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in registry.names(large=False):
        if registry.get(name).source != "torch":
            continue
        model = registry.build_torch(name).eval()
        x = registry.example_inputs(name)
        with torch.no_grad():
            ref = model(*x)
            folded, report = fold_module(model, example_inputs=x)
            ours = rel_err(ref, folded(*x))
            ours_s = cpu_time(lambda m=model, x=x: fold_module(m, example_inputs=x), repeat)
            try:
                fx = fuse(copy.deepcopy(model))
                theirs, left = f"{rel_err(ref, fx(*x)):.1e}", str(bn_count(fx))
                theirs_s = f"{cpu_time(lambda m=model: fuse(copy.deepcopy(m)), repeat):.3f}"
            except (
                TypeError,
                RuntimeError,
                AttributeError,
                ValueError,
            ) as exc:  # fx fuse raising is a result
                theirs, left, theirs_s = f"fails: {type(exc).__name__}", "-", "-"
        print(
            f"| {name} | {bn_count(model)} | {len(report.folded)} / {len(report.skipped)} | {ours:.1e} "
            f"| {ours_s:.3f} | {left} | {theirs} | {theirs_s} |"
        )


class _Untraceable(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.body(x)


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return x + self.gamma * torch.relu(self.bn(self.conv(x)))


def deep(n: int, kind: str) -> nn.Module:
    if kind == "layer-scale":
        return nn.Sequential(*[_LayerScale() for _ in range(n)]).eval()
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(n)]
    if kind == "flat":
        return nn.Sequential(*blocks).eval()
    stages = nn.Sequential(*[nn.Sequential(*blocks[i : i + 10]) for i in range(0, n, 10)])
    return (_Untraceable(stages) if kind == "untraceable" else stages).eval()


def scaling_table(repeat: int, sizes: tuple[int, ...]) -> None:
    print("| model | " + " | ".join(f"{n} blocks: ms/block" for n in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    x = torch.randn(1, 4, 8, 8)
    for kind in ("flat", "staged", "untraceable", "layer-scale"):
        cells = []
        for n in sizes:
            model = deep(n, kind)
            seconds = cpu_time(lambda m=model: fold_module(m, example_inputs=(x,)), repeat)
            cells.append(f"{seconds / n * 1e3:.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="100,400,1600")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    zoo_table(args.repeat)
    print()
    scaling_table(args.repeat, tuple(int(s) for s in args.sizes.split(",")))


if __name__ == "__main__":
    main()
