"""The environment stage's own process (``python -m gpu_check env --json FILE``): what the report
needs to know about this machine, as JSON. It never fails on what it finds, and it runs where torch
may be missing: the packages it looks at are imported inside the functions that report on them."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import REQUIRED, last_line, write_atomic

MODULES = (*REQUIRED, "cupy", "pytest", "pytest_benchmark", "cuda.bindings", "autoguide_fast")
SMI_QUERY = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,memory.used"


def env_main(out: Path) -> int:
    """Writes the machine's description to ``out`` (and stdout, for gpu_check.log)."""
    info: dict = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform())
    modules = {name: import_state(name) for name in MODULES}
    info.update(modules=modules, cuda_available=False, torch_cuda=None, warnings=[])
    names = {d.metadata["Name"] or "" for d in importlib.metadata.distributions()}
    info["cupy_distributions"] = sorted(n for n in names if n.lower().startswith("cupy"))
    if len(info["cupy_distributions"]) > 1:
        info["warnings"].append(
            f"several CuPy builds installed, which overwrite each other: {info['cupy_distributions']}"
        )
    if modules["torch"]["ok"]:
        add_torch_cuda(info)
    if modules["cupy"]["ok"] and info["cuda_available"]:
        add_cupy_cuda(info)
    add_nvidia_smi(info)
    info["sanitizer"] = find_sanitizer()
    if info["sanitizer"]:
        add_sanitizer_version(info)
    write_atomic(out, json.dumps(info, indent=1, default=str) + "\n")
    print(json.dumps(info, indent=1, default=str))
    return 0


def import_state(name: str) -> dict:
    """Whether ``name`` imports here, with its version and file, or why not."""
    try:
        mod = importlib.import_module(name)
        return dict(ok=True, version=getattr(mod, "__version__", None), file=getattr(mod, "__file__", None))
    except Exception as e:  # whatever breaks the import is what the report needs
        return dict(ok=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300])


def add_torch_cuda(info: dict) -> None:
    """torch's CUDA build and, where there is one, the device."""
    import torch  # only once import_state has found that it imports

    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["device"] = dict(
            name=p.name,
            capability=f"{p.major}{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mb=getattr(p, "L2_cache_size", 0) / 1e6,
            count=torch.cuda.device_count(),
        )


def add_cupy_cuda(info: dict) -> None:
    """CuPy's CUDA runtime and NVRTC, and a warning where its CUDA major differs from torch's."""
    try:
        import cupy  # only once import_state has found that it imports

        runtime = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
        info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        if str(info["torch_cuda"]).split(".")[0] != str(runtime // 1000):
            info["warnings"].append(
                f"CuPy is built for CUDA {runtime // 1000}, torch for {info['torch_cuda']}"
            )
    except Exception as e:  # a CuPy that imports but cannot reach CUDA is reported, not raised
        info["warnings"].append(f"CuPy cannot reach CUDA: {type(e).__name__}: {e}"[:300])


def add_nvidia_smi(info: dict) -> None:
    """The GPU's clocks, temperature, power and memory in use as nvidia-smi sees them, and the driver."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(
            [smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        info["nvidia_smi"] = dict(
            zip(SMI_QUERY.split(","), (v.strip() for v in got.split("\n")[0].split(",")))
        )
        info["driver"] = info["nvidia_smi"].get("driver_version")


def add_sanitizer_version(info: dict) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(
            [info["sanitizer"], "--version"], capture_output=True, text=True, timeout=60
        ).stdout
        info["sanitizer_version"] = (re.findall(r"Version (\S+)", got) or [last_line(got)])[-1]


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    homes = [os.environ.get(k, "") for k in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    candidates = [Path(h) / "bin" / "compute-sanitizer" for h in homes if h]
    candidates += sorted(Path("/usr/local").glob("cuda-*/bin/compute-sanitizer"), reverse=True)
    return found or next((str(p) for p in candidates if os.access(p, os.X_OK)), None)
