"""``bnfold check --junit-xml``: the result as JUnit XML for CI systems, one ``testcase`` per model."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bnfold.cli.console import printable as esc
from bnfold.cli.results import CheckResult, CheckStatus, ModelCheck


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: one ``testcase`` per model, a ``failure`` listing its findings, an ``error``
    when it could not be read. BN left for a reason go to ``system-out``. Names are escaped
    (control characters are not allowed in XML 1.0)."""
    failures = result.count(CheckStatus.FINDINGS)
    errors = result.count(CheckStatus.ERROR)
    attrs = {
        "name": "bnfold check",
        "tests": str(len(result.models)),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
        "time": f"{result.seconds:.3f}",
    }
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(suites, "testsuite", attrs)
    for m in result.models:
        case = ET.SubElement(
            suite, "testcase", {"classname": "bnfold.check", "name": esc(m.path), "time": f"{m.seconds:.3f}"}
        )
        if m.status is CheckStatus.FINDINGS:
            n = len(m.findings)
            message = f"{n} finding{'s' if n != 1 else ''}: {esc(m.findings[0])}"
            fail = ET.SubElement(case, "failure", {"message": message, "type": _failure_type(m)})
            fail.text = "\n".join(esc(f) for f in m.findings)
        elif m.status is CheckStatus.ERROR:
            err = ET.SubElement(
                case, "error", {"message": esc(m.error or ""), "type": m.error_type or "error"}
            )
            err.text = esc(m.error or "")
        if m.report and m.report.skipped:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(esc(f"{s.bn} left ({s.reason.value}): {s.detail}") for s in m.report.skipped)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _failure_type(m: ModelCheck) -> str:
    kinds = []
    if m.bn_foldable:
        kinds.append("foldable-batchnorm")
    if m.verification is not None and not m.verification.passed:
        kinds.append(f"verification-{m.verification.status.value}")
    if not kinds:
        kinds.append("batchnorm-left")
    return ",".join(kinds)
