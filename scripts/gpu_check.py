"""The GPU check (``make gpu-check``; docs/gpu-check.md has the stages, the time budget and the
report format). It runs on a machine with an NVIDIA GPU and no Rust and no registry: the wheel
built on the development machine (``make wheel``) comes along in dist/.

    python scripts/gpu_check.py [--report DIR] [--budget SECONDS] [--stages NAME,...]

Stages run one after another, each in its own process group under its own time limit, all within
one budget; the report (DIR, default ``$OUT`` or ``gpu-report``: report.md, report.json,
gpu_check.log) is rewritten after every stage, so a run killed at any point still returns what it
measured. Without a GPU the check stops, and says so, where the GPU stages begin.

Exit status: 0 every selected stage passed (warnings allowed), or there is no GPU here (the report
says so); 1 a stage failed or timed out, or one was not run for lack of time; 2 a setup error (no
wheel, a required package missing, bad arguments); 130 interrupted.

``env``, ``sanitize`` and ``bench-step|bench-attention|bench-e2e`` are the stages' own processes."""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu-check"
DEFAULT_BUDGET_S = 360  # the whole run on one H100/H200, so that a rerun fits in the same lending
MIN_STAGE_S = 20  # no stage is started with less of the budget left
STAGE_LOG_CAP = 1536 << 10  # bytes of one stage's output kept in gpu_check.log (all of them < 16 MiB)
REQUIRED = ("torch", "numpy", "safetensors", "tqdm")  # without these nothing runs
HELPERS = ("env", "sanitize", "bench-step", "bench-attention", "bench-e2e")


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


class SetupError(Exception):
    """A problem with what the check was given (arguments, wheel, packages): exit status 2."""


class Interrupted(BaseException):
    """SIGTERM (a time limit from outside): the report is written, then exit status 130."""


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def write_atomic(path: Path, text: str) -> None:
    """Through a temporary file in the same folder and a rename: a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# One stage's process


@dataclass
class Outcome:
    returncode: int | None  # None: stopped at its time limit
    seconds: float
    tail: str  # the last lines of its output


def run_process(cmd: list[str], limit_s: float, log, env: dict[str, str]) -> Outcome:
    """Runs ``cmd`` in its own process group, its output streamed into ``log`` (up to STAGE_LOG_CAP
    bytes). At ``limit_s`` seconds, or when this process is interrupted, the whole group
    (compute-sanitizer's target too) gets SIGTERM, then SIGKILL."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    # A group of its own inside this session: a run killed from outside takes the stage with it.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **group,
    )
    tail: collections.deque[bytes] = collections.deque(maxlen=400)

    def pump():
        written = 0
        for line in iter(proc.stdout.readline, b""):
            tail.append(line)
            if written < STAGE_LOG_CAP:
                log.write(line.decode(errors="replace"))
                log.flush()
                written += len(line)
                if written >= STAGE_LOG_CAP:
                    log.write(f"[{PROG}: the rest of this stage's output is left out of the log]\n")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    returncode = None
    try:
        returncode = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        log.write(f"[{PROG}: time limit of {limit_s:.0f} s reached: stopping the stage]\n")
    finally:
        kill_group(proc)
        reader.join(timeout=10)
        log.flush()
    return Outcome(returncode, time.monotonic() - start, b"".join(tail).decode(errors="replace"))


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL to what is left 5 s later. Also after a normal
    exit: nothing the stage started may keep the GPU."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class StageResult:
    name: str
    status: str  # pass | warn | fail | timeout | skip
    seconds: float = 0.0
    summary: str = ""
    data: dict = field(default_factory=dict)
    tail: str = ""


