"""The 'cuda_ipc' backend: GPU memory shared between processes on one host.

Exporter: an IpcBuffer is one dedicated cudaMalloc allocation (never a pool
sub-allocation: pooled blocks share a base handle, so offsets would lie). Its
cudaIpcMemHandle and an interprocess event handle are taken once; handles name
offsets into it. After writing, the exporter calls record() so readers can wait.

Importer: open() maps each allocation once per process (cached), makes the
current torch stream wait on the exporter's event, and returns a torch view via
DLPack. In the exporting process open() returns the local view instead, since
CUDA refuses to open a handle in the process that made it. Call close_imports()
once no views remain and before the exporter frees its IpcBuffer.

CuPy is imported lazily: this module imports on machines without it.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from shared.buffers import dtypes
from shared.buffers.handle import ITEMSIZE, BufferHandle, numel

_EVENT_DISABLE_TIMING = 0x02  # cudaEventDisableTiming
_EVENT_INTERPROCESS = 0x04  # cudaEventInterprocess
_IPC_LAZY_PEER_ACCESS = 0x01  # cudaIpcMemLazyEnablePeerAccess
_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t) == sizeof(cudaIpcEventHandle_t)

_lock = threading.Lock()
_uuid_to_ordinal: dict[str, int] | None = None
_exported: dict[str, "IpcBuffer"] = {}  # ipc handle hex -> buffer made here
_imported: dict[str, tuple[int, int]] = {}  # ipc handle hex -> (ptr, ordinal)
_events: dict[str, int] = {}  # event handle hex -> opened event


def _cupy() -> Any:
    import cupy  # noqa: PLC0415 - optional dependency, loaded on first use
    return cupy


def _format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def device_uuid(ordinal: int) -> str:
    """'GPU-xxxxxxxx-…' UUID of a visible device, as nvidia-smi prints it."""
    raw = _cupy().cuda.runtime.getDeviceProperties(ordinal).get("uuid", b"")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if len(raw) == 16:
        return _format_uuid(raw)
    # Some CuPy builds cut the char[16] at its first NUL byte; ask torch instead.
    text = str(torch.cuda.get_device_properties(ordinal).uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def ordinal_of(uuid: str) -> int:
    """This process's ordinal for a device UUID; ValueError if not visible."""
    global _uuid_to_ordinal
    with _lock:
        if _uuid_to_ordinal is None:
            count = _cupy().cuda.runtime.getDeviceCount()
            _uuid_to_ordinal = {device_uuid(i): i for i in range(count)}
    if uuid not in _uuid_to_ordinal:
        raise ValueError(f"GPU {uuid!r} is not visible here; visible: {sorted(_uuid_to_ordinal)}")
    return _uuid_to_ordinal[uuid]


def _decode_handle(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what} handle is not hex: {text[:32]!r}") from None
    if len(raw) != _HANDLE_BYTES:
        raise ValueError(f"{what} handle has {len(raw)} bytes, want {_HANDLE_BYTES}")
    return raw


def _view(mem: Any, ordinal: int, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """torch view of `shape` x `dtype` at `offset` bytes into a cupy memory."""
    cp = _cupy()
    nbytes = numel(shape) * ITEMSIZE[dtype]
    if nbytes == 0:
        return torch.empty(shape, dtype=dtypes.to_torch(dtype), device=f"cuda:{ordinal}")
    with cp.cuda.Device(ordinal):
        ptr = cp.cuda.MemoryPointer(mem, offset)
        raw = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=ptr)
        flat = torch.from_dlpack(raw)  # keeps `raw`, hence `mem`, alive
    return dtypes.view_bytes(flat, dtype, shape)


def _stream_ptr(ordinal: int, stream: torch.cuda.Stream | None) -> int:
    return (stream or torch.cuda.current_stream(ordinal)).cuda_stream


