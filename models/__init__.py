"""Reference model zoo for bnfold's tests, docs and benchmarks.

Seeded, deterministic models covering what deployed CNNs contain (see ``REGISTRY``), plus
generated large models for scale. Importing this package builds nothing and does not import
torch; builders import it when called.

    >>> import models
    >>> models.REGISTRY["densenet"].expected_unfoldable
    7
    >>> path = models.build_onnx("resnet-basic")        # cached under models/.cache/

Command line: ``python -m models build [--large] [--out DIR] [NAMES...]``, ``python -m models demo``.
"""

try:
    import numpy  # noqa: F401  (the zoo's own dependencies, checked first for a clear message)
    import onnx  # noqa: F401
except ImportError as _missing:  # e.g. `python3 -m models` with the system Python, outside .venv
    if __import__("sys").argv[:1] == ["-m"]:  # `python -m models`: one line, not a traceback
        raise SystemExit(
            f"models: {_missing.name} is not installed in this Python ({__import__('sys').executable}); "
            "run it from the project's environment: `bash scripts/test.sh` once, then "
            "`.venv/bin/python -m models ...`"
        ) from None
    raise

from models.registry import (
    CACHE_DIR,
    DEMO_PATH,
    REGISTRY,
    ModelSpec,
    ZooError,
    build_onnx,
    build_torch,
    count_bn,
    example_arrays,
    example_inputs,
    export_onnx,
    get,
    names,
    onnx_path,
    write_demo,
    write_onnx,
)

__all__ = [
    "CACHE_DIR",
    "DEMO_PATH",
    "REGISTRY",
    "ModelSpec",
    "ZooError",
    "build_onnx",
    "build_torch",
    "count_bn",
    "example_arrays",
    "example_inputs",
    "export_onnx",
    "get",
    "names",
    "onnx_path",
    "write_demo",
    "write_onnx",
]
