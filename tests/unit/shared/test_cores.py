"""Cores shared by load (shared/cores.py): worker processes on one host see each other's
steps through a table in /dev/shm and take all the cores or a share."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from shared.cores import CoreShare, remove_share, share_path

CHILD = """
import sys, time
from shared.cores import CoreShare
share = CoreShare(sys.argv[1], cores=2, linger_s=0.05)
print(share.begin_step(), flush=True)      # busy until told
sys.stdin.readline()
share.end_step()
print("ended", flush=True)
sys.stdin.readline()
share.close()
"""


@pytest.fixture
def name():
    n = f"test-{uuid.uuid4().hex[:8]}"
    yield n
    remove_share(n)


def child(name):
    p = subprocess.Popen([sys.executable, "-c", CHILD, name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__))))))
    return p


def test_a_busy_neighbour_halves_the_threads_and_an_idle_one_gives_them_back(name):
    me = CoreShare(name, cores=2, linger_s=0.05)
    assert me.begin_step() == 2                      # alone: every core
    other = child(name)                              # starts while we are mid-step
    try:
        assert other.stdout.readline().strip() == "1"   # it saw us busy: its share
        me.end_step()
        assert me.begin_step() == 1                   # it is mid-step: our share
        me.end_step()
        other.stdin.write("\n"), other.stdin.flush()
        assert other.stdout.readline().strip() == "ended"
        time.sleep(0.1)                               # past its linger
        assert me.busy_others() == 0 and me.begin_step() == 2
        me.end_step()
        other.stdin.write("\n"), other.stdin.flush()
        assert other.wait(10) == 0
    finally:
        other.kill()
        other.wait()
    me.close()


def test_a_worker_killed_mid_step_stops_counting(name):
    other = child(name)
    assert other.stdout.readline().strip() == "2"
    me = CoreShare(name, cores=2)
    assert me.busy_others() == 1
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert me.begin_step() == 2                       # its pid is gone: slot freed
    assert (me.table["pid"] == other.pid).sum() == 0
    me.end_step()
    me.close()


def test_caps_and_bad_names(name):
    me = CoreShare(name, cap=1, cores=2)
    assert me.begin_step() == 1                       # --threads 1 caps it
    me.end_step(more=False)                           # nothing left: idle at once
    assert me.table["until"][me.slot] == 0.0
    me.close()
    assert share_path(name).exists()
    with pytest.raises(ValueError, match="'a/b' must be a plain file name"):
        CoreShare("a/b")


def test_the_worker_refuses_core_sharing_where_it_does_not_apply():
    from services.worker.config import WorkerConfig
    from shared.config import EngineConfig
    with pytest.raises(ValueError, match="--core-share 'x' is for single-process CPU workers "
                                         r"\(device=cpu, tp=2, pp=1\)"):
        WorkerConfig(role="decode", core_share="x", tp=2)
    with pytest.raises(ValueError, match="'../x' must be a plain file name"):
        WorkerConfig(role="decode", core_share="../x", engine=EngineConfig())