class IpcBuffer:
    """A dedicated device allocation that other processes on this host can map."""

    def __init__(self, nbytes: int, device: int | None = None):
        if nbytes <= 0:
            raise ValueError(f"IPC buffer size must be > 0 bytes, got {nbytes}")
        cp = _cupy()
        self.ordinal = torch.cuda.current_device() if device is None else device
        self.device = device_uuid(self.ordinal)
        self.nbytes = nbytes
        rt = cp.cuda.runtime
        with cp.cuda.Device(self.ordinal):
            self._mem = cp.cuda.Memory(nbytes)  # plain cudaMalloc, not the pool
            self.ptr = self._mem.ptr
            self.ipc_handle = rt.ipcGetMemHandle(self.ptr).hex()
            self._event = rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING | _EVENT_INTERPROCESS)
            self.event_handle = rt.ipcGetEventHandle(self._event).hex()
        with _lock:
            _exported[self.ipc_handle] = self

    def tensor(self, dtype: str | torch.dtype, shape: list[int], offset: int = 0) -> torch.Tensor:
        """A view of `shape` x `dtype` at `offset` bytes into the allocation."""
        if self._mem is None:
            raise ValueError(f"IPC buffer {self.ipc_handle[:16]}… is closed")
        name = dtype if isinstance(dtype, str) else dtypes.to_name(dtype)
        dtypes.to_torch(name)  # raises, naming the allowed dtypes
        itemsize = ITEMSIZE[name]
        end = offset + numel(shape) * itemsize
        if offset < 0 or end > self.nbytes or offset % itemsize:
            raise ValueError(
                f"region [{offset}, {end}) of {name} is outside or misaligned in "
                f"an IPC buffer of {self.nbytes} bytes")
        return _view(self._mem, self.ordinal, offset, name, shape)

    def contains(self, ptr: int, nbytes: int) -> bool:
        """True when [ptr, ptr + nbytes) lies inside this allocation."""
        return self._mem is not None and self.ptr <= ptr and ptr + nbytes <= self.ptr + self.nbytes

    def export(self, tensor: torch.Tensor | None = None, generation: int = 0) -> BufferHandle:
        """Handle for a contiguous view into this buffer (whole buffer if None)."""
        if tensor is None:
            offset, nbytes, dtype, shape = 0, self.nbytes, "uint8", [self.nbytes]
        else:
            nbytes = tensor.numel() * tensor.element_size()
            if not tensor.is_contiguous() or not self.contains(tensor.data_ptr(), nbytes):
                raise ValueError("tensor is not a contiguous view inside this IPC buffer")
            offset, dtype, shape = tensor.data_ptr() - self.ptr, dtypes.to_name(tensor.dtype), list(tensor.shape)
        return BufferHandle(
            backend="cuda_ipc", device=self.device, base=self.ipc_handle, offset=offset,
            nbytes=nbytes, dtype=dtype, shape=shape, generation=generation,
            event=self.event_handle)

    def record(self, stream: torch.cuda.Stream | None = None) -> None:
        """Mark the writes queued so far on `stream` (default: current) as done
        for readers; call after writing and before sending the handle."""
        cp = _cupy()
        with cp.cuda.Device(self.ordinal):
            cp.cuda.runtime.eventRecord(self._event, _stream_ptr(self.ordinal, stream))

    def close(self) -> None:
        """Forget the allocation; the memory is freed once the last view dies.
        Importers must have called close_imports() first."""
        if self._mem is None:
            return
        with _lock:
            _exported.pop(self.ipc_handle, None)
        cp = _cupy()
        with cp.cuda.Device(self.ordinal):
            cp.cuda.runtime.eventDestroy(self._event)
        self._mem = None


def export(tensor: torch.Tensor, generation: int = 0) -> BufferHandle:
    """Handle for a CUDA tensor inside an IpcBuffer made by this process."""
    nbytes = tensor.numel() * tensor.element_size()
    with _lock:
        buffers = list(_exported.values())
    for buf in buffers:
        if buf.contains(tensor.data_ptr(), nbytes):
            return buf.export(tensor, generation)
    raise ValueError(
        f"tensor at 0x{tensor.data_ptr():x} is not inside an IpcBuffer of this process; "
        "only dedicated IPC allocations can be exported (pool blocks share handles)")


def _import(base: str, ordinal: int) -> int:
    """Device pointer of an exporter's allocation, mapped once per process."""
    with _lock:
        cached = _imported.get(base)
        if cached is not None:
            return cached[0]
        cp = _cupy()
        with cp.cuda.Device(ordinal):
            ptr = cp.cuda.runtime.ipcOpenMemHandle(_decode_handle(base, "memory"), _IPC_LAZY_PEER_ACCESS)
        _imported[base] = (ptr, ordinal)
        return ptr


def _wait(event: str, ordinal: int) -> None:
    """Make the current stream wait for the exporter's last record()."""
    cp = _cupy()
    with _lock:
        ev = _events.get(event)
        if ev is None:
            with cp.cuda.Device(ordinal):
                ev = cp.cuda.runtime.ipcOpenEventHandle(_decode_handle(event, "event"))
            _events[event] = ev
    with cp.cuda.Device(ordinal):
        cp.cuda.runtime.streamWaitEvent(_stream_ptr(ordinal, None), ev, 0)


def open(handle: BufferHandle) -> torch.Tensor:  # noqa: A001
    """View of the region a 'cuda_ipc' handle names, ordered after the writer's
    last record() on the current stream. The exporter gets its local view."""
    if handle.backend != "cuda_ipc":
        raise ValueError(f"not a cuda_ipc handle: backend {handle.backend!r}")
    with _lock:
        local = _exported.get(handle.base)
    if local is not None:
        return local.tensor(handle.dtype, handle.shape, handle.offset)
    ordinal = ordinal_of(handle.device)
    ptr = _import(handle.base, ordinal)
    if handle.event:
        _wait(handle.event, ordinal)
    cp = _cupy()
    end = handle.offset + handle.nbytes
    mem = cp.cuda.UnownedMemory(ptr, end, owner=None, device_id=ordinal)
    return _view(mem, ordinal, handle.offset, handle.dtype, handle.shape)


def close_imports() -> None:
    """Unmap every allocation and event this process imported. Views opened
    from them must be dead; call before their exporters close."""
    cp = _cupy()
    with _lock:
        for ptr, ordinal in _imported.values():
            with cp.cuda.Device(ordinal):
                cp.cuda.runtime.ipcCloseMemHandle(ptr)
        for ev in _events.values():
            cp.cuda.runtime.eventDestroy(ev)
        _imported.clear()
        _events.clear()
