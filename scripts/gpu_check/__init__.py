"""The GPU check (``make gpu-check``; docs/gpu-check.md has the stages, the time budget and the
report format). It runs on a machine with an NVIDIA GPU and no Rust and no registry: the wheel
built on the development machine (``make wheel``) comes along in dist/.

    PYTHONPATH=scripts python -m gpu_check [--report DIR] [--budget SECONDS] [--stages NAME,...]

(``bash scripts/gpu_check.sh`` picks the Python and runs exactly that.) Stages run one after
another, each in its own process group under its own time limit, all within one budget; the report
(DIR, default ``$OUT`` or ``gpu-report``: report.md, report.json, gpu_check.log) is rewritten after
every stage, so a run killed at any point still returns what it measured. Without a GPU the check
stops, and says so, where the GPU stages begin.

Exit status: 0 every selected stage passed (warnings allowed), or there is no GPU here (the report
says so); 1 a stage failed or timed out, or one was not run for lack of time; 2 a setup error (no
wheel, a required package missing, bad arguments); 130 interrupted.

The modules: ``__main__`` (arguments, the stage loop, the verdict), ``stages`` (what each stage
runs and how its outcome is judged), ``process`` (one stage's process group under its time limit),
``report`` (report.json, report.md, gpu_check.log), ``probe`` and ``workloads`` (the stages' own
processes: ``env``, ``sanitize``, ``bench-step|bench-attention|bench-e2e``), ``common`` (what they
all share)."""
