import os
import subprocess

from conftest import torchrun

# Each rank joins the group, reduces once, and reports from an exit handler registered before it
# joined (exit handlers run last-registered first, so this one runs after the library's own).
SCRIPT = """
import atexit
import torch
import torch.distributed as dist
from autoguide_fast.parallel import join_process_group

atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
assert join_process_group() and join_process_group()  # joining twice is joining once
t = torch.ones(1)
dist.all_reduce(t)
print("sum", int(t.item()), flush=True)
"""


def test_process_group_is_left_before_the_interpreter_exits(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ran = subprocess.run(
        [*torchrun(2), "--tee", "3", str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = ran.stdout + ran.stderr
    assert out.count("sum 2") == 2, out[-3000:]
    assert out.count("group alive at exit: False") == 2, out[-3000:]


def test_alone_there_is_no_group(monkeypatch):
    from autoguide_fast.parallel import init_process_group, join_process_group

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join_process_group() is False and init_process_group() is None
