"""Training from a large zip: the streaming loader against the in-memory path, in one run.

Workload: a synthetic 64x64 RGB data set of ``AUTOGUIDE_BENCH_IMAGES`` (default 100,000) PNGs in
one zip (smooth random images, ~5 KB each), 10 classes; a small network (digits-xxs channels at
64x64) trained for 20 steps of batch 32, each path in its own process, and the streamed path
again on a quarter of the images. Reports images per second of training and the peak resident
memory of each process and of its DataLoader workers (goal: streamed RSS < 2 GB whatever the
number of images, throughput >= 0.9x the in-memory path). Run with ``make bench``."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

IMAGES = int(os.environ.get("AUTOGUIDE_BENCH_IMAGES", "100000"))

_RUN = """
import json, resource, sys, time
from autoguide_fast.training import TrainOptions, train
mode, data, out = sys.argv[1:4]
opts = TrainOptions(preset="digits-xxs", batch=32, kimg=0.64, snapshot_kimg=100, checkpoint_kimg=100,
                    log_kimg=0.16, ema_stds=(0.1,))
t0 = time.perf_counter()
train(data, out, opts, progress=False, stream=mode == "stream", workers=2)
rows = [json.loads(x) for x in open(out + "/stats.jsonl")]
print(json.dumps(dict(img_per_s=sum(r["img_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1),
                      seconds=time.perf_counter() - t0,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      workers_peak_rss_gb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)))
"""


def _zip(path, count):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(count):
            a, b, c = rng.uniform(0, 2 * np.pi, 3)
            img = 127.5 + 127.5 * np.stack(
                [np.sin(a + 6 * xx), np.sin(b + 6 * yy), np.sin(c + 6 * (xx + yy))], -1
            )
            buf = io.BytesIO()
            Image.fromarray(img.astype(np.uint8)).save(buf, "PNG")
            names.append(f"{i // 1000:05d}/img{i:08d}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, i % 10] for i, n in enumerate(names)]}))
    return path


@pytest.fixture(scope="module")
def big_zip(tmp_path_factory):
    return _zip(tmp_path_factory.mktemp("data") / f"synthetic-{IMAGES}.zip", IMAGES)


def _run(mode: str, data, out) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run(
        [sys.executable, "-c", _RUN, mode, str(data), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streaming_vs_in_memory(benchmark, big_zip, tmp_path):
    memory = _run("memory", big_zip, tmp_path / "memory")
    stream = _run("stream", big_zip, tmp_path / "stream")
    quarter = _run("stream", _zip(tmp_path / "quarter.zip", IMAGES // 4), tmp_path / "quarter")
    ratio = stream["img_per_s"] / memory["img_per_s"]
    benchmark.extra_info.update(images=IMAGES, memory=memory, stream=stream, quarter=quarter, ratio=ratio)
    print(
        f"\n{IMAGES} images 64x64: in memory {memory['img_per_s']:.0f} img/s, peak RSS "
        f"{memory['peak_rss_gb']:.2f} GB; streamed {stream['img_per_s']:.0f} img/s ({ratio:.2f}x), peak RSS "
        f"{stream['peak_rss_gb']:.2f} GB (workers at most {stream['workers_peak_rss_gb']:.2f} GB each); "
        f"streamed from {IMAGES // 4} images: peak RSS {quarter['peak_rss_gb']:.2f} GB"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
