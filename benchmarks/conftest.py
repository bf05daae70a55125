import statistics
import time


def paired_times(fast, slow, rounds: int = 5, warmup: int = 1, setup=None) -> tuple[float, float]:
    """Median seconds of ``fast()`` and ``slow()``, interleaved in one process so that both see the
    same machine state; ratios of the two are what the benchmarks report. ``setup()``, if given,
    runs untimed before every call (for example to remove the previous call's outputs)."""
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
    return statistics.median(tf), statistics.median(ts)
