"""The stages: what each one runs (in a process of its own, see process.py) and how its outcome
is judged. The table and the order are in STAGES; docs/gpu-check.md describes each stage."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .common import PACKAGE_DIR, REQUIRED, ROOT, SetupError, last_line
from .process import Outcome, run_process
from .report import Report, StageResult, fmt, pct, times


@dataclass(frozen=True)
class Stage:
    name: str
    gpu: bool  # needs a CUDA device and CuPy
    limit_s: int  # time limit of the stage's processes
    what: str


STAGES = (
    Stage("install", False, 120, "pip installs the wheel from dist/ into a temporary folder"),
    Stage("environment", False, 120, "versions, imports, the GPU, CuPy against torch, compute-sanitizer"),
    Stage("gpu-tests", True, 240, "pytest tests/test_kernels.py -m gpu"),
    Stage("bench-step", True, 90, "guided step: bandwidth against copy, host overhead per call"),
    Stage("bench-attention", True, 90, "attention at EDM2-S/XS shapes against torch"),
    Stage("bench-e2e", True, 150, "autoguided sampling EDM2-S + XS, batch 32, 32 steps, kernels on/off"),
    Stage("sanitizer-memcheck", True, 120, "compute-sanitizer memcheck over every kernel entry point"),
    Stage("sanitizer-racecheck", True, 120, "compute-sanitizer racecheck over every kernel entry point"),
    Stage("sanitizer-synccheck", True, 90, "compute-sanitizer synccheck over every kernel entry point"),
)


def select(spec: str) -> list[Stage]:
    """The stages named in ``spec`` (comma-separated names or prefixes such as ``sanitizer`` or
    ``bench``), always with install and environment; every stage when ``spec`` is empty."""
    names = [n.strip() for n in spec.split(",") if n.strip()]

    def chosen(stage: Stage, n: str) -> bool:
        return stage.name == n or stage.name.startswith(n + "-")

    unknown = [n for n in names if not any(chosen(s, n) for s in STAGES)]
    if unknown:
        raise SetupError(f"unknown stage {unknown[0]!r} (stages: {', '.join(s.name for s in STAGES)})")
    return [s for s in STAGES if not names or not s.gpu or any(chosen(s, n) for n in names)]


def own_process(python: str, *args: str) -> list[str]:
    """This package as one of the stages' own processes (probe.py, workloads.py); it runs from
    PACKAGE_DIR's parent, where ``-m`` finds the package."""
    return [python, "-m", PACKAGE_DIR.name, *args]


@dataclass
class Context:
    report: Report
    work: Path  # temporary folder: the installed wheel, the helpers' JSON
    env: dict  # environment of the stages' processes
    python: str = sys.executable
    found: dict = field(default_factory=dict)  # what the environment stage found
    gate: str = ""  # why the GPU stages cannot run ("" while they can)
    gate_result: str = ""  # the run's result once the gate closes: no-gpu or fail

    def run(self, cmd: list[str], limit_s: float, *, cwd: Path = ROOT, **extra_env: str) -> Outcome:
        return run_process(cmd, limit_s, self.report.log, dict(self.env, **extra_env), cwd)

    def helper(self, name: str, limit_s: float, **extra_env: str) -> tuple[Outcome, dict | None]:
        """Runs this package's helper ``name`` as a stage process; returns its outcome and JSON."""
        out_json = self.work / f"{name}.json"
        cmd = own_process(self.python, name, "--json", str(out_json))
        out = self.run(cmd, limit_s, cwd=PACKAGE_DIR.parent, **extra_env)
        return out, json.loads(out_json.read_text()) if out_json.exists() else None


# ---------------------------------------------------------------------------------------------
# install and environment: without them nothing else runs (a failure is a setup error)


