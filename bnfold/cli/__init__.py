"""The ``bnfold`` command line (see :mod:`bnfold.cli.app`): ``main`` is the console script's entry.

app.py        the typer app, routing ``bnfold MODEL`` to ``fold``, error mapping, ``main``
options.py    shared options and their parsing (--shape, --json [PATH])
fold.py       the fold command (ONNX); fold_torch.py its PyTorch path
paths.py      where a fold reads and writes; request.py its checked options and outcomes
check.py      the check command and the model-checking library; stats.py, junit.py
results.py    the outcomes, exit codes and JSON documents; render.py their rich rendering
console.py    stdout/stderr, progress, logging; reports.py the report files
"""

from bnfold.cli.app import app, main
from bnfold.cli.check import check_model, check_models, discover_models
from bnfold.cli.options import normalize_json_args, parse_shape
from bnfold.cli.results import CheckOptions, CheckResult, CheckStatus, FoldOutcome, ModelCheck, ModelStats
from bnfold.cli.stats import model_stats, stats_for_path

__all__ = [
    "CheckOptions",
    "CheckResult",
    "CheckStatus",
    "FoldOutcome",
    "ModelCheck",
    "ModelStats",
    "app",
    "check_model",
    "check_models",
    "discover_models",
    "main",
    "model_stats",
    "normalize_json_args",
    "parse_shape",
    "stats_for_path",
]
