"""bnfold's speed and memory beside its peers and the I/O limit, measured in one run.

Usage (from the repository root, with the ``bench`` extra installed)::

    python benchmarks/bench.py                      # large-100/250/500 + small zoo models
    python benchmarks/bench.py --huge               # also the 2.5 GB external-data model
    python benchmarks/bench.py --models large-100 --repeat 5 --json out.json
    python benchmarks/bench.py --models "" --pairs 1000,10000,50000   # scaling in node count

Every measured command runs as its own process, started from this script: whole-process wall
time (interpreter start and imports included), its CPU time (user + system, less sensitive to
a loaded machine) and that process's own peak RSS (``os.wait4``).
Runs are interleaved -- repeat 1 runs every tool once, then repeat 2... in a rotating order --
and each run starts after ``os.sync()`` so no tool pays for another's dirty pages. Medians are
reported. Each output is then checked once: BatchNormalization left, nodes, bytes on disk, and
the largest output error against the unfolded model, both run by onnxruntime at
``ORT_DISABLE_ALL`` on the same seeded inputs.

Tools
    cp                      the I/O limit: copy the file(s)
    onnx load+save          ``onnx.save(onnx.load(src), dst)`` (external data kept external)
    onnx load+save+fsync    the same, then ``fsync`` of the output: what bnfold's durable save pays
    bnfold                  ``bnfold SRC -o DST --no-verify`` (the CLI)
    bnfold fold_path        ``bnfold.api.fold_path(src, dst, verify=False)`` in ``python -c``
    onnxoptimizer           ``onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])``
    onnxscript              ``onnxscript.optimizer.optimize`` on an ``onnx_ir`` model
    onnxslim                ``onnxslim.slim(src, dst)``
    onnxsim                 ``onnxsim.simplify(m)``
    ort-basic               onnxruntime ``ORT_ENABLE_BASIC`` with ``optimized_model_filepath``

Plus, once per repeat, two probes that report phases from inside the process: bnfold (import,
lazy load, fold, save, of which fsync) and onnx (load = read + parse, SerializeToString, write,
onnx.save), and one verification run (``bnfold.verify.verify(src, folded)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = (
    "large-100",
    "large-250",
    "large-500",
    "resnet-bottleneck",
    "mobilenetv2",
    "densenet",
    "unet",
)
HUGE_MODEL = "large-2500"
PEERS = ("onnxoptimizer", "onnxscript", "onnxslim", "onnxsim", "ort-basic")
MB = 1e6


# --------------------------------------------------------------------------------------------
# child processes: each tool, as the code a user would run
# --------------------------------------------------------------------------------------------


def _uses_external(path: str) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _onnx_save(model: Any, dst: str, external: bool) -> None:
    import onnx

    if external:
        onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
    else:
        onnx.save(model, dst)


def child_onnx_roundtrip(src: str, dst: str, *, fsync: bool = False) -> dict[str, float]:
    import onnx

    external = os.path.getsize(src) < _source_bytes(src)
    _onnx_save(onnx.load(src), dst, external)
    if fsync:
        for path in (dst, dst + ".data"):
            if os.path.exists(path):
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    return {}


def child_onnxoptimizer(src: str, dst: str) -> dict[str, float]:
    import onnx
    import onnxoptimizer

    external = os.path.getsize(src) < _source_bytes(src)
    model = onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"])
    _onnx_save(model, dst, external)
    return {}


def child_onnxscript(src: str, dst: str) -> dict[str, float]:
    import onnx_ir as ir
    import onnxscript.optimizer

    external = os.path.getsize(src) < _source_bytes(src)
    model = ir.load(src)
    model = onnxscript.optimizer.optimize(model)
    ir.save(model, dst, external_data=os.path.basename(dst) + ".data" if external else None)
    return {}


def child_onnxslim(src: str, dst: str) -> dict[str, float]:
    import onnxslim

    onnxslim.slim(src, dst)
    return {}


def child_onnxsim(src: str, dst: str) -> dict[str, float]:
    import onnx
    import onnxsim

    external = os.path.getsize(src) < _source_bytes(src)
    model, _ = onnxsim.simplify(onnx.load(src), check_n=0)
    _onnx_save(model, dst, external)
    return {}


def child_ort_basic(src: str, dst: str) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    if _source_bytes(src) > 1.5e9:
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", os.path.basename(dst) + ".data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return {}


def child_fold_path(src: str, dst: str) -> dict[str, float]:
    from bnfold.api import fold_path

    fold_path(src, dst, verify=False)
    return {}


def child_bnfold_phases(src: str, dst: str) -> dict[str, float]:
    """bnfold's steps timed from inside: lazy load, fold, save (and the fsync within it)."""
    t0 = time.perf_counter()
    import bnfold.onnx.io as bio
    from bnfold.fold_math import Undecided
    from bnfold.onnx.fold import fold_model

    t_import = time.perf_counter() - t0
    fsync_seconds = 0.0
    real_fsync = os.fsync

    def timed_fsync(fd: int) -> None:
        nonlocal fsync_seconds
        start = time.perf_counter()
        real_fsync(fd)
        fsync_seconds += time.perf_counter() - start

    os.fsync = timed_fsync  # type: ignore[assignment]
    src_dir = os.path.dirname(os.path.abspath(src))
    for optimistic in (True, False):  # what fold_path does: large folds checked where written
        t1 = time.perf_counter()
        model = bio.load_model(src, lazy=True)
        t2 = time.perf_counter()
        try:
            fold_model(model, base_dir=src_dir, exclude=frozenset(), optimistic=optimistic)
            t3 = time.perf_counter()
            bio.save_model(model, dst, source_dir=src_dir)
        except Undecided:
            continue
        t4 = time.perf_counter()
        break
    return {
        "import": t_import,
        "load": t2 - t1,
        "fold": t3 - t2,
        "save": t4 - t3,
        "fsync": fsync_seconds,
        "second_run": float(not optimistic),
    }