def wheel_differences(wheel: Path, tree: Path) -> list[str]:
    """Package files whose content differs between the wheel and ``tree`` (python/autoguide_fast),
    or that only one of them has; the compiled Rust module aside (rebuild with `make wheel` after
    Rust changes: they cannot be compared here)."""

    def ours(name: str) -> bool:
        return not name.endswith((".so", ".pyd", ".pyc", "/")) and "__pycache__" not in name

    prefix = "autoguide_fast/"
    with zipfile.ZipFile(wheel) as z:
        packed = {n[len(prefix) :]: z.read(n) for n in z.namelist() if n.startswith(prefix) and ours(n)}
    present = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    present = {name for name in present if ours(name)}
    return sorted(
        name
        for name in packed.keys() | present
        if name not in packed or name not in present or (tree / name).read_bytes() != packed[name]
    )


def run_install(ctx: Context, limit_s: float) -> StageResult:
    wheels = sorted((ROOT / "dist").glob("autoguide_fast-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SetupError(
            "no wheel in dist/ (dist/autoguide_fast-*.whl): build it on the development machine with "
            '`make wheel` and send dist/ along (device tool: carry=["dist"])'
        )
    wheel, extra = wheels[-1], sorted((ROOT / "dist" / "extra").glob("*.whl"))
    stale = wheel_differences(wheel, ROOT / "python" / "autoguide_fast")
    ctx.report.doc["wheel"] = dict(
        name=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        stale=stale,
        older_in_dist=[w.name for w in wheels[:-1]],
        extra=[w.name for w in extra],
    )
    site = ctx.work / "site"
    pip = (
        "-m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --quiet"
    )
    out = ctx.run([ctx.python, *pip.split(), "--target", str(site), str(wheel), *map(str, extra)], limit_s)
    if out.returncode != 0:
        why = "timed out" if out.returncode is None else last_line(out.tail)
        raise SetupError(f"pip could not install {wheel.name} into a temporary folder: {why}")
    ctx.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), ctx.env.get("PYTHONPATH", "")) if p)
    summary = wheel.name + (f" (+{len(extra)} from dist/extra)" if extra else "")
    if not stale:
        return StageResult(
            "install", "pass", out.seconds, summary + "; its Python and CUDA sources match the tree"
        )
    summary += f"; STALE: {len(stale)} files differ from the tree ({', '.join(stale[:4])}): run `make wheel`"
    return StageResult("install", "warn", out.seconds, summary)


def run_environment(ctx: Context, limit_s: float) -> StageResult:
    out, info = ctx.helper("env", limit_s)
    if info is None:
        raise SetupError(f"the environment probe failed: {last_line(out.tail) or 'no output'}")
    mods, warnings = info["modules"], list(info["warnings"])
    missing = [f"{m} ({mods[m]['error']})" for m in REQUIRED if not mods[m]["ok"]]
    if missing:
        raise SetupError(f"required packages missing or broken here: {', '.join(missing)}")
    if not mods["autoguide_fast"]["ok"]:
        raise SetupError(f"the installed wheel does not import: {mods['autoguide_fast']['error']}")
    if not str(mods["autoguide_fast"]["file"]).startswith(str(ctx.work)):
        warnings.append(
            f"autoguide_fast was imported from {mods['autoguide_fast']['file']}, not from the wheel"
        )
    if not info["cuda_available"]:
        ctx.gate, ctx.gate_result = "no CUDA device here (torch.cuda.is_available() is False)", "no-gpu"
    elif not mods["cupy"]["ok"]:
        major = str(info["torch_cuda"] or "13").split(".")[0]
        ctx.gate = (
            f"CuPy does not import ({mods['cupy']['error']}), so no kernel can run: install "
            f"cupy-cuda{major}x or carry its wheel in dist/extra/"
        )
        ctx.gate_result = "fail"
    info["summary"] = machine_summary(info)
    ctx.report.doc["environment"] = ctx.found = info
    summary = "; ".join([info["summary"], *warnings])
    return StageResult(
        "environment", "warn" if warnings else "pass", out.seconds, summary, dict(warnings=warnings)
    )


