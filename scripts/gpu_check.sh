#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU and no Rust toolchain: installs the abi3 wheel from dist/
# (and any wheels carried in dist/extra/), runs the GPU tests and benchmarks, and writes
# gpu-report/report.md and report.json (to $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT="${OUT:-gpu-report}"
mkdir -p "$REPORT"
PY="${PYTHON:-python3}"
WHEEL=$(ls dist/autoguide_fast-*.whl | head -1)
$PY -m pip install --no-deps --force-reinstall "$WHEEL" >/dev/null
if ls dist/extra/*.whl >/dev/null 2>&1; then $PY -m pip install --no-deps dist/extra/*.whl >/dev/null; fi
$PY - <<'PYEOF' >"$REPORT/env.txt"
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import cupy; print("cupy", cupy.__version__)
except ImportError:
    print("cupy missing")
PYEOF
set +e
$PY -m pytest tests/test_kernels.py tests/test_sampling.py tests/test_edm2.py -q -p no:cacheprovider \
    --junitxml="$REPORT/tests.xml" >"$REPORT/tests.txt" 2>&1
TESTS=$?
$PY -m pytest benchmarks/test_bench_kernels.py -q -s -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$REPORT/bench.json" >"$REPORT/bench.txt" 2>&1
BENCH=$?
set -e
$PY - "$REPORT" "$TESTS" "$BENCH" <<'PYEOF'
import json, sys, pathlib
out, tests, bench = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = []
if (out / "bench.json").exists():
    for b in json.loads((out / "bench.json").read_text())["benchmarks"]:
        rows.append(dict(name=b["name"], **b.get("extra_info", {})))
report = dict(env=(out / "env.txt").read_text(), tests_exit=tests, bench_exit=bench, benchmarks=rows,
              tests_tail=(out / "tests.txt").read_text()[-2000:])
(out / "report.json").write_text(json.dumps(report, indent=2))
lines = ["# GPU check", "", "```", report["env"].strip(), "```", "", f"tests exit code {tests}, benchmarks exit code {bench}", ""]
lines += ["| benchmark | numbers |", "|---|---|"]
lines += [f"| {r['name']} | " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "name") + " |" for r in rows]
lines += ["", "```", report["tests_tail"], "```"]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
exit $TESTS
