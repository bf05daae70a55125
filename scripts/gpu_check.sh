#!/usr/bin/env bash
# The GPU check (make gpu-check; docs/gpu-check.md): picks the Python that has torch ($PYTHON, else
# python3, else .venv/bin/python) and hands over to the package scripts/gpu_check/ (python -m
# gpu_check), which installs the wheel from dist/ (built with `make wheel` on the development
# machine) into a temporary folder, runs the stages and writes report.md, report.json and
# gpu_check.log to $OUT (else gpu-report/).
# Without a GPU it stops, and says so, where the GPU stages begin.
# Exit status: 0 passed (or no GPU here), 1 a stage failed, 2 setup error, 130 interrupted.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
report="${OUT:-gpu-report}"

py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in python3 .venv/bin/python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
            py="$candidate"
            break
        fi
    done
    # None has torch: python3 all the same, and the report says what is missing.
    [ -n "$py" ] || py=python3
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    msg="no Python 3.10 or newer at '$py' (set PYTHON=/path/to/python)"
    mkdir -p "$report"
    printf '# autoguide_fast GPU check\n\n**result: setup-error** - %s\n' "$msg" >"$report/report.md"
    printf '{"schema": 1, "result": "setup-error", "message": "%s", "stages": []}\n' "$msg" >"$report/report.json"
    echo "gpu-check: error: $msg" >&2
    exit 2
fi
# -m finds the package through scripts/ on PYTHONPATH. The stages inherit it, behind the wheel's
# folder; the package's own stage processes run from scripts/ and would find it without.
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m gpu_check --report "$report" "$@"
