import statistics
import time


def paired_times(fast, slow, rounds: int = 5, warmup: int = 1, setup=None) -> tuple[float, float]:
    """Median seconds of ``fast()`` and ``slow()``, interleaved in one process so that both see the
    same machine state; ratios of the two are what the benchmarks report. ``setup()``, if given,
    runs untimed before every call (for example to remove the previous call's outputs)."""
    tf, ts = _paired_samples(fast, slow, rounds, warmup, setup)
    return statistics.median(tf), statistics.median(ts)


def paired_ratio(fast, slow, rounds: int = 9, warmup: int = 1) -> tuple[float, float, float]:
    """Median seconds of ``fast()`` and ``slow()`` and the median of their ratio round by round:
    each round runs the two back to back, so that each ratio sees one machine state even where
    the machine's speed drifts between rounds (seen here: the same work 0.5-1.0 s from round to
    round)."""
    tf, ts = _paired_samples(fast, slow, rounds, warmup, None)
    return statistics.median(tf), statistics.median(ts), statistics.median(f / s for f, s in zip(tf, ts))


def _paired_samples(fast, slow, rounds: int, warmup: int, setup) -> tuple[list[float], list[float]]:
    prepare = setup or (lambda: None)
    for _ in range(warmup):
        prepare()
        fast()
        prepare()
        slow()
    tf, ts = [], []
    for _ in range(rounds):
        prepare()
        t0 = time.perf_counter()
        fast()
        tf.append(time.perf_counter() - t0)
        prepare()
        t0 = time.perf_counter()
        slow()
        ts.append(time.perf_counter() - t0)
    return tf, ts


def cuda_time(fn, *, reps: int = 10, rounds: int = 5, graph: bool = False) -> float:
    """Median GPU seconds per call of ``fn()``: CUDA events around ``reps`` back-to-back calls, in
    ``rounds`` rounds, after a warm-up (run-time compilation, module loads and library handles stay
    out of the number). ``graph=True`` captures the ``reps`` calls in one CUDA graph and times its
    replays: the host's per-call cost and the launch gaps leave the number, which is then the
    kernels' own time; eagerly, a launch-bound ``fn`` measures the host instead."""
    import torch

    fn()
    torch.cuda.synchronize()
    if graph:
        # Warm up on a side stream before capturing, as torch.cuda.graph's documentation asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(reps):
                fn()
        run = captured.replay
    else:

        def run():
            for _ in range(reps):
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def host_time(fn, *, reps: int = 50, rounds: int = 5) -> float:
    """Median host seconds to issue one call of ``fn()`` (nothing waits for the GPU inside a round):
    what a Python caller pays per call, whatever the kernel costs."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
        torch.cuda.synchronize()
    return statistics.median(times)


def process_seconds(code: str, env: dict[str, str], rounds: int = 3) -> list[float]:
    """Runs ``code`` (Python that prints the seconds of the work it times, as its last line) in a
    fresh interpreter ``rounds`` times with ``env`` added to the environment: for settings that
    hold for a whole process (the allocator), compared process against process."""
    import os
    import subprocess
    import sys

    out = []
    for _ in range(rounds):
        cmd = [sys.executable, "-c", code]
        run = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True, check=True)
        out.append(float(run.stdout.split()[-1]))
    return out


def paired_process_seconds(code: str, fast_env: dict, slow_env: dict, rounds: int = 3) -> tuple[float, float]:
    """Median seconds of ``code`` under ``fast_env`` and ``slow_env``, processes interleaved."""
    tf, ts = [], []
    for _ in range(rounds):
        tf += process_seconds(code, fast_env, 1)
        ts += process_seconds(code, slow_env, 1)
    return statistics.median(tf), statistics.median(ts)
