"""The GPU stages' own processes: the compute-sanitizer workload (``python -m gpu_check sanitize``)
and the benchmark runs (``python -m gpu_check bench-step|bench-attention|bench-e2e --json FILE``).
Only those processes import this module: it needs torch and the installed wheel, which the process
that runs the stages and writes the report may lack."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from autoguide_fast.kernels import cuda, reference

from .common import ROOT, write_atomic


class Workload:
    """The sanitizer workload's tensors, each one allocation ending where the tensor ends
    (PYTORCH_NO_CUDA_MEMORY_CACHING=1), and its tally: kernel launches, results off."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)
        self.launches = 0
        self.off: list[str] = []

    def exact(self, n: int, dtype: torch.dtype, offset: int) -> torch.Tensor:
        # One allocation of n + offset elements, from `offset` on.
        return (torch.randn(n + offset, generator=self.g) * 2).to("cuda", dtype)[offset:]

    def check(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        if not err <= 0.05 * float(want.double().abs().max()) + 1e-3:  # NaN fails too
            self.off.append(f"{what}: error {err:.3g}")


def sanitize_main() -> int:
    """Calls every kernel entry point (each dtype, with a guide and without, each head dim, tensor
    cores and not) on odd sizes and on views one element into their allocation (not 16-byte
    aligned), every tensor ending where its allocation ends; checks the results against the torch
    reference loosely (the tests check them precisely)."""
    if not (torch.cuda.is_available() and cuda.available()):
        print("sanitize workload: needs a CUDA device and CuPy")
        return 2
    load = Workload()
    guided_step_launches(load)
    attention_launches(load)
    torch.cuda.synchronize()
    for line in load.off:
        print(line)
    print(f"sanitize workload: {load.launches} kernel launches, {len(load.off)} results off")
    return 1 if load.off else 0


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def guided_step_launches(load: Workload) -> None:
    """The guided Euler and Heun kernels: every dtype, with a guide and without, on 1, 7, 33 and
    4099 elements, aligned and one element into their allocation."""
    w, t_hat, t_next = 2.5, 3.0, 2.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 7, 33, 4099):
            for offset in (0, 1):
                for guided in (True, False):
                    x, m, m2 = (load.exact(n, dtype, offset) for _ in range(3))
                    gd = load.exact(n, dtype, offset) if guided else None
                    xn, d = cuda.guided_euler(x, m, gd, w, t_hat, t_next)
                    out = cuda.guided_heun(x, xn, d, m2, gd, w, t_hat, t_next)
                    load.launches += 2
                    what = f"guided step {dtype} n={n} offset={offset} guided={guided}"
                    ref_xn, ref_d = reference.guided_euler(_f32(x), _f32(m), _f32(gd), w, t_hat, t_next)
                    load.check(f"{what} x_next", xn, ref_xn)
                    load.check(f"{what} slope", d, ref_d)
                    load.check(
                        f"{what} Heun",
                        out,
                        reference.guided_heun(_f32(x), _f32(xn), d, _f32(m2), _f32(gd), w, t_hat, t_next),
                    )


def attention_launches(load: Workload) -> None:
    """The attention kernels: every dtype and head dim, tensor cores and not, on 5x13 and 1x1
    pixels, aligned and one element into their allocation."""
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
                    qkv = load.exact(batch * 3 * heads * d * h * w_, dtype, offset).view(
                        batch, 3 * heads * d, h, w_
                    )
                    if tensor_cores and not cuda.tensor_cores_for(qkv):
                        continue
                    y = cuda.mp_attention(qkv, heads, tensor_cores=tensor_cores)
                    load.launches += 1
                    what = f"attention {dtype} tensor_cores={tensor_cores} d={d} {h}x{w_} offset={offset}"
                    load.check(what, y, reference.mp_attention(qkv.float(), heads))


def bench_main(name: str, out: Path) -> int:
    """One benchmark stage (benchmarks/test_bench_kernels.py's functions); every case's numbers go
    to ``out`` as soon as they are measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import test_bench_kernels as bench  # benchmarks/ is no package: importable once on the path

    if not (torch.cuda.is_available() and cuda.available()):
        print(f"{name}: needs a CUDA device and CuPy")
        return 2
    cases: list[dict] = []

    def record(kind: str, label: str, fn: Callable[..., dict], *args) -> None:
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
