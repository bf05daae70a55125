"""Processes under ``torchrun``: joining the process group, and leaving it before exit."""

from __future__ import annotations

import atexit
import functools
import os

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "join_process_group"]


def join_process_group() -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group (NCCL on GPUs, gloo on CPUs)
    unless already joined, and destroys it when the interpreter exits. True when there is one.

    Leaving at exit matters: a gloo group still alive while the interpreter is torn down lets its
    worker threads release tensors without the interpreter, and the process can abort after its
    work is done ("terminate called without an active exception": once in this project's CI, a
    two-process ``autoguide generate``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _leave_at_exit()
    return True


@functools.cache
def _leave_at_exit() -> None:
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_process_group() -> str | None:
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group (:func:`join_process_group`),
    makes ``LOCAL_RANK``'s GPU the current device and returns this rank's device; alone, None
    (each function's own default device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    join_process_group()
    return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
