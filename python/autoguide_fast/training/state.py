"""A run folder's files: training-state checkpoints (save, load), the run lock, ``stats.jsonl``
and its loss figure, and the signal handling that ends a run at a step boundary."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import Snapshot, save
from ..ema import PowerFunctionEMA
from ..files import figure, save_figure
from .options import TrainOptions

__all__ = ["SNAPSHOT_PREFIX", "STATE_PREFIX", "rank_zero", "read_stats"]


STATE_PREFIX = "training-state-"


SNAPSHOT_PREFIX = "network-snapshot-"


def _states(out: Path) -> list[Path]:
    return sorted(out.glob(f"{STATE_PREFIX}*.safetensors"))


def _save_state(
    out: Path,
    net,
    ema: PowerFunctionEMA,
    opt,
    nimg: int,
    step: int,
    opts: TrainOptions,
    data_info,
    run_id: str,
):
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, e in enumerate(ema.emas):
        tensors.update({f"ema{i}.{k}": v for k, v in e.state_dict().items()})
    for j, p in enumerate(net.parameters()):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{j}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    meta = dict(
        nimg=str(nimg),
        step=str(step),
        options=opts.to_json(),
        config=json.dumps(net.config),
        dataset=json.dumps(data_info),
        format="autoguide_fast.training-state/1",
        run_id=run_id,
    )
    path = out / f"{STATE_PREFIX}{nimg:09d}.safetensors"
    save(tensors, path, meta)
    for old in _states(out)[:-2]:  # keep the two newest
        old.unlink(missing_ok=True)
    return path


def _load_state(path: Path, net, ema: PowerFunctionEMA, opt, device) -> tuple[int, int]:
    with Snapshot(path) as snap:
        net.load_state_dict({k[4:]: v for k, v in snap.items() if k.startswith("net.")})
        for i, e in enumerate(ema.emas):
            e.load_state_dict({k[len(f"ema{i}.") :]: v for k, v in snap.items() if k.startswith(f"ema{i}.")})
        state = {}
        for k, v in snap.items():
            if k.startswith("optim."):
                _, j, name = k.split(".", 2)
                state.setdefault(int(j), {})[name] = v.clone().to(device)
        opt.load_state_dict(dict(state=state, param_groups=opt.state_dict()["param_groups"]))
        return int(snap.metadata["nimg"]), int(snap.metadata["step"])


def _lock_run(out: Path):
    import fcntl  # optional: POSIX only

    """An exclusive lock on the run folder for the life of a training run (released by close, or
    by the system when the process dies): two runs writing one folder would interleave."""
    f = open(out / "train.lock", "a")  # held open for the run; the caller closes it
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(
            f"{out}: another training run is writing this folder (it holds {out / 'train.lock'})"
        ) from None
    return f


def read_stats(path: Path) -> list[dict]:
    """The rows of a run's ``stats.jsonl``. A last line without its newline is the partial write
    of a killed process and is dropped; any other bad line is an error naming the file and line."""
    # split("\n") ends with what follows the last newline: "" after a finished write.
    lines = path.read_text().split("\n")[:-1]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not a stats line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("nimg"), int):
            raise ValueError(f"{path}:{i}: not a stats line (no integer 'nimg')")
        rows.append(row)
    return rows


def _plot_losses(stats_path: Path, png: Path) -> None:

    if not stats_path.exists():  # a checkpoint before the first stats line
        return
    rows = [r for r in read_stats(stats_path) if r.get("loss") is not None]
    if not rows:
        return
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 20 else None)
    ax.set_xlabel("kimg")
    ax.set_ylabel("EDM2 loss (with uncertainty)")
    ax.grid(alpha=0.3)
    save_figure(fig, png, dpi=100)


def rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: the device's allocator on CUDA, resident memory else."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30

    import resource  # optional: POSIX only; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop writes a checkpoint and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