def child_onnx_phases(src: str, dst: str) -> dict[str, float]:
    """Where onnx.load + onnx.save spend their time, next to SerializeToString + one write."""
    t0 = time.perf_counter()
    import onnx

    t_import = time.perf_counter() - t0
    if os.path.getsize(src) < _source_bytes(src):
        return {"import": t_import}  # the split below only applies to one-file models
    t1 = time.perf_counter()
    with open(src, "rb") as f:
        data = f.read()
    t2 = time.perf_counter()
    model = onnx.ModelProto()
    model.ParseFromString(data)
    del data
    t3 = time.perf_counter()
    blob = model.SerializeToString()
    t4 = time.perf_counter()
    with open(dst, "wb") as f:
        f.write(blob)
    t5 = time.perf_counter()
    del blob
    os.unlink(dst)
    onnx.save(model, dst)
    t6 = time.perf_counter()
    return {
        "import": t_import,
        "read": t2 - t1,
        "parse": t3 - t2,
        "serialize": t4 - t3,
        "write": t5 - t4,
        "onnx.save": t6 - t5,
    }


def child_verify(src: str, dst: str) -> dict[str, float]:
    from bnfold.verify import verify

    report = verify(src, dst)
    return {"passed": float(report.passed), "verify": report.seconds}


def child_evaluate(src: str, dst: str, samples: str = "2") -> dict[str, Any]:
    """BN left, nodes, bytes of ``dst``; its largest output error against ``src`` at ORT_DISABLE_ALL."""
    import numpy as np
    import onnxruntime as ort

    out: dict[str, Any] = _structure(dst)
    inputs = _inputs(src, int(samples))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ref = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    expected = [ref.run(None, feed) for feed in inputs]
    del ref
    cand = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
    cand_names = [o.name for o in cand.get_outputs()]
    max_abs = max_rel = 0.0
    for feed, exp in zip(inputs, expected):
        got = cand.run(None, feed)
        by_name = dict(zip(cand_names, got))
        for i, name in enumerate(names):
            g = by_name.get(name, got[i] if i < len(got) else None)
            if g is None or g.shape != exp[i].shape:
                out["error"] = f"output {name} missing or of another shape"
                return out
            diff = float(np.max(np.abs(g.astype(np.float64) - exp[i]))) if g.size else 0.0
            scale = float(np.max(np.abs(exp[i]))) if exp[i].size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale else diff)
    out.update(max_abs=max_abs, max_rel=max_rel)
    return out


