"""``python -m models``: build the zoo into the cache (or a directory), list it, regenerate the demo.

python -m models list
python -m models build [--large] [--out DIR] [--seed N] [--force] [NAMES...]
python -m models demo [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import onnx

from models import registry


def _size(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _cmd_list(args: argparse.Namespace) -> int:
    for spec in registry.REGISTRY.values():
        shapes = ", ".join(f"{k}{list(v)}" for k, v in spec.inputs.items())
        left = f", {spec.expected_unfoldable} expected to stay" if spec.expected_unfoldable else ""
        print(f"{spec.name:24s} {spec.bn_count:5d} BN{left:24s} {shapes:24s} {spec.description}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    chosen = list(args.names) or registry.names(large=False) + (
        registry.names(large=True) if args.large else []
    )
    for name in chosen:
        registry.get(name)  # unknown names fail before anything is built
    for name in chosen:
        start = time.perf_counter()
        if args.out is not None:
            path = registry.write_onnx(name, Path(args.out) / f"{name}.onnx", seed=args.seed)
        else:
            path = registry.build_onnx(name, seed=args.seed, force=args.force)
        seconds = time.perf_counter() - start
        bn = registry.count_bn(onnx.load(path, load_external_data=False))
        print(f"{name:24s} {path!s:70s} {_human(_size(path)):>10s} {bn:5d} BN {seconds:7.1f}s", flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    path = registry.write_demo(args.out)
    bn = registry.count_bn(onnx.load(path))
    print(f"demo {path} {_human(_size(path))} {bn} BN")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description="bnfold reference model zoo")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="show the registry").set_defaults(func=_cmd_list)

    build = sub.add_parser("build", help="build ONNX files (default: every small model, into models/.cache)")
    build.add_argument("names", nargs="*", metavar="NAME", help="registry names (default: all small models)")
    build.add_argument(
        "--large", action="store_true", help="also build large-100/250/500/2500 (about 3.4 GB)"
    )
    build.add_argument("--out", type=Path, default=None, help="write NAME.onnx here instead of the cache")
    build.add_argument("--seed", type=int, default=0, help="builder seed (default 0)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_cmd_build)

    demo = sub.add_parser("demo", help="regenerate models/demo.onnx deterministically")
    demo.add_argument("--out", type=Path, default=registry.DEMO_PATH, help="default: models/demo.onnx")
    demo.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except registry.ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