def machine_summary(info: dict) -> str:
    """One line for the report: the GPU, the driver and the versions that matter."""
    mods, d = info["modules"], info.get("device")
    parts = [
        f"{d['name']} (sm_{d['capability']}, {d['sms']} SMs, {fmt(d['l2_mb'])} MB L2)"
        if d
        else "no CUDA device",
        f"driver {info['driver']}" if info.get("driver") else "",
        f"Python {info['python']}",
        f"torch {mods['torch']['version']}",
        f"CuPy {mods['cupy']['version']} (CUDA {info.get('cupy_cuda_runtime')}, NVRTC {info.get('nvrtc')})"
        if mods["cupy"]["ok"]
        else "no CuPy",
        f"compute-sanitizer {info.get('sanitizer_version')}" if info["sanitizer"] else "no compute-sanitizer",
        "" if mods["pytest"]["ok"] else "no pytest",
    ]
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# The GPU stages


def run_gpu_tests(ctx: Context, limit_s: float) -> StageResult:
    if not ctx.found["modules"]["pytest"]["ok"]:
        return StageResult(
            "gpu-tests", "fail", 0, "pytest is not installed here: carry its wheel in dist/extra/"
        )
    xml = ctx.work / "tests.xml"
    # -o addopts=: pyproject's --benchmark-disable is an error where pytest-benchmark is missing.
    pytest = "-m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -o addopts= -rfEs --tb=short"
    out = ctx.run([ctx.python, *pytest.split(), "--durations=5", f"--junitxml={xml}"], limit_s)
    if out.returncode is None:
        return StageResult(
            "gpu-tests", "timeout", out.seconds, f"stopped at its {limit_s:.0f} s limit", tail=out.tail
        )
    counts, failed = junit_results(xml)
    if not counts:
        return StageResult("gpu-tests", "fail", out.seconds, last_line(out.tail), tail=out.tail)
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if failed:
        summary += "; failed: " + ", ".join(failed[:8])
    status = "pass" if out.returncode == 0 and counts["passed"] else "fail"
    if status == "pass" and counts["skipped"]:
        status, summary = "warn", summary + " (skipped on a GPU machine: reasons in gpu_check.log)"
    return StageResult(
        "gpu-tests", status, out.seconds, summary, dict(counts=counts, failed=failed), out.tail
    )


def junit_results(path: Path) -> tuple[dict, list[str]]:
    """({passed, failed, skipped}, ["test: first line of its message"]) from pytest's JUnit XML."""
    if not path.exists():
        return {}, []
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failed = []
    for case in suite.iter("testcase"):
        bad = next((e for e in case if e.tag in ("failure", "error")), None)
        if bad is not None:
            failed.append(f"{case.get('name')}: {((bad.get('message') or '').splitlines() or [''])[0][:120]}")
    return dict(passed=n - failures - errors - skipped, failed=failures + errors, skipped=skipped), failed


def summary_step(cases: list[dict]) -> tuple[str, bool]:
    bandwidth = [c for c in cases if c["kind"] == "bandwidth"]
    parts = [
        f"{c['dtype']}: Euler {pct(c['euler_of_copy'])}, Heun {pct(c['heun_of_copy'])} of copy "
        f"({c['copy_gb_s']:.0f} GB/s)"
        for c in bandwidth
    ]
    parts += [
        f"{c['dtype']} n={c['n']:,}: kernel {c['euler_graph_us']:.1f} us, host {c['host_public_us']:.1f} us"
        for c in cases
        if c["kind"] == "overhead"
    ]
    missed = [c["dtype"] for c in bandwidth if not c["goal_met"]]
    if missed:
        parts.append(f"bandwidth goal missed for {', '.join(missed)}")
    return "; ".join(parts), bool(missed)


def summary_attention(cases: list[dict]) -> tuple[str, bool]:
    speed = [c["speedup_vs_torch_best"] for c in cases]
    worse = [c for c in cases if not c["fused_rel_err"] <= 2 * c["torch_best_rel_err"] + 1e-6]
    fused, best = (max(c[f"{p}_rel_err"] for c in cases) for p in ("fused", "torch_best"))
    text = f"fused {min(speed):.2f}x to {max(speed):.2f}x torch's best path; "
    text += f"error vs float64 {fused:.1e} (torch {best:.1e})"
    return text + (f"; fused error above 2x torch's at {len(worse)} shapes" if worse else ""), bool(worse)