def child_latency(before: str, after: str, runs: str = "40") -> dict[str, float]:
    """Median latency (ms) of one inference, unfolded and folded, at ORT_DISABLE_ALL and the default level.

    The two models run alternately in one process, so drift on a busy machine hits both alike.
    """
    import onnxruntime as ort

    feed = _inputs(before, 1)[0]
    out = {}
    for label, level in (
        ("disable_all", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ("default", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sessions = {
            "before": ort.InferenceSession(before, so, providers=["CPUExecutionProvider"]),
            "after": ort.InferenceSession(after, so, providers=["CPUExecutionProvider"]),
        }
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(int(runs) + 3):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                if i >= 3:
                    times[key].append(time.perf_counter() - start)
        for key, values in times.items():
            out[f"{key}_{label}"] = statistics.median(values) * 1e3
        del sessions
    return out


def _source_bytes(path: str) -> int:
    """The model file plus the external data files it references."""
    return _structure(path)["bytes"]


def _structure(path: str) -> dict[str, Any]:
    import bnfold.onnx.io as bio

    model = bio.load_model(path, lazy=True)
    nodes = bn = 0
    stack = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        for node in g.node:
            nodes += 1
            bn += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)
    size = os.path.getsize(path)
    seen: set[str] = set()
    for t in model.graph.initializer:
        if bio.is_lazy(t) or t.data_location != 1:
            continue
        location = next(e.value for e in t.external_data if e.key == "location")
        if location not in seen:
            seen.add(location)
            size += os.path.getsize(os.path.join(os.path.dirname(path), location))
    return {"bn": bn, "nodes": nodes, "bytes": size}


def _inputs(path: str, samples: int) -> list[dict[str, Any]]:
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(samples):
        feed = {}
        for value in model.graph.input:
            if value.name in inits:
                continue
            tt = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[value.name] = rng.integers(0, 2, shape).astype(dtype)
        feeds.append(feed)
    return feeds


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "onnx": child_onnx_roundtrip,
    "onnx-fsync": lambda src, dst: child_onnx_roundtrip(src, dst, fsync=True),
    "onnxoptimizer": child_onnxoptimizer,
    "onnxscript": child_onnxscript,
    "onnxslim": child_onnxslim,
    "onnxsim": child_onnxsim,
    "ort-basic": child_ort_basic,
    "fold_path": child_fold_path,
    "bnfold-phases": child_bnfold_phases,
    "onnx-phases": child_onnx_phases,
    "verify": child_verify,
    "evaluate": child_evaluate,
    "latency": child_latency,
}


def child_main(argv: Sequence[str]) -> int:
    name, *args = argv
    sys.path.insert(0, str(ROOT))
    result = CHILDREN[name](*args)
    print("BENCH-RESULT " + json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# running processes
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    max_rss: int
    """Peak resident set of the process, bytes."""
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cpu: float = 0.0
    """User + system CPU seconds of the process (less sensitive to a loaded machine than wall time)."""


_LAUNCHER = """
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(report, "w") as f:
    json.dump({"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "max_rss": usage.ru_maxrss * 1024,
               "code": os.waitstatus_to_exitcode(status)}, f)
"""
"""A small process that starts the measured one and reports its wall time and peak RSS.

A child's ``ru_maxrss`` starts at its parent's resident size (Linux carries the high-water
mark across fork and exec), so the measured command is started from this ~10 MB launcher
(``python -S``), not from the benchmark process itself."""


def run_process(argv: list[str], *, timeout: float, cwd: Path = ROOT) -> Run:
    """Run ``argv``; wall time from spawn to exit and the process's own peak RSS (``wait4``)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        report = os.path.join(tmp, "report.json")
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, report, *argv]
        proc = subprocess.Popen(
            launcher, stdout=out, stderr=err, cwd=cwd, env=_child_env(), start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return Run(timeout, 0, False, error="timeout")
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        try:
            with open(report) as f:
                measured = json.load(f)
        except (OSError, ValueError):
            return Run(0.0, 0, False, error=_last_line(stderr) or "launcher failed")
    detail: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            detail = json.loads(line[len("BENCH-RESULT ") :])
    ok = measured["code"] == 0
    error = "" if ok else _last_line(stderr or stdout) or f"exit {measured['code']}"
    return Run(measured["seconds"], measured["max_rss"], ok, detail, error, measured.get("cpu", 0.0))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONWARNINGS", "ignore")
    # Bytecode is cached as in any installed package (pip compiles site-packages, onnx's included):
    # with PYTHONDONTWRITEBYTECODE a source checkout recompiles bnfold's ~80 modules on every run.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def child_argv(name: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, *args]


def bnfold_cli() -> list[str]:
    exe = Path(sys.executable).with_name("bnfold")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bnfold"]


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    kind: str
    """``baseline``, ``bnfold``, ``peer`` or ``probe`` (phases, not compared)."""
    argv: Callable[[str, str], list[str]]
    evaluate: bool = True


def tools(peers: Sequence[str]) -> list[Tool]:
    def cp(src: str, dst: str) -> list[str]:
        files = [src] + [f for f in _data_files(src)]
        if len(files) == 1:
            return ["cp", src, dst]
        os.makedirs(dst + ".cp", exist_ok=True)
        return ["cp", *files, dst + ".cp"]

    out = [
        Tool("cp", "baseline", cp, evaluate=False),
        Tool("onnx load+save", "baseline", lambda s, d: child_argv("onnx", s, d)),
        Tool("onnx load+save+fsync", "baseline", lambda s, d: child_argv("onnx-fsync", s, d), evaluate=False),
        Tool("bnfold", "bnfold", lambda s, d: [*bnfold_cli(), s, "-o", d, "--no-verify", "--quiet"]),
        Tool("bnfold fold_path", "bnfold", lambda s, d: child_argv("fold_path", s, d), evaluate=False),
        Tool(
            "bnfold verifying", "bnfold", lambda s, d: [*bnfold_cli(), s, "-o", d, "--quiet"], evaluate=False
        ),
        Tool("bnfold phases", "probe", lambda s, d: child_argv("bnfold-phases", s, d), evaluate=False),
        Tool("onnx phases", "probe", lambda s, d: child_argv("onnx-phases", s, d), evaluate=False),
    ]
    for peer in peers:
        out.append(Tool(peer, "peer", lambda s, d, p=peer: child_argv(p, s, d)))
    return out


def _data_files(path: str) -> list[str]:
    import bnfold.onnx.io as bio

    model = bio.load_model(path, lazy=True)
    files: list[str] = []
    for t in model.graph.initializer:
        if bio.is_lazy(t):
            continue
        for e in t.external_data:
            if e.key == "location":
                full = os.path.join(os.path.dirname(path), e.value)
                if full not in files:
                    files.append(full)
    return files


def installed_peers(wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    import importlib.util

    modules = {
        "onnxoptimizer": "onnxoptimizer",
        "onnxscript": "onnxscript",
        "onnxslim": "onnxslim",
        "onnxsim": "onnxsim",
        "ort-basic": "onnxruntime",
    }
    ok, missing = [], {}
    for peer in wanted:
        if importlib.util.find_spec(modules[peer]) is None:
            missing[peer] = f"not installed (pip install {modules[peer]})"
        else:
            ok.append(peer)
    return ok, missing


def _remove_output(dst: str) -> None:
    for path in (dst, dst + ".data", dst + ".1.data"):
        if os.path.isfile(path):
            os.remove(path)
    if os.path.isdir(dst + ".cp"):
        shutil.rmtree(dst + ".cp")


def model_path(name: str) -> str:
    if os.path.exists(name):
        return os.path.abspath(name)
    from models import registry

    return str(registry.build_onnx(name))


def pairs_model(pairs: int, folder: str, *, channels: int = 8, seed: int = 0) -> str:
    """A chain of ``pairs`` Conv(3x3) -> BatchNormalization -> Relu blocks on ``channels``
    channels: a graph whose size is its node count, not its weights (written once, kept)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    path = os.path.join(folder, f"pairs-{pairs}-c{channels}-s{seed}.onnx")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    c = channels
    graph = helper.make_graph(
        [], "pairs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])], []
    )
    x = "x"
    for i in range(pairs):
        w = (rng.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32)
        stats = [
            rng.uniform(0.5, 1.5, c),
            rng.uniform(-0.5, 0.5, c),
            rng.uniform(-0.5, 0.5, c),
            rng.uniform(0.5, 2.0, c),
        ]
        names = [f"conv{i}.w"] + [f"bn{i}.{k}" for k in ("scale", "bias", "mean", "var")]
        graph.initializer.append(numpy_helper.from_array(w, names[0]))
        for name, v in zip(names[1:], stats):
            graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), name))
        graph.node.extend(
            [
                helper.make_node("Conv", [x, names[0]], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", [f"c{i}", *names[1:]], [f"b{i}"], name=f"bn{i}"),
                helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
            ]
        )
        x = f"r{i}"
    graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 8, 8]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
    return path


