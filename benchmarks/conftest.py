import statistics
import time


def paired_times(fast, slow, rounds: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``fast()`` and ``slow()``, interleaved in one process so that both see the
    same machine state; ratios of the two are what the benchmarks report."""
    for _ in range(warmup):
        fast()
        slow()
    tf, ts = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fast()
        t1 = time.perf_counter()
        slow()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        ts.append(t2 - t1)
    return statistics.median(tf), statistics.median(ts)