def summary_e2e(cases: list[dict]) -> tuple[str, bool]:
    c = cases[0]
    text = (
        f"on {c['kernels_on_s']:.2f} s, off {c['kernels_off_s']:.2f} s per batch ({times(c['ratio'])}); "
        f"images differ by {c['max_rel_diff']:.1e} of their largest value"
    )
    return text + ("" if c["finite"] else "; NON-FINITE images"), not c["finite"]


SUMMARIES = {"bench-step": summary_step, "bench-attention": summary_attention, "bench-e2e": summary_e2e}


def run_bench(ctx: Context, limit_s: float, name: str) -> StageResult:
    out, found = ctx.helper(name, limit_s)
    cases = (found or {}).get("cases", [])
    good, errors = [c for c in cases if "error" not in c], [c["error"] for c in cases if "error" in c]
    summary, warn = SUMMARIES[name](good) if good else ("no results", False)
    no_graph = sorted({c["graph_failed"] for c in good if "graph_failed" in c})
    if no_graph:  # those cases were timed eagerly: their "graph" columns hold eager times
        summary, warn = f"{summary}; CUDA-graph capture failed, timed eagerly instead: {no_graph[0]}", True
    if out.returncode is None:
        summary = f"stopped at its {limit_s:.0f} s limit; {summary}"
        return StageResult(name, "timeout", out.seconds, summary, dict(cases=cases), out.tail)
    if out.returncode != 0 or errors:
        summary = "; ".join(errors[:3] or [last_line(out.tail)]) + f"; {summary}"
        return StageResult(name, "fail", out.seconds, summary, dict(cases=cases), out.tail)
    return StageResult(name, "warn" if warn else "pass", out.seconds, summary, dict(cases=cases))


def run_sanitizer(ctx: Context, limit_s: float, name: str) -> StageResult:
    sanitizer = ctx.found["sanitizer"]
    if not sanitizer:
        return StageResult(
            name,
            "skip",
            0,
            "compute-sanitizer is not on this machine (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)",
        )
    # Only this package's kernels are instrumented (torch's are many and slow to check). Outside
    # torch's caching allocator every tensor is an allocation of its own, so a read or write past
    # a tensor's end is one past an allocation's end.
    options = "--error-exitcode 1 --print-limit 20 --kernel-name kns=guided_ --kernel-name kns=mp_attention"
    tool = ["--tool", name.removeprefix("sanitizer-"), *options.split()]
    cmd = [sanitizer, *tool, *own_process(ctx.python, "sanitize")]
    out = ctx.run(cmd, limit_s, cwd=PACKAGE_DIR.parent, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    if out.returncode is None:
        return StageResult(
            name, "timeout", out.seconds, f"stopped at its {limit_s:.0f} s limit", tail=out.tail
        )
    if "Device not supported" in out.tail or "not supported on this platform" in out.tail:
        return StageResult(
            name, "skip", out.seconds, f"compute-sanitizer cannot check this device: {last_line(out.tail)}"
        )
    lines = out.tail.splitlines()
    verdict = next(
        (x.strip("= ") for x in reversed(lines) if "SUMMARY" in x), "no summary from compute-sanitizer"
    )
    workload = next(
        (x for x in reversed(lines) if x.startswith("sanitize workload")), "no word from the workload"
    )
    errors = [int(n) for n in re.findall(r"(\d+) errors?", verdict)]
    ran = re.search(r"(\d+) kernel launches, (\d+) results off", workload)
    ok = out.returncode == 0 and errors and not any(errors) and ran and int(ran[1]) > 0 and int(ran[2]) == 0
    summary = f"{verdict}; {workload.removeprefix('sanitize workload: ')}"
    return StageResult(name, "pass" if ok else "fail", out.seconds, summary, dict(verdict=verdict), out.tail)


RUNNERS = {"install": run_install, "environment": run_environment, "gpu-tests": run_gpu_tests}
RUNNERS |= {
    s.name: (lambda ctx, t, n=s.name: run_bench(ctx, t, n)) for s in STAGES if s.name.startswith("bench-")
}
RUNNERS |= {
    s.name: (lambda ctx, t, n=s.name: run_sanitizer(ctx, t, n)) for s in STAGES if "sanitizer" in s.name
}
