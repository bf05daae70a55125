"""``python -m autoguide_fast.kernels --check``: compiles every kernel with NVRTC for sm_80 and
sm_90 (to cubin, so ptxas limits such as shared memory are checked too) and fails on any
error, warning or register spill; then checks the generated PTX for instructions the design
relies on (the guided step's 16-byte loads and stores, the attention kernel's tensor-core mma).
Needs ``cuda-bindings`` and ``nvidia-cuda-nvrtc``; no GPU."""

from __future__ import annotations

import argparse
import re
import sys

from .cuda import CSRC, NVRTC_OPTIONS, kernel_source

ARCHS = ("sm_80", "sm_90")
# PTX patterns that must occur in every entry point of a file (kernel name prefix -> patterns).
EXPECTED_PTX = {
    "guided_step.cu": {
        "guided_": [r"ld\.global(\.nc)?\.v4\.", r"st\.global\.v4\."],  # 16-byte vector access
    },
    "mp_attention_tc.cu": {"mp_attention_tc_": [r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32"]},
}


def _compile(name: str, arch: str, *extra: str):
    """Compiles ``csrc/name`` for ``arch`` with the run-time options plus ``extra``; returns
    (nvrtc, program, success, log). The caller destroys the program."""
    from cuda.bindings import nvrtc

    _, prog = nvrtc.nvrtcCreateProgram(kernel_source(name).encode(), name.encode(), 0, [], [])
    opts = [o.encode() for o in (f"--gpu-architecture={arch}", *NVRTC_OPTIONS, *extra)]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # A writable buffer: NVRTC writes into it. (b" " * size is an immutable bytes object, and for
    # size 1, an empty log, CPython's shared one-byte b" ": writing there turned every b" " in
    # the process into b"\x00", which broke torch.save later on.)
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ok = res == nvrtc.nvrtcResult.NVRTC_SUCCESS
    return nvrtc, prog, ok, bytes(log).decode(errors="replace").strip("\x00 \n")


def compile_source(name: str, arch: str) -> tuple[bool, str, int]:
    """(ok, log, cubin bytes) of compiling ``csrc/name`` for ``arch``."""
    nvrtc, prog, ok, text = _compile(name, arch, "--ptxas-options=-v")
    cubin = nvrtc.nvrtcGetCUBINSize(prog)[1] if ok else 0
    nvrtc.nvrtcDestroyProgram(prog)
    # ptxas -v reports registers, shared memory and spills per entry point: a spill to local
    # memory is a regression for these register-blocked kernels, so it fails the check.
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    ok = ok and "warning" not in text.lower() and cubin > 0 and not any(spills)
    lines = [line for line in text.splitlines() if not line.startswith("ptxas") or any(spills)]
    return ok, "\n".join(lines).strip(), cubin


def ptx_entries(name: str, arch: str = "compute_80") -> dict[str, str]:
    """PTX of ``csrc/name`` split by entry point: {kernel name: its PTX body}."""
    nvrtc, prog, ok, text = _compile(name, arch)
    if not ok:
        nvrtc.nvrtcDestroyProgram(prog)
        raise RuntimeError(f"{name}: {text}")
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    buf = bytearray(size)
    nvrtc.nvrtcGetPTX(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    parts = re.split(r"\.visible \.entry (\w+)", bytes(buf).decode(errors="replace"))
    return dict(zip(parts[1::2], parts[2::2]))


def check_ptx(name: str) -> list[str]:
    """Entry points of ``name`` missing an expected PTX pattern, as messages."""
    problems = []
    entries = ptx_entries(name)
    for prefix, patterns in EXPECTED_PTX.get(name, {}).items():
        chosen = [k for k in entries if k.startswith(prefix)]
        if not chosen:
            problems.append(f"{name}: no entry point starts with {prefix!r}")
        for kernel in chosen:
            problems += [
                f"{kernel}: no {p!r} in its PTX" for p in patterns if not re.search(p, entries[kernel])
            ]
    return problems


def check() -> int:
    failures = 0
    for path in sorted(CSRC.glob("*.cu")):
        for arch in ARCHS:
            ok, log, cubin = compile_source(path.name, arch)
            print(f"{'ok  ' if ok else 'FAIL'} {path.name} {arch} ({cubin} bytes of cubin)")
            if log:
                print("\n".join("    " + line for line in log.splitlines()))
            failures += not ok
        if path.name in EXPECTED_PTX:
            problems = check_ptx(path.name)
            print(f"{'FAIL' if problems else 'ok  '} {path.name} PTX has the expected instructions")
            for problem in problems:
                print("    " + problem)
            failures += len(problems)
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
