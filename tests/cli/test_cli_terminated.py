"""SIGTERM's SystemExit(143) is exit 143 even when a C extension turned it into another error
(one arriving while onnxruntime initializes comes back as ``ImportError: initialization failed``)."""

from __future__ import annotations

import pytest

from bnfold.cli.app import _exit_code_of


def _chained(explicit: bool) -> ImportError:
    try:
        try:
            raise SystemExit(143)
        except SystemExit as term:
            if explicit:
                raise ImportError("initialization failed") from term
            raise ImportError("initialization failed")
    except ImportError as exc:
        return exc


@pytest.mark.parametrize("explicit", [True, False])
def test_sigterm_turned_into_import_error_is_exit_143(
    explicit: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code_of(_chained(explicit), debug=False) == 143
    assert "terminated; nothing was written" in capsys.readouterr().err


def test_an_import_error_of_its_own_is_an_internal_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code_of(ImportError("initialization failed"), debug=False) == 3
    assert "internal error" in capsys.readouterr().err