class Report:
    """report.json (everything), report.md (for people) and gpu_check.log (every stage's output),
    rewritten after every stage."""

    def __init__(self, folder: Path, budget_s: float, stages: list[Stage]):
        self.folder, self.budget_s, self.start = folder, budget_s, time.monotonic()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.doc: dict = dict(
            schema=1,
            result="running",
            message="",
            started=started,
            budget_s=budget_s,
            elapsed_s=0.0,
            commit=_commit(),
            stages_selected=[s.name for s in stages],
            environment={},
            wheel={},
            stages=[],
        )
        self.log = open(folder / "gpu_check.log", "w", encoding="utf-8")  # closed by run_check

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def add(self, r: StageResult) -> None:
        data = dict(r.data, output_tail=r.tail[-4000:]) if r.status in ("fail", "timeout") else r.data
        entry = dict(name=r.name, status=r.status, seconds=round(r.seconds, 1), summary=r.summary, data=data)
        self.doc["stages"].append(entry)
        self.save()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        write_atomic(self.folder / "report.json", json.dumps(self.doc, indent=1, default=str) + "\n")
        write_atomic(self.folder / "report.md", render_markdown(self.doc))


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def fmt(v) -> str:
    """Three significant digits; big numbers whole, tiny ones in exponent form."""
    if isinstance(v, float):
        if v != 0 and not 1e-2 <= abs(v) < 1e6:
            return f"{v:.2e}"
        return f"{v:.0f}" if abs(v) >= 1e3 else f"{v:.3g}"
    return str(v)


def pct(v: float) -> str:
    return f"{v:.0%}"


def times(v: float) -> str:
    return f"{v:.2f}x"


def pair(a, b) -> str:
    return f"{fmt(a)} / {fmt(b)}"


# Tables of report.md: (stage, case kind, title, [(column, value of a case)]).
TABLES = [
    ("bench-step", "bandwidth", "Guided step bandwidth (graph replay; goal >= 70% of copy)", [
        ("dtype", lambda c: c["dtype"]), ("n", lambda c: f"{c['n']:,}"),
        ("copy GB/s", lambda c: c["copy_gb_s"]),
        ("Euler GB/s", lambda c: c["euler_gb_s"]), ("of copy", lambda c: pct(c["euler_of_copy"])),
        ("Heun GB/s", lambda c: c["heun_gb_s"]), ("of copy", lambda c: pct(c["heun_of_copy"])),
        ("Euler us graph / eager", lambda c: pair(c["euler_us"], c["euler_eager_us"])),
        ("Heun us graph / eager", lambda c: pair(c["heun_us"], c["heun_eager_us"])),
        ("vs torch", lambda c: times(c["speedup_vs_torch"])),
        ("rel diff vs torch", lambda c: c["max_rel_diff_vs_torch"]),
    ]),
    ("bench-step", "overhead", "Guided step per call at a sampler's size (us)", [
        ("dtype", lambda c: c["dtype"]), ("n", lambda c: f"{c['n']:,}"),
        ("Euler kernel (graph)", lambda c: c["euler_graph_us"]),
        ("Euler eager", lambda c: c["euler_eager_us"]),
        ("host: public / op / CuPy launch",
         lambda c: " / ".join(fmt(c[f"host_{k}_us"]) for k in ("public", "op", "launch"))),
        ("torch pair eager / graph", lambda c: pair(c["torch_pair_eager_us"], c["torch_pair_graph_us"])),
    ]),
    ("bench-attention", "attention", "Attention (float16, head dim 64; us graph / eager)", [
        ("N, res, heads", lambda c: f"{c['batch']}, {c['res']}x{c['res']}, {c['heads']}"),
        *((name, lambda c, p=p: pair(c[f"{p}_us"], c[f"{p}_eager_us"])) for name, p in (
            ("fused", "fused"), ("simt", "simt"), ("torch ref", "torch_ref"), ("torch best", "torch_best"))),
        ("vs best", lambda c: times(c["speedup_vs_torch_best"])),
        ("rel err vs float64: fused / simt / ref / best", lambda c: " / ".join(
            f"{c[f'{p}_rel_err']:.1e}" for p in ("fused", "simt", "torch_ref", "torch_best"))),
        ("tensor cores", lambda c: c["tensor_cores"]), ("flash", lambda c: c["flash_eligible"]),
    ]),
    ("bench-e2e", "e2e", "End to end (EDM2-S main, XS guide, float16 U-Nets, non-zero gains)", [
        ("batch", lambda c: c["batch"]), ("steps", lambda c: c["steps"]),
        ("on s", lambda c: c["kernels_on_s"]),
        ("off s", lambda c: c["kernels_off_s"]), ("off / on", lambda c: times(c["ratio"])),
        ("max abs diff", lambda c: c["max_abs_diff"]), ("of image max", lambda c: c["max_rel_diff"]),
        ("finite", lambda c: c["finite"]),
    ]),
]  # fmt: skip


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = [[fmt(v).replace("|", "/").replace("\n", " ") for v in row] for row in rows]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


