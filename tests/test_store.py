"""The Rust snapshot store through autoguide_fast.checkpoint: interoperability with the
safetensors package, zero-copy lazy reads, atomic writes, and hostile files."""

import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from autoguide_fast import AutoguideError, checkpoint

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def make(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def test_round_trip_and_interop_with_safetensors(tmp_path):
    tensors = {f"t{i}": make(dt, (3, i + 1), i) for i, dt in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    checkpoint.save(tensors, tmp_path / "ours.safetensors", {"nimg": "7", "config": "{}"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"nimg": "7"})
    for got in (load_file(tmp_path / "ours.safetensors"), checkpoint.load(tmp_path / "theirs.safetensors")):
        assert set(got) == set(tensors)
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            assert torch.equal(got[k], v)
    assert checkpoint.read_metadata(tmp_path / "ours.safetensors") == {"nimg": "7", "config": "{}"}


def test_open_is_lazy_zero_copy_and_copy_on_write(tmp_path):
    path = tmp_path / "s.safetensors"
    checkpoint.save({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}, path)
    before = path.read_bytes()
    with checkpoint.open(path) as snap:
        assert list(snap) == ["a", "b"] and len(snap) == 2 and "a" in snap
        a = snap["a"]
        a2 = snap["a"]
        assert a.data_ptr() == a2.data_ptr()  # both views of the same mapped bytes
        a.mul_(0)  # copy-on-write mapping: the file is untouched
        with pytest.raises(KeyError, match="no tensor named 'c'"):
            snap["c"]
    assert path.read_bytes() == before
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(1000, dtype=torch.float32))
    # A tensor that outlives its closed snapshot keeps the mapping (no unmapped memory is read).
    with checkpoint.open(path) as snap:
        b = snap["b"]
    assert b.sum().item() == 3.0


def test_fifos_and_devices_are_refused_not_opened(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(AutoguideError, match="not a regular file"):
        checkpoint.load(fifo)  # would block forever if opened
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoint.load(tmp_path)


def test_writes_are_atomic_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save({"w": torch.ones(4)}, path)
    old = path.read_bytes()
    with pytest.raises(TypeError, match="dtype"):
        checkpoint.save({"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(TypeError, match="metadata must map str to str"):
        checkpoint.save({"w": torch.ones(2)}, path, {"n": 3})
    assert path.read_bytes() == old
    checkpoint.save({"w": torch.zeros(8)}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    with pytest.raises(ValueError, match="directory"):
        checkpoint.save({"w": torch.ones(1)}, tmp_path)


def test_non_contiguous_and_strided_tensors(tmp_path):
    x = torch.arange(24.0).reshape(4, 6)
    checkpoint.save({"t": x.t(), "s": x[:, ::2]}, tmp_path / "s.safetensors")
    got = checkpoint.load(tmp_path / "s.safetensors")
    assert torch.equal(got["t"], x.t()) and torch.equal(got["s"], x[:, ::2])


def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    checkpoint.save({"w": torch.randn(4, 3), "b": torch.ones(5, dtype=torch.float16)}, path, {"k": "v"})
    return path


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[: len(b) // 2], "good.safetensors: not a valid safetensors file"),
        (lambda b: b[:5], "good.safetensors: not a valid safetensors file"),
        (lambda b: struct.pack("<Q", 2**40) + b[8:], "good.safetensors: not a valid safetensors file"),
        (lambda b: struct.pack("<Q", 10) + b[8:], "good.safetensors: not a valid safetensors file"),
        (lambda b: b + b"extra", "good.safetensors: not a valid safetensors file"),
        (lambda b: os.urandom(len(b)), "good.safetensors: not a valid safetensors file"),
        (lambda b: b"", "empty"),
    ],
)
def test_damaged_files_name_the_file(tmp_path, damage, match):
    path = good_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AutoguideError, match=match):
        checkpoint.open(path)
    with pytest.raises(AutoguideError):
        checkpoint.read_metadata(path)


def test_pickles_are_refused_not_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(AutoguideError, match="model.safetensors.*pickle"):
        checkpoint.load(path)
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AutoguideError, match="model.safetensors.*zip archive"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError):
        checkpoint.open(tmp_path / "missing.safetensors")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly(tmp_path, data):
    path = tmp_path / "good.safetensors"
    if not path.exists():
        good_file(tmp_path)
    good = path.read_bytes()
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        snap = checkpoint.open(bad)
    except AutoguideError as e:
        assert "bad.safetensors" in str(e)
        return
    for name in snap:  # whatever passes validation must read back without a crash
        t = snap[name]
        assert t.numel() * t.element_size() <= len(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_fail_cleanly(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("rand") / "random.safetensors"
    path.write_bytes(blob)
    try:
        snap = checkpoint.open(path)
    except AutoguideError as e:
        assert "random.safetensors" in str(e)
        return
    for name in snap:  # a blob that happens to be valid must read back without a crash
        snap[name]
