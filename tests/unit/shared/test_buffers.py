"""Buffer handles: shm across a real child process, tcp frames, cuda_ipc (GPU only)."""
import mmap
import multiprocessing as mp
import os
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import torch
import zmq

from shared import buffers
from shared.buffers import shm, tcp
from shared.buffers.handle import BufferHandle
from shared.buffers.shm import SHM_DIR, ShmRegion

CHILD_TIMEOUT_S = 60
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def region():
    r = ShmRegion.create(nbytes=1 << 16)
    path = os.path.join(SHM_DIR, r.name)
    assert os.path.exists(path)
    yield r
    r.close()
    if r.owner:
        r.unlink()
    assert not os.path.exists(path)


def _in_child(target, handle):
    """Run target(encoded handle, conn) in a fresh (spawned) process; what it sent back.
    The child must report and exit 0 within CHILD_TIMEOUT_S; it is killed otherwise."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=target, args=(msgspec.msgpack.encode(handle), child_conn))
    child.start()
    try:
        assert parent_conn.poll(CHILD_TIMEOUT_S), f"{target.__name__} did not report"
        got = parent_conn.recv()
        child.join(CHILD_TIMEOUT_S)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        parent_conn.close()
    assert child.exitcode == 0
    return got


def _shm_child(encoded: bytes, conn) -> None:
    """Open the handle, check zero-copy, write a pattern, report back."""
    handle = msgspec.msgpack.decode(encoded, type=BufferHandle)
    view = buffers.open(handle)
    region = ShmRegion.attach(handle.base)
    inside = region.contains(view.data_ptr(), handle.nbytes)
    cached = ShmRegion.attach(handle.base) is region and buffers.open(handle).data_ptr() == view.data_ptr()
    view.copy_(torch.arange(view.numel(), dtype=torch.int32).reshape(view.shape) * 3 + 1)
    conn.send((inside, cached, view.data_ptr() - region.address))
    conn.close()


def test_handle_checks_its_size():
    with pytest.raises(ValueError, match="nbytes 10 does not match shape"):
        BufferHandle(backend="shm", base="x", nbytes=10, dtype="float32", shape=[3])


def test_shm_child_process_writes_parent_sees_bytes(region):
    view = region.tensor(torch.int32, [16, 8], offset=1024)
    view.zero_()
    handle = buffers.export(view)
    assert (handle.backend, handle.base, handle.offset, handle.nbytes) == ("shm", region.name, 1024, 512)

    inside, cached, child_offset = _in_child(_shm_child, handle)
    assert inside and cached and child_offset == 1024  # the child's view lies in its mapping
    expected = torch.arange(128, dtype=torch.int32).reshape(16, 8) * 3 + 1
    assert torch.equal(view, expected)  # no message carried the data: shared pages did
    assert region.tensor("int32", [256])[:256].sum() == 0  # bytes before the offset untouched


def test_shm_open_in_creator_is_zero_copy(region):
    view = region.tensor("bfloat16", [4, 32], offset=256)
    view.copy_(torch.randn(4, 32).to(torch.bfloat16))
    opened = buffers.open(buffers.export(view))
    assert opened.data_ptr() == region.address + 256
    assert region.contains(opened.data_ptr(), 256)
    assert opened.dtype == torch.bfloat16 and torch.equal(opened, view)
    whole = buffers.export(region)
    assert (whole.nbytes, whole.shape, whole.offset) == (region.nbytes, [region.nbytes], 0)


def test_shm_refuses_bad_handles_and_tensors(region):
    with pytest.raises(ValueError, match="outside shm"):
        shm.open(BufferHandle(backend="shm", base=region.name, offset=region.nbytes - 8,
                              nbytes=16, dtype="float32", shape=[4]))
    with pytest.raises(ValueError, match="not aligned"):
        region.tensor("float32", [2], offset=2)
    with pytest.raises(ValueError, match="bad shm name"):
        ShmRegion.attach("../../etc/passwd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShmRegion.attach("duet-no-such-segment")
    with pytest.raises(ValueError, match="not inside any shm region"):
        buffers.export(torch.zeros(4))
    with pytest.raises(PermissionError, match="only the creator"):
        ShmRegion("not-mine", mmap.mmap(-1, 16), owner=False).unlink()


def test_shm_views_survive_close_and_unlink():
    r = ShmRegion.create(nbytes=4096)
    path = os.path.join(SHM_DIR, r.name)
    view = r.tensor("int64", [8])
    view.fill_(7)
    r.close()
    r.unlink()
    assert not os.path.exists(path)
    assert view.sum().item() == 56  # the mapping lives as long as the view


def test_shm_creator_exiting_without_unlink_does_not_leak():
    code = ("from shared.buffers.shm import ShmRegion; r = ShmRegion.create(nbytes=4096); "
            "print(r.name, flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert name and not os.path.exists(os.path.join(SHM_DIR, name))  # unlinked at exit


def test_tcp_frames_round_trip_without_copy():
    t = torch.randn(5, 7)
    frames: list = []
    handle = buffers.export(t, frames=frames)
    assert (handle.backend, handle.frame, handle.base) == ("tcp", 0, "")
    opened = buffers.open(handle, frames)
    assert opened.data_ptr() == t.data_ptr() and torch.equal(opened, t)


def test_tcp_frames_through_zeromq_without_copy():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://tcp-backend")
        b.connect("inproc://tcp-backend")
        t = torch.arange(4096, dtype=torch.float16).reshape(64, 64)
        frames: list = []
        handle = tcp.export(t, frames)
        a.send_multipart([msgspec.msgpack.encode(handle), *frames], copy=False)
        parts = b.recv_multipart(copy=False)
        got_handle = msgspec.msgpack.decode(parts[0].buffer, type=BufferHandle)
        view = buffers.open(got_handle, parts[1:])
        frame_addr = np.frombuffer(parts[1].buffer, dtype=np.uint8).ctypes.data
        assert view.data_ptr() == frame_addr  # a view of the received frame, not a copy
        assert torch.equal(view, t)
        with pytest.raises(ValueError, match="do not fit"):
            tcp.from_frame(bytes(parts[1].buffer)[:100], "float16", [64, 64])
        with pytest.raises(ValueError, match="needs the message's payload frames"):
            buffers.open(got_handle)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_cuda_ipc_imports_without_cupy():
    code = ("import sys; import shared.buffers.cuda_ipc as c; "
            "assert 'cupy' not in sys.modules; print(c.IpcBuffer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                         cwd=REPO)
    assert out.returncode == 0 and "IpcBuffer" in out.stdout, out.stderr


# ------------------------------------------------------------ cuda_ipc (GPU script)

def _ipc_reader(encoded: bytes, conn) -> None:
    from shared.buffers import cuda_ipc

    handle = msgspec.msgpack.decode(encoded, type=BufferHandle)
    view = buffers.open(handle)  # waits on the writer's event on the current stream
    data = view.cpu()
    again = buffers.open(handle)
    conn.send((data.numpy().tobytes(), str(view.device), again.data_ptr() == view.data_ptr()))
    del view, again
    torch.cuda.synchronize()
    cuda_ipc.close_imports()
    conn.close()


@pytest.mark.gpu
def test_cuda_ipc_two_processes():
    if os.environ.get("DUET_REQUIRE_GPU") != "1":   # gpu_check.sh sets it: fail, never skip
        pytest.importorskip("cupy")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    import cupy  # noqa: F401
    from shared.buffers import cuda_ipc

    buf = cuda_ipc.IpcBuffer(1 << 20)
    view = buf.tensor("float32", [256, 64], offset=4096)
    view.copy_(torch.arange(256 * 64, dtype=torch.float32, device=view.device).reshape(256, 64))
    buf.record()
    handle = buffers.export(view)
    assert handle.backend == "cuda_ipc" and handle.offset == 4096 and handle.device.startswith("GPU-")
    assert buffers.open(handle).data_ptr() == view.data_ptr()  # exporter gets its own view
    with pytest.raises(ValueError, match="not inside an IpcBuffer"):
        buffers.export(torch.zeros(4, device=view.device))

    data, device, cached = _in_child(_ipc_reader, handle)
    assert cached and device.startswith("cuda")
    assert data == view.cpu().numpy().tobytes()
    del view
    buf.close()
