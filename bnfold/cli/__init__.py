"""The ``bnfold`` command line (see :mod:`bnfold.cli.app`): ``main`` is the console script's entry.

app.py        the typer app: routing ``bnfold MODEL`` to ``fold``, help, error mapping, ``main``
options.py    the shared options and their parsing (--shape, --json [PATH])
fold.py       the fold command (ONNX); fold_torch.py its PyTorch path; request.py its checked
              options and outcomes; paths.py where it reads and writes; names.py --exclude/--shape
              names; npz_casts.py --inputs arrays of another dtype
check.py      the check command and the model-checking library; stats.py, junit.py
results.py    the outcomes, exit codes and JSON documents; render.py and tables.py for people
console.py    stdout/stderr, progress, logging, streams; reports.py the JSON report; versions.py
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