def render_markdown(doc: dict) -> str:
    env, wheel = doc["environment"], doc["wheel"]
    lines = ["# autoguide_fast GPU check", "", f"**result: {doc['result']}** - {doc['message']}", ""]
    if env.get("summary"):
        lines.append(f"- machine: {env['summary']}")
    if wheel.get("name"):
        stale = wheel["stale"]
        state = f"STALE, differs from the tree in {', '.join(stale)}" if stale else "matches the tree"
        lines.append(f"- wheel: {wheel['name']} ({state})")
    run = f"{doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget"
    lines.append(f"- commit {doc['commit']}, started {doc['started']}, {run}")
    lines += [
        "",
        *table(
            ["stage", "status", "s", "summary"],
            [[s["name"], s["status"], s["seconds"], s["summary"]] for s in doc["stages"]],
        ),
    ]
    cases = {s["name"]: s["data"].get("cases", []) for s in doc["stages"]}
    for stage, kind, title, columns in TABLES:
        rows = [c for c in cases.get(stage, []) if c.get("kind") == kind and "error" not in c]
        if rows:
            try:
                body = table([h for h, _ in columns], [[f(c) for _, f in columns] for c in rows])
            except (KeyError, TypeError, ValueError) as e:  # report.json has the numbers all the same
                body = [f"(no table: {type(e).__name__}: {e}; the numbers are in report.json)"]
            lines += ["", f"## {title}", "", *body]
    for s in doc["stages"]:
        if "output_tail" in s["data"]:
            tail = "\n".join(s["data"]["output_tail"].splitlines()[-25:])
            lines += [
                "",
                f"## {s['name']}: {s['status']} (the end of its output; all of it in gpu_check.log)",
                "",
                "```",
                tail,
                "```",
            ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stages


@dataclass
class Context:
    report: Report
    work: Path  # temporary folder: the installed wheel, the helpers' JSON
    env: dict  # environment of the stages' processes
    python: str = sys.executable
    found: dict = field(default_factory=dict)  # what the environment stage found
    gate: str = ""  # why the GPU stages cannot run ("" while they can)
    gate_result: str = ""  # the run's result once the gate closes: no-gpu or fail

    def run(self, cmd: list[str], limit_s: float, **extra_env: str) -> Outcome:
        return run_process(cmd, limit_s, self.report.log, dict(self.env, **extra_env))

    def helper(self, name: str, limit_s: float, **extra_env: str) -> tuple[Outcome, dict | None]:
        """Runs this script's helper ``name`` as a stage process; returns its outcome and JSON."""
        out_json = self.work / f"{name}.json"
        out = self.run([self.python, __file__, name, "--json", str(out_json)], limit_s, **extra_env)
        return out, json.loads(out_json.read_text()) if out_json.exists() else None


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
    d = info.get("device")
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
    info["summary"] = ", ".join(p for p in parts if p)
    ctx.report.doc["environment"] = ctx.found = info
    summary = "; ".join([info["summary"], *warnings])
    return StageResult(
        "environment", "warn" if warnings else "pass", out.seconds, summary, dict(warnings=warnings)
    )


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
    import xml.etree.ElementTree as ET

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


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    homes = [os.environ.get(k, "") for k in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    candidates = [Path(h) / "bin" / "compute-sanitizer" for h in homes if h]
    candidates += sorted(Path("/usr/local").glob("cuda-*/bin/compute-sanitizer"), reverse=True)
    return found or next((str(p) for p in candidates if os.access(p, os.X_OK)), None)


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
    cmd = [
        sanitizer,
        "--tool",
        name.removeprefix("sanitizer-"),
        *options.split(),
        ctx.python,
        __file__,
        "sanitize",
    ]
    out = ctx.run(cmd, limit_s, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
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


def run_check(report_dir: Path, budget_s: float, stages: list[Stage]) -> int:
    report_dir.mkdir(parents=True, exist_ok=True)
    for tmp in report_dir.glob(".*.tmp"):  # left by a run killed while writing
        tmp.unlink(missing_ok=True)
    report = Report(report_dir, budget_s, stages)
    work = Path(tempfile.mkdtemp(prefix="autoguide-gpu-check-"))
    env = {k: v for k, v in os.environ.items() if k != "AUTOGUIDE_KERNELS"}
    # CuPy's compiled kernels, kept for the stages and for a rerun on the same machine (keyed by the
    # source, so never stale), wherever $HOME is.
    env.setdefault("CUPY_CACHE_DIR", str(Path(tempfile.gettempdir()) / "autoguide-gpu-check-cupy"))
    ctx = Context(report, work, dict(env, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1"))
    status = 0
    try:
        report.save()
        for i, stage in enumerate(stages, 1):
            left = budget_s - report.elapsed()
            if stage.gpu and ctx.gate:
                report.add(StageResult(stage.name, "skip", summary=f"not run: {ctx.gate}"))
                continue
            if left < MIN_STAGE_S:
                report.add(
                    StageResult(stage.name, "skip", summary=f"not run: the {budget_s:.0f} s budget is spent")
                )
                continue
            limit = min(stage.limit_s, left)
            say(f"[{i}/{len(stages)}] {stage.name}: {stage.what} (at most {limit:.0f} s)")
            report.log.write(
                f"\n===== {stage.name} (at most {limit:.0f} s, {report.elapsed():.0f} s into the run)\n"
            )
            started = time.monotonic()
            try:
                result = RUNNERS[stage.name](ctx, limit)
            except SetupError as e:
                report.add(StageResult(stage.name, "fail", time.monotonic() - started, str(e)))
                raise
            except Exception as e:  # a bug of this script's must not cost the other stages
                trace = traceback.format_exc()
                report.log.write(trace)
                why = f"gpu_check.py failed in this stage: {type(e).__name__}: {e}"
                result = StageResult(stage.name, "fail", time.monotonic() - started, why, tail=trace)
            report.add(result)
            say(f"    {result.status} in {result.seconds:.1f} s: {result.summary}")
        bad = [
            f"{s['name']} {s['status']}" for s in report.doc["stages"] if s["status"] in ("fail", "timeout")
        ]
        unrun = [s["name"] for s in report.doc["stages"] if "budget is spent" in s["summary"]]
        if ctx.gate_result == "no-gpu":
            verdict = "no-gpu"
            message = f"{ctx.gate}: stopped before the GPU stages; " + (
                "; ".join(bad) if bad else "the rest passed"
            )
        elif bad or ctx.gate or unrun:
            verdict = "fail"
            message = "; ".join(
                [
                    *bad,
                    *([ctx.gate] if ctx.gate else []),
                    *([f"not run for lack of time: {', '.join(unrun)}"] if unrun else []),
                ]
            )
        else:
            warned = any(s["status"] == "warn" for s in report.doc["stages"])
            verdict, message = "pass", "every selected stage passed" + (" (with warnings)" if warned else "")
        status = 1 if verdict == "fail" or bad else 0
        report.doc.update(result=verdict, message=message)
    except SetupError as e:
        report.doc.update(result="setup-error", message=str(e))
        status = 2
    except (Interrupted, KeyboardInterrupt):
        report.doc.update(
            result="interrupted", message="interrupted; the report holds the stages that finished"
        )
        status = 130
    finally:
        report.save()
        report.log.close()
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + (report_dir / "report.md").read_text(), flush=True)
    say(f"{report.doc['result']}: {report.doc['message']} (report in {report_dir}/)")
    if status == 2:
        print(f"{PROG}: error: {report.doc['message']}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------------
# The stages' own processes


def env_main(out: Path) -> int:
    """What the report needs to know about this machine, as JSON; never fails on what it finds."""
    info: dict = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform())
    modules = {}
    for name in (*REQUIRED, "cupy", "pytest", "pytest_benchmark", "cuda.bindings", "autoguide_fast"):
        try:
            mod = importlib.import_module(name)
            modules[name] = dict(
                ok=True, version=getattr(mod, "__version__", None), file=getattr(mod, "__file__", None)
            )
        except Exception as e:  # whatever breaks the import is what the report needs
            modules[name] = dict(
                ok=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            )
    info.update(modules=modules, cuda_available=False, torch_cuda=None, warnings=[])
    names = {d.metadata["Name"] or "" for d in importlib.metadata.distributions()}
    info["cupy_distributions"] = sorted(n for n in names if n.lower().startswith("cupy"))
    if len(info["cupy_distributions"]) > 1:
        info["warnings"].append(
            f"several CuPy builds installed, which overwrite each other: {info['cupy_distributions']}"
        )
    if modules["torch"]["ok"]:
        import torch

        info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if info["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            info["device"] = dict(
                name=p.name,
                capability=f"{p.major}{p.minor}",
                sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
                l2_mb=getattr(p, "L2_cache_size", 0) / 1e6,
                count=torch.cuda.device_count(),
            )
    if modules["cupy"]["ok"] and info["cuda_available"]:
        try:
            import cupy

            runtime = cupy.cuda.runtime.runtimeGetVersion()
            info["cupy_cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
            info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
            if str(info["torch_cuda"]).split(".")[0] != str(runtime // 1000):
                info["warnings"].append(
                    f"CuPy is built for CUDA {runtime // 1000}, torch for {info['torch_cuda']}"
                )
        except Exception as e:  # a CuPy that imports but cannot reach CUDA is reported, not raised
            info["warnings"].append(f"CuPy cannot reach CUDA: {type(e).__name__}: {e}"[:300])
    smi = shutil.which("nvidia-smi")
    if smi:
        query = (
            "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,memory.used"
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            got = subprocess.run(
                [smi, f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            info["nvidia_smi"] = dict(
                zip(query.split(","), (v.strip() for v in got.split("\n")[0].split(",")))
            )
            info["driver"] = info["nvidia_smi"].get("driver_version")
    info["sanitizer"] = find_sanitizer()
    if info["sanitizer"]:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            got = subprocess.run(
                [info["sanitizer"], "--version"], capture_output=True, text=True, timeout=60
            ).stdout
            info["sanitizer_version"] = (re.findall(r"Version (\S+)", got) or [last_line(got)])[-1]
    write_atomic(out, json.dumps(info, indent=1, default=str) + "\n")
    print(json.dumps(info, indent=1, default=str))
    return 0


def sanitize_main() -> int:
    """Calls every kernel entry point (each dtype, with a guide and without, each head dim, tensor
    cores and not) on odd sizes and on views one element into their allocation (not 16-byte
    aligned), every tensor ending where its allocation ends; checks the results against the torch
    reference loosely (the tests check them precisely)."""
    import torch

    from autoguide_fast.kernels import cuda, reference

    if not (torch.cuda.is_available() and cuda.available()):
        print("sanitize workload: needs a CUDA device and CuPy")
        return 2
    g = torch.Generator().manual_seed(0)

    def exact(n: int, dtype: torch.dtype, offset: int) -> torch.Tensor:
        # One allocation of n + offset elements (PYTORCH_NO_CUDA_MEMORY_CACHING=1), from `offset` on.
        return (torch.randn(n + offset, generator=g) * 2).to("cuda", dtype)[offset:]

    launches, off = 0, []

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        if not err <= 0.05 * float(want.double().abs().max()) + 1e-3:  # NaN fails too
            off.append(f"{what}: error {err:.3g}")

    def f32(t):
        return None if t is None else t.float()

    w, t_hat, t_next = 2.5, 3.0, 2.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 7, 33, 4099):
            for offset in (0, 1):
                for guided in (True, False):
                    x, m, m2 = (exact(n, dtype, offset) for _ in range(3))
                    gd = exact(n, dtype, offset) if guided else None
                    xn, d = cuda.guided_euler(x, m, gd, w, t_hat, t_next)
                    out = cuda.guided_heun(x, xn, d, m2, gd, w, t_hat, t_next)
                    launches += 2
                    what = f"guided step {dtype} n={n} offset={offset} guided={guided}"
                    ref_xn, ref_d = reference.guided_euler(f32(x), f32(m), f32(gd), w, t_hat, t_next)
                    check(f"{what} x_next", xn, ref_xn)
                    check(f"{what} slope", d, ref_d)
                    check(
                        f"{what} Heun",
                        out,
                        reference.guided_heun(f32(x), f32(xn), d, f32(m2), f32(gd), w, t_hat, t_next),
                    )
    kinds = [
        (torch.float32, False),
        (torch.float16, False),
        (torch.bfloat16, False),
        (torch.float16, True),
        (torch.bfloat16, True),
    ]
    for dtype, tensor_cores in kinds:
        for d in cuda.HEAD_DIMS:
            for h, w_ in ((5, 13), (1, 1)):  # 65 pixels: partial query and key tiles; 1 pixel
                for offset in (0, 1):
                    heads, batch = 2, 2
                    qkv = exact(batch * 3 * heads * d * h * w_, dtype, offset).view(
                        batch, 3 * heads * d, h, w_
                    )
                    if tensor_cores and not cuda.tensor_cores_for(qkv):
                        continue
                    y = cuda.mp_attention(qkv, heads, tensor_cores=tensor_cores)
                    launches += 1
                    what = f"attention {dtype} tensor_cores={tensor_cores} d={d} {h}x{w_} offset={offset}"
                    check(what, y, reference.mp_attention(qkv.float(), heads))
    torch.cuda.synchronize()
    for line in off:
        print(line)
    print(f"sanitize workload: {launches} kernel launches, {len(off)} results off")
    return 1 if off else 0


def bench_main(name: str, out: Path) -> int:
    """One benchmark stage (benchmarks/test_bench_kernels.py's functions); every case's numbers go
    to ``out`` as soon as they are measured."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import test_bench_kernels as bench
    from autoguide_fast.kernels import cuda

    if not (torch.cuda.is_available() and cuda.available()):
        print(f"{name}: needs a CUDA device and CuPy")
        return 2
    cases: list[dict] = []

    def record(kind: str, label: str, fn, *args) -> None:
        t0 = time.monotonic()
        try:
            info = dict(kind=kind, **fn(*args))
        except Exception as e:  # one failing case must not lose the others
            traceback.print_exc()
            info = dict(kind=kind, error=f"{label}: {type(e).__name__}: {e}"[:400])
        info["seconds"] = round(time.monotonic() - t0, 2)
        cases.append(info)
        write_atomic(out, json.dumps(dict(cases=cases), indent=1) + "\n")
        print(f"{label}: {json.dumps(info)}", flush=True)
        torch.cuda.empty_cache()

    if name == "bench-step":
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            record("bandwidth", f"bandwidth {dtype}", bench.guided_step_numbers, cuda, dtype)
        for dtype in (torch.float32, torch.float16):
            record("overhead", f"overhead {dtype}", bench.guided_step_overhead_numbers, cuda, dtype)
    elif name == "bench-attention":
        for shape in bench.ATTENTION_SHAPES:
            record(
                "attention",
                "attention N, res, heads = {}, {}, {}".format(*shape),
                bench.attention_numbers,
                cuda,
                *shape,
            )
    else:
        record(
            "e2e",
            "end to end",
            lambda: bench.end_to_end_numbers(progress=lambda text: print(text, flush=True)),
        )
    return 1 if any("error" in c for c in cases) else 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", nargs="?", default="run", choices=("run", *HELPERS), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path(os.environ.get("OUT") or "gpu-report"),
        help="folder for report.md, report.json, gpu_check.log (default: $OUT, else gpu-report)",
    )
    parser.add_argument(
        "--budget",
        default=os.environ.get("GPU_CHECK_BUDGET_S", str(DEFAULT_BUDGET_S)),
        help=f"seconds for the whole run (default: $GPU_CHECK_BUDGET_S, else {DEFAULT_BUDGET_S})",
    )
    parser.add_argument(
        "--stages",
        default=os.environ.get("GPU_CHECK_STAGES", ""),
        help="stages or prefixes to run, comma-separated, e.g. sanitizer,bench-e2e "
        "(default: $GPU_CHECK_STAGES, else all); install and environment always run",
    )
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "env":
        return env_main(args.json)
    if args.command == "sanitize":
        return sanitize_main()
    if args.command != "run":
        return bench_main(args.command, args.json)
    try:
        budget = float(args.budget)
    except ValueError:
        budget = float("nan")
    if not budget >= 2 * MIN_STAGE_S:
        print(
            f"{PROG}: error: --budget must be at least {2 * MIN_STAGE_S} seconds, got {args.budget!r}",
            file=sys.stderr,
        )
        return 2
    try:
        stages = select(args.stages)
    except SetupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise Interrupted

    signal.signal(signal.SIGTERM, on_sigterm)
    return run_check(args.report, budget, stages)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`: end quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the interpreter's last flush
        sys.exit(141)
