"""The report: report.json (everything), report.md (for people) and gpu_check.log (every stage's
output), in one folder, rewritten after every stage."""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT, write_atomic


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

    def __init__(self, folder: Path, budget_s: float, stage_names: list[str]):
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
            stages_selected=stage_names,
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


def graph_eager(p: str) -> Callable[[dict], str]:
    """The cell of one attention path: its time under graph replay / eagerly."""
    return lambda c: pair(c[f"{p}_us"], c[f"{p}_eager_us"])


@dataclass(frozen=True)
class Table:
    """A table of report.md: one row per case of ``kind`` in ``stage``'s data."""

    stage: str
    kind: str
    title: str
    columns: list[tuple[str, Callable[[dict], object]]]  # (header, the cell of a case)


TABLES = [
    Table(
        "bench-step",
        "bandwidth",
        "Guided step bandwidth (graph replay; goal >= 70% of copy)",
        [
            ("dtype", lambda c: c["dtype"]),
            ("n", lambda c: f"{c['n']:,}"),
            ("copy GB/s", lambda c: c["copy_gb_s"]),
            ("Euler GB/s", lambda c: c["euler_gb_s"]),
            ("of copy", lambda c: pct(c["euler_of_copy"])),
            ("Heun GB/s", lambda c: c["heun_gb_s"]),
            ("of copy", lambda c: pct(c["heun_of_copy"])),
            ("Euler us graph / eager", lambda c: pair(c["euler_us"], c["euler_eager_us"])),
            ("Heun us graph / eager", lambda c: pair(c["heun_us"], c["heun_eager_us"])),
            ("vs torch", lambda c: times(c["speedup_vs_torch"])),
            ("rel diff vs torch", lambda c: c["max_rel_diff_vs_torch"]),
        ],
    ),
    Table(
        "bench-step",
        "overhead",
        "Guided step per call at a sampler's size (us)",
        [
            ("dtype", lambda c: c["dtype"]),
            ("n", lambda c: f"{c['n']:,}"),
            ("Euler kernel (graph)", lambda c: c["euler_graph_us"]),
            ("Euler eager", lambda c: c["euler_eager_us"]),
            (
                "host: public / op / CuPy launch",
                lambda c: " / ".join(fmt(c[f"host_{k}_us"]) for k in ("public", "op", "launch")),
            ),
            ("torch pair eager / graph", lambda c: pair(c["torch_pair_eager_us"], c["torch_pair_graph_us"])),
        ],
    ),
    Table(
        "bench-attention",
        "attention",
        "Attention (float16, head dim 64; us graph / eager)",
        [
            ("N, res, heads", lambda c: f"{c['batch']}, {c['res']}x{c['res']}, {c['heads']}"),
            ("fused", graph_eager("fused")),
            ("simt", graph_eager("simt")),
            ("torch ref", graph_eager("torch_ref")),
            ("torch best", graph_eager("torch_best")),
            ("vs best", lambda c: times(c["speedup_vs_torch_best"])),
            (
                "rel err vs float64: fused / simt / ref / best",
                lambda c: " / ".join(
                    f"{c[f'{p}_rel_err']:.1e}" for p in ("fused", "simt", "torch_ref", "torch_best")
                ),
            ),
            ("tensor cores", lambda c: c["tensor_cores"]),
            ("flash", lambda c: c["flash_eligible"]),
        ],
    ),
    Table(
        "bench-e2e",
        "e2e",
        "End to end (EDM2-S main, XS guide, float16 U-Nets, non-zero gains)",
        [
            ("batch", lambda c: c["batch"]),
            ("steps", lambda c: c["steps"]),
            ("on s", lambda c: c["kernels_on_s"]),
            ("off s", lambda c: c["kernels_off_s"]),
            ("off / on", lambda c: times(c["ratio"])),
            ("max abs diff", lambda c: c["max_abs_diff"]),
            ("of image max", lambda c: c["max_rel_diff"]),
            ("finite", lambda c: c["finite"]),
        ],
    ),
]


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = [[fmt(v).replace("|", "/").replace("\n", " ") for v in row] for row in rows]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


def render_markdown(doc: dict) -> str:
    """report.md: the result, the machine and the wheel, the stages, the benchmarks' tables and
    the end of every failed stage's output."""
    lines = ["# autoguide_fast GPU check", "", f"**result: {doc['result']}** - {doc['message']}", ""]
    lines += _header(doc)
    lines += [
        "",
        *table(
            ["stage", "status", "s", "summary"],
            [[s["name"], s["status"], s["seconds"], s["summary"]] for s in doc["stages"]],
        ),
    ]
    lines += _benchmark_tables(doc["stages"])
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


def _header(doc: dict) -> list[str]:
    env, wheel = doc["environment"], doc["wheel"]
    lines = []
    if env.get("summary"):
        lines.append(f"- machine: {env['summary']}")
    if wheel.get("name"):
        stale = wheel["stale"]
        state = f"STALE, differs from the tree in {', '.join(stale)}" if stale else "matches the tree"
        lines.append(f"- wheel: {wheel['name']} ({state})")
    run = f"{doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget"
    lines.append(f"- commit {doc['commit']}, started {doc['started']}, {run}")
    return lines


def _benchmark_tables(stages: list[dict]) -> list[str]:
    lines = []
    cases = {s["name"]: s["data"].get("cases", []) for s in stages}
    for t in TABLES:
        rows = [c for c in cases.get(t.stage, []) if c.get("kind") == t.kind and "error" not in c]
        if rows:
            try:
                body = table([h for h, _ in t.columns], [[f(c) for _, f in t.columns] for c in rows])
            except (KeyError, TypeError, ValueError) as e:  # report.json has the numbers all the same
                body = [f"(no table: {type(e).__name__}: {e}; the numbers are in report.json)"]
            lines += ["", f"## {t.title}", "", *body]
    return lines
