#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
# torch is pinned to 2.13.0 by the `torch` extra, which pip takes from the local CPU wheel
# on our machines (no CUDA downloads); see README "Choosing your torch".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[torch,dev,bench]'
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
