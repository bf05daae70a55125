"""Snapshot store vs torch.load / torch.save on a ~200 MB state dict (page cache warm).
Run with ``make bench``; ratios are measured in one process."""

import os

import pytest
import torch

from autoguide_fast import checkpoint
from conftest import paired_times


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(48)}  # 48 x 4 MiB
    tensors.update({f"layer{i}.gain": torch.zeros([]) for i in range(48)})
    d = tmp_path_factory.mktemp("store")
    checkpoint.save(tensors, d / "model.safetensors")
    torch.save(tensors, d / "model.pt")
    return tensors, d


def test_open_first_tensor_vs_torch_load(benchmark, state):
    tensors, d = state
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def ours():
        with checkpoint.open(d / "model.safetensors") as snap:
            return float(snap["layer0.weight"][0, 0])

    def theirs():
        return float(torch.load(d / "model.pt", weights_only=True)["layer0.weight"][0, 0])

    assert ours() == theirs()
    t_ours, t_torch = paired_times(ours, theirs, rounds=5)
    speedup = t_torch / t_ours
    benchmark.extra_info.update(bytes=nbytes, ours_s=t_ours, torch_load_s=t_torch, speedup=speedup)
    print(f"\nopen + first tensor of {nbytes / 2**20:.0f} MiB: ours {t_ours * 1e3:.2f} ms, ", end="")
    print(f"torch.load {t_torch * 1e3:.1f} ms, speedup {speedup:.0f}x")
    benchmark.pedantic(ours, rounds=20, iterations=1)
    assert speedup >= 20


def test_save_throughput_vs_torch_save(benchmark, state):
    tensors, d = state
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def ours():
        checkpoint.save(tensors, d / "out.safetensors")

    def theirs():  # torch.save made durable too, for a like-for-like comparison
        with open(d / "out.pt", "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())

    t_ours, t_torch = paired_times(ours, theirs, rounds=3)
    ratio = t_torch / t_ours
    benchmark.extra_info.update(
        ours_mib_s=nbytes / 2**20 / t_ours, torch_mib_s=nbytes / 2**20 / t_torch, ratio=ratio
    )
    print(f"\nsave {nbytes / 2**20:.0f} MiB (fsynced): ours {nbytes / 2**20 / t_ours:.0f} MiB/s, ", end="")
    print(f"torch.save {nbytes / 2**20 / t_torch:.0f} MiB/s, ratio {ratio:.2f}x")
    benchmark.pedantic(ours, rounds=1, iterations=1)
    got = checkpoint.load(d / "out.safetensors")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