def bench_pairs(
    counts: Sequence[int], *, workdir: str, timeout: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """bnfold's lazy load, fold and save (timed inside the process, imports excluded) on Conv+BN
    chains of each length: linear in node count means a constant time per pair."""
    cache = str(ROOT / "models" / ".cache")
    os.makedirs(cache, exist_ok=True)
    out = []
    for n in counts:
        src = pairs_model(n, cache)
        dst = os.path.join(workdir, f"pairs-{n}.onnx")
        _remove_output(dst)
        os.sync()
        run = run_process(child_argv("bnfold-phases", src, dst), timeout=timeout)
        _remove_output(dst)
        log(
            f"  pairs-{n}: {run.seconds:.2f} s, cpu {run.cpu:.2f} s, {run.max_rss / MB:.0f} MB"
            + ("" if run.ok else f"  FAILED: {run.error}")
        )
        out.append({"pairs": n, "bytes": os.path.getsize(src), **asdict(run)})
    return out


def pairs_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "",
        "### Scaling in node count: Conv -> BN -> Relu chains (8 channels), no verification",
        "",
        (
            "| Conv+BN pairs | size MB | load s | fold s | save s | load+fold+save µs per pair "
            "| process wall s | process CPU s | peak RSS MB |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ph = r["detail"] if r["ok"] else {}
        work = sum(ph.get(k, 0.0) for k in ("load", "fold", "save"))
        per = f"{work / r['pairs'] * 1e6:.0f}" if ph else "–"
        lines.append(
            f"| {r['pairs']} | {_fmt_size(r['bytes'])} | {_fmt_s(ph.get('load'))} | {_fmt_s(ph.get('fold'))} "
            f"| {_fmt_s(ph.get('save'))} | {per} | {_fmt_s(r['seconds'] if r['ok'] else None)} "
            f"| {_fmt_s(r['cpu'] if r['ok'] else None)} | {_fmt_mb(r['max_rss'] if r['ok'] else None)} |"
        )
    return "\n".join(lines)


def bench_model(
    name: str,
    path: str,
    toolset: list[Tool],
    *,
    repeat: int,
    workdir: str,
    timeout: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    size = _structure(path)["bytes"]
    result: dict[str, Any] = {
        "model": name,
        "path": path,
        "bytes": size,
        "source": _structure(path),
        "tools": {},
    }
    runs: dict[str, list[Run]] = {t.name: [] for t in toolset}
    outputs = {
        t.name: os.path.join(workdir, f"{name}.{t.name.replace(' ', '_').replace('+', '_')}.onnx")
        for t in toolset
    }
    failed: set[str] = set()
    for r in range(repeat):
        order = toolset[r % len(toolset) :] + toolset[: r % len(toolset)]
        for tool in order:
            if tool.name in failed:
                continue
            dst = outputs[tool.name]
            _remove_output(dst)
            os.sync()
            run = run_process(tool.argv(path, dst), timeout=timeout)
            runs[tool.name].append(run)
            log(
                f"  {name} {tool.name} #{r + 1}: {run.seconds:.2f} s, {run.max_rss / MB:.0f} MB"
                + ("" if run.ok else f"  FAILED: {run.error}")
            )
            if not run.ok:
                failed.add(tool.name)
    folded = outputs["bnfold"]
    verify = (
        run_process(child_argv("verify", path, folded), timeout=timeout) if os.path.exists(folded) else None
    )
    if verify is not None:
        log(
            f"  {name} verify: {verify.detail.get('verify', float('nan')):.2f} s ({verify.seconds:.2f} s whole process)"
        )
    for tool in toolset:
        rs = runs[tool.name]
        good = [x for x in rs if x.ok]
        entry: dict[str, Any] = {
            "kind": tool.kind,
            "runs": [asdict(x) for x in rs],
            "ok": bool(good) and len(good) == len(rs),
            "error": next((x.error for x in rs if not x.ok), ""),
        }
        if good:
            entry["seconds"] = statistics.median(x.seconds for x in good)
            entry["max_rss"] = max(x.max_rss for x in good)
            entry["cpu"] = statistics.median(x.cpu for x in good)
            keys = set().union(*(x.detail for x in good))
            entry["phases"] = {k: statistics.median(x.detail[k] for x in good if k in x.detail) for k in keys}
        if tool.evaluate and entry["ok"] and os.path.exists(outputs[tool.name]):
            ev = run_process(child_argv("evaluate", path, outputs[tool.name]), timeout=timeout)
            entry["evaluation"] = ev.detail if ev.ok else {"error": ev.error}
        result["tools"][tool.name] = entry
    if verify is not None:
        result["verify"] = {
            "seconds": verify.detail.get("verify"),
            "process_seconds": verify.seconds,
            "max_rss": verify.max_rss,
            "passed": bool(verify.detail.get("passed")),
            "error": verify.error,
        }
    if os.path.exists(folded):
        latency = run_process(child_argv("latency", path, folded), timeout=timeout)
        result["latency"] = latency.detail if latency.ok else {"error": latency.error}
    else:
        result["latency"] = {}
    for dst in outputs.values():
        _remove_output(dst)
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _fmt_size(n: float) -> str:
    return f"{n / MB:.0f}" if n >= 10 * MB else f"{n / MB:.2f}"


def _fmt_mb(x: float | None) -> str:
    return "–" if x is None else f"{x / MB:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def _seconds(entry: dict[str, Any]) -> float | None:
    return entry.get("seconds") if entry.get("ok") else None


def markdown(
    results: list[dict[str, Any]], machine: dict[str, str], missing: dict[str, str], repeat: int
) -> str:
    lines = [
        (
            f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} RAM, {machine['disk']}; "
            f"Python {machine['python']}, onnx {machine['onnx']}, onnxruntime {machine['onnxruntime']}. "
            f"Medians of {repeat} interleaved runs; times are whole processes (start-up and imports included)."
        ),
        "",
        "### bnfold against the I/O limit",
        "",
        (
            "| model | size MB | cp s | onnx load+save s | bnfold s | bnfold / load+save | bnfold / cp "
            "| bnfold fold_path s | fold only s | bnfold verifying (default) s | / load+save | verify alone s "
            "| peak RSS MB: load+save | bnfold | fold_path | verifying | fold_path RSS / size |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        t = res["tools"]
        rt = _seconds(t["onnx load+save"])
        bn = _seconds(t["bnfold"])
        phases = t["bnfold phases"].get("phases", {})
        rss = t["bnfold fold_path"].get("max_rss")
        checked = t.get("bnfold verifying", {})
        vs = _seconds(checked) if checked else None
        lines.append(
            f"| {res['model']} | {_fmt_size(res['bytes'])} | {_fmt_s(_seconds(t['cp']))} | {_fmt_s(rt)} "
            f"| {_fmt_s(bn)} | {_ratio(bn, rt)} | {_ratio(bn, _seconds(t['cp']))} "
            f"| {_fmt_s(_seconds(t['bnfold fold_path']))} | {_fmt_s(phases.get('fold'))} | {_fmt_s(vs)} "
            f"| {_ratio(vs, rt)} | {_fmt_s((res.get('verify') or {}).get('seconds'))} "
            f"| {_fmt_mb(t['onnx load+save'].get('max_rss'))} | {_fmt_mb(t['bnfold'].get('max_rss'))} "
            f"| {_fmt_mb(rss)} | {_fmt_mb(checked.get('max_rss'))} "
            f"| {_ratio(rss, res['bytes']) if res['bytes'] >= 50 * MB else '–'} |"
        )
    lines += [
        "",
        "### CPU time (user + system, whole process; less sensitive to a loaded machine)",
        "",
        (
            "| model | cp s | onnx load+save s | bnfold s | bnfold / load+save | bnfold / cp | fold_path s "
            "| fold_path / load+save | bnfold verifying s | / load+save |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        t = res["tools"]
        cpu = {k: (v.get("cpu") if v.get("ok") else None) for k, v in t.items()}
        rt, bn, fp = cpu["onnx load+save"], cpu["bnfold"], cpu["bnfold fold_path"]
        vc = cpu.get("bnfold verifying")
        lines.append(
            f"| {res['model']} | {_fmt_s(cpu['cp'])} | {_fmt_s(rt)} | {_fmt_s(bn)} | {_ratio(bn, rt)} "
            f"| {_ratio(bn, cpu['cp'])} | {_fmt_s(fp)} | {_ratio(fp, rt)} | {_fmt_s(vc)} | {_ratio(vc, rt)} |"
        )
    lines += [
        "",
        "### Peers: time (× onnx load+save), BatchNormalization left, largest output error vs the unfolded model at ORT_DISABLE_ALL",
        "",
    ]
    names = (
        [
            n
            for n, e in results[0]["tools"].items()
            if e["kind"] in ("bnfold", "peer") and n not in ("bnfold fold_path", "bnfold verifying")
        ]
        if results
        else []
    )
    lines.append("| model | BN | " + " | ".join(names) + " |")
    lines.append("|---|---:|" + "---|" * len(names))
    for res in results:
        cells = []
        rt = _seconds(res["tools"]["onnx load+save"])
        for n in names:
            e = res["tools"][n]
            if not e.get("ok"):
                cells.append(f"failed: {e.get('error', '')[:60]}")
                continue
            ev = e.get("evaluation", {})
            err = ev.get("max_rel")
            err_s = "–" if err is None else f"{err:.1e}"
            cells.append(
                f"{_fmt_s(e['seconds'])} s ({_ratio(e['seconds'], rt)}), {_fmt_mb(e.get('max_rss'))} MB, "
                f"BN {ev.get('bn', '?')}, err {err_s}"
            )
        lines.append(f"| {res['model']} | {res['source']['bn']} | " + " | ".join(cells) + " |")
    for peer, why in missing.items():
        lines.append(f"\n{peer}: {why}")
    lines += [
        "",
        "### Effect on inference (onnxruntime CPU, median ms per run) and on the file",
        "",
        "| model | ORT_DISABLE_ALL before | after | default level before | after | nodes before → after | MB before → after |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for res in results:
        lat = res["latency"]
        ev = res["tools"]["bnfold"].get("evaluation", {})

        def ms(key: str, lat: dict[str, float] = lat) -> str:
            return f"{lat[key]:.2f}" if key in lat else "–"

        lines.append(
            f"| {res['model']} | {ms('before_disable_all')} | {ms('after_disable_all')} | {ms('before_default')} "
            f"| {ms('after_default')} "
            f"| {res['source']['nodes']} → {ev.get('nodes', '?')} | {_fmt_size(res['bytes'])} → "
            f"{_fmt_size(ev.get('bytes', 0))} |"
        )
    lines += [
        "",
        "### Where the time goes (seconds, inside the process)",
        "",
        (
            "| model | bnfold: import | lazy load | fold | save | of which fsync | onnx: import | read | parse "
            "| SerializeToString | write | onnx.save | load+save+fsync (process) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        bp = res["tools"]["bnfold phases"].get("phases", {})
        op = res["tools"]["onnx phases"].get("phases", {})
        cells = [bp.get(k) for k in ("import", "load", "fold", "save", "fsync")]
        cells += [op.get(k) for k in ("import", "read", "parse", "serialize", "write", "onnx.save")]
        cells.append(_seconds(res["tools"]["onnx load+save+fsync"]))
        lines.append(f"| {res['model']} | " + " | ".join(_fmt_s(c) for c in cells) + " |")
    lines += ["", *targets(results)]
    return "\n".join(lines)


def time_target(size: int, external: bool) -> float:
    """Issue 14's target for ``bnfold --no-verify`` against onnx load+save, by model size."""
    if external and size >= 2000 * MB:
        return 0.7
    return 0.3 if size >= 400 * MB else 0.6


def rss_target(size: int) -> float:
    """Issue 14's peak-memory target: no weight held whole, so 0.15× the model + 60 MB."""
    return 0.15 * size + 60 * MB


def targets(results: list[dict[str, Any]]) -> list[str]:
    out = ["### Targets (issue 14)", ""]
    big = [r for r in results if r["bytes"] >= 100 * MB]
    for r in big:
        t = r["tools"]
        rt = _seconds(t["onnx load+save"])
        cli, lib, cp = _seconds(t["bnfold"]), _seconds(t["bnfold fold_path"]), _seconds(t["cp"])
        if rt and cli:
            peers = [(n, e["seconds"]) for n, e in t.items() if e["kind"] == "peer" and e.get("ok")]
            beaten = all(cli < s for _, s in peers)
            lib_note = f" (library fold_path: {lib / rt:.2f}×)" if lib else ""
            goal = time_target(r["bytes"], bool(_data_files(r["path"])))
            cp_note = ""
            if cp and r["bytes"] >= 400 * MB:
                cp_note = f"; {cli / cp:.1f}× cp (target ≤ 5×: {'met' if cli / cp <= 5 else 'NOT met'})"
            out.append(
                f"- {r['model']}: bnfold {cli / rt:.2f}× onnx load+save{lib_note}, target ≤ {goal}×: "
                f"{'met' if cli / rt <= goal else 'NOT met'}{cp_note}; faster than every peer: "
                f"{'yes' if beaten else 'no'}"
            )
        for tool in ("bnfold", "bnfold fold_path"):
            rss = t[tool].get("max_rss")
            if rss:
                goal_rss = rss_target(r["bytes"])
                out.append(
                    f"- {r['model']}: {tool} peak RSS {rss / MB:.0f} MB (target ≤ 0.15× the model + 60 MB "
                    f"= {goal_rss / MB:.0f} MB: {'met' if rss <= goal_rss else 'NOT met'})"
                )
    sizes = []
    for r in results:
        phases = r["tools"]["bnfold phases"].get("phases", {})
        if r["model"].startswith("large-") and "fold" in phases and "save" in phases:
            sizes.append((r["bytes"], phases["fold"] + phases["save"] - phases.get("fsync", 0.0)))
    if len(sizes) >= 3:
        per_mb = ", ".join(f"{b / MB:.0f} MB: {f / (b / MB) * 1e3:.2f} ms/MB" for b, f in sizes)
        out.append(f"- fold + save (fsync excluded) per MB (linear scaling means a constant): {per_mb}")
    return out


def machine() -> dict[str, str]:
    import onnx
    import onnxruntime

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        memory = "?"
    disk = "?"
    try:
        out = subprocess.run(
            ["df", "-T", str(ROOT)], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        if len(out) > 1:
            disk = out[1].split()[1]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "disk": f"{disk} file system",
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma-separated zoo names or .onnx paths"
    )
    parser.add_argument("--huge", action="store_true", help=f"add {HUGE_MODEL} (2.5 GB, external data; slow)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per tool (median reported)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers, or 'none'")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process before it is killed")
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    parser.add_argument(
        "--pairs", default="", help="comma-separated Conv+BN chain lengths to time (e.g. 1000,10000,50000)"
    )
    parser.add_argument(
        "--from-json", default=None, help="print the report of an earlier --json run and exit"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        if saved["results"]:
            print(markdown(saved["results"], saved["machine"], saved["missing_peers"], args.repeat))
        if saved.get("pairs"):
            print(pairs_markdown(saved["pairs"]))
        return 0

    sys.path.insert(0, str(ROOT))
    names = [n for n in args.models.split(",") if n]
    if args.huge and HUGE_MODEL not in names:
        names.append(HUGE_MODEL)
    wanted = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    peers, missing = installed_peers(wanted)
    toolset = tools(peers)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bnfold-bench-")
    os.makedirs(workdir, exist_ok=True)
    results = []
    pair_rows: list[dict[str, Any]] = []
    try:
        counts = [int(n) for n in args.pairs.split(",") if n]
        if counts:
            log("scaling in node count ...")
            pair_rows = bench_pairs(counts, workdir=workdir, timeout=args.timeout, log=log)
        for name in names:
            log(f"building/locating {name} ...")
            path = model_path(name)
            results.append(
                bench_model(
                    name, path, toolset, repeat=args.repeat, workdir=workdir, timeout=args.timeout, log=log
                )
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    info = machine()
    if results:
        print(markdown(results, info, missing, args.repeat))
    if pair_rows:
        print(pairs_markdown(pair_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "missing_peers": missing, "results": results, "pairs": pair_rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
