"""``python -m autoguide_fast.kernels --check``: compiles every kernel with NVRTC for sm_80 and
sm_90 (to cubin, so ptxas limits such as shared memory are checked too) and fails on any
error or warning. Needs ``cuda-bindings`` and ``nvidia-cuda-nvrtc``; no GPU."""

from __future__ import annotations

import argparse
import sys

from .cuda import CSRC, kernel_source

ARCHS = ("sm_80", "sm_90")


def compile_source(name: str, arch: str) -> tuple[bool, str, int]:
    """(ok, log, cubin bytes) of compiling ``csrc/name`` for ``arch``."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(kernel_source(name).encode(), name.encode(), 0, [], [])
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"--extra-device-vectorization"]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.decode(errors="replace").strip("\x00 \n")
    cubin = 0
    if res == nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, cubin = nvrtc.nvrtcGetCUBINSize(prog)
    nvrtc.nvrtcDestroyProgram(prog)
    ok = res == nvrtc.nvrtcResult.NVRTC_SUCCESS and "warning" not in text.lower() and cubin > 0
    return ok, text, cubin


def check() -> int:
    failures = 0
    for path in sorted(CSRC.glob("*.cu")):
        for arch in ARCHS:
            ok, log, cubin = compile_source(path.name, arch)
            print(f"{'ok  ' if ok else 'FAIL'} {path.name} {arch} ({cubin} bytes of cubin)")
            if log:
                print("\n".join("    " + line for line in log.splitlines()))
            failures += not ok
    print(f"{failures} failures" if failures else "all kernels compile cleanly")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoguide_fast.kernels")
    parser.add_argument(
        "--check", action="store_true", help="compile every kernel with NVRTC (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2
    return check()


if __name__ == "__main__":
    sys.exit(main())
