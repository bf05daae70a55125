"""Processes under ``torchrun``: one function that joins the process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_process_group"]


def init_process_group() -> str | None:
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group (NCCL on GPUs, gloo on CPUs),
    makes ``LOCAL_RANK``'s GPU the current device and returns this rank's device; alone, None
    (each function's own default device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
