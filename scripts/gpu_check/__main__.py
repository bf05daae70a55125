"""The entry of the GPU check (``python -m gpu_check``, see __init__.py): the arguments, the
stages one after another within the budget, and the verdict. ``env``, ``sanitize`` and
``bench-step|bench-attention|bench-e2e`` are the stages' own processes (probe.py, workloads.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import __doc__ as PACKAGE_DOC
from .common import PROG, Interrupted, SetupError, say
from .probe import env_main
from .report import Report, StageResult
from .stages import RUNNERS, Context, Stage, select

DEFAULT_BUDGET_S = 360  # the whole run on one H100/H200, so that a rerun fits in the same lending
MIN_STAGE_S = 20  # no stage is started with less of the budget left
HELPERS = ("env", "sanitize", "bench-step", "bench-attention", "bench-e2e")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpu_check", description=PACKAGE_DOC.split("\n\n")[0])
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.command == "env":
        return env_main(args.json)
    if args.command != "run":
        # torch and the installed wheel: imported in the GPU stages' own processes only, never in
        # this one, which must run (and report) where they are missing.
        from .workloads import bench_main, sanitize_main

        return sanitize_main() if args.command == "sanitize" else bench_main(args.command, args.json)
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


def stage_environment() -> dict[str, str]:
    """The environment of the stages' processes: this one's, the kernels left to their default."""
    env = {k: v for k, v in os.environ.items() if k != "AUTOGUIDE_KERNELS"}
    # CuPy's compiled kernels, kept for the stages and for a rerun on the same machine (keyed by the
    # source, so never stale), wherever $HOME is.
    env.setdefault("CUPY_CACHE_DIR", str(Path(tempfile.gettempdir()) / "autoguide-gpu-check-cupy"))
    return dict(env, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")


def run_check(report_dir: Path, budget_s: float, stages: list[Stage]) -> int:
    """Runs ``stages`` within ``budget_s`` seconds, the report in ``report_dir`` rewritten after
    each; returns the exit status."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for tmp in report_dir.glob(".*.tmp"):  # left by a run killed while writing
        tmp.unlink(missing_ok=True)
    report = Report(report_dir, budget_s, [s.name for s in stages])
    work = Path(tempfile.mkdtemp(prefix="autoguide-gpu-check-"))
    ctx = Context(report, work, stage_environment())
    status = 0
    try:
        report.save()
        for i, stage in enumerate(stages, 1):
            run_stage(ctx, stage, f"[{i}/{len(stages)}]", budget_s)
        status = conclude(ctx)
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


def run_stage(ctx: Context, stage: Stage, position: str, budget_s: float) -> None:
    """Runs one stage under min(its limit, what is left of the budget) and adds its result to the
    report; skips it where the GPU stages cannot run or too little of the budget is left. A
    SetupError ends the run; any other error of this package's fails this stage only."""
    report = ctx.report
    left = budget_s - report.elapsed()
    if stage.gpu and ctx.gate:
        report.add(StageResult(stage.name, "skip", summary=f"not run: {ctx.gate}"))
        return
    if left < MIN_STAGE_S:
        report.add(StageResult(stage.name, "skip", summary=f"not run: the {budget_s:.0f} s budget is spent"))
        return
    limit = min(stage.limit_s, left)
    say(f"{position} {stage.name}: {stage.what} (at most {limit:.0f} s)")
    report.log.write(f"\n===== {stage.name} (at most {limit:.0f} s, {report.elapsed():.0f} s into the run)\n")
    started = time.monotonic()
    try:
        result = RUNNERS[stage.name](ctx, limit)
    except SetupError as e:
        report.add(StageResult(stage.name, "fail", time.monotonic() - started, str(e)))
        raise
    except Exception as e:  # a bug of this package's must not cost the other stages
        trace = traceback.format_exc()
        report.log.write(trace)
        why = f"{PROG} failed in this stage: {type(e).__name__}: {e}"
        result = StageResult(stage.name, "fail", time.monotonic() - started, why, tail=trace)
    report.add(result)
    say(f"    {result.status} in {result.seconds:.1f} s: {result.summary}")


def conclude(ctx: Context) -> int:
    """Sets the run's result and message from its stages; returns the exit status (0 or 1)."""
    stages = ctx.report.doc["stages"]
    bad = [f"{s['name']} {s['status']}" for s in stages if s["status"] in ("fail", "timeout")]
    unrun = [s["name"] for s in stages if "budget is spent" in s["summary"]]
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
        warned = any(s["status"] == "warn" for s in stages)
        verdict, message = "pass", "every selected stage passed" + (" (with warnings)" if warned else "")
    ctx.report.doc.update(result=verdict, message=message)
    return 1 if verdict == "fail" or bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`: end quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the interpreter's last flush
        sys.exit(141)
