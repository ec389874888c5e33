"""POSIX shared-memory regions (/dev/shm) viewed as torch tensors, no copies.

The creator owns a segment: it alone unlinks it (explicitly, or at exit as a
safety net). Every other process attaches by name, once per process; views are
torch tensors over the mmap, so a write in one process is seen by all.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import mmap
import os
import re
import uuid

import torch

from shared.buffers import dtypes
from shared.buffers.handle import ITEMSIZE, BufferHandle, numel

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}")

# Every region mapped in this process, by name: attach() reuses these, export()
# searches them for the region holding a tensor.
_regions: dict[str, "ShmRegion"] = {}
# Segments this process created and has not unlinked yet (for the exit net).
_owned: dict[str, "ShmRegion"] = {}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad shm name {name!r}: want 1-201 chars of [A-Za-z0-9_.-], no '/'")
    return name


class ShmRegion:
    """One shared-memory segment mapped read/write into this process."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool):
        self.name = name
        self.nbytes = len(mm)
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self._creator_pid = os.getpid() if owner else None
        probe = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(probe)  # start of the mapping
        del probe  # release the export so close() can unmap

    @classmethod
    def create(cls, name: str | None = None, nbytes: int = 0) -> "ShmRegion":
        """Create a new zero-filled segment of `nbytes` (> 0); name must be free."""
        if nbytes <= 0:
            raise ValueError(f"shm region size must be > 0 bytes, got {nbytes}")
        name = _check_name(name or f"duet-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        finally:
            os.close(fd)
        region = cls(name, mm, owner=True)
        _regions[name] = region
        _owned[name] = region
        return region

    @classmethod
    def attach(cls, name: str) -> "ShmRegion":
        """Map an existing segment; a name already mapped here is reused
        (segment names are never recycled: create() makes unique ones)."""
        region = _regions.get(_check_name(name))
        if region is not None:
            return region
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(f"shm segment {name!r} does not exist in {SHM_DIR}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise ValueError(f"shm segment {name!r} is empty")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        region = cls(name, mm, owner=False)
        _regions[name] = region
        return region

    def tensor(self, dtype: str | torch.dtype, shape: list[int], offset: int = 0) -> torch.Tensor:
        """A view of `shape` x `dtype` starting `offset` bytes in (no copy)."""
        if self._mm is None:
            raise ValueError(f"shm region {self.name!r} is closed")
        name = dtype if isinstance(dtype, str) else dtypes.to_name(dtype)
        torch_dtype = dtypes.to_torch(name)  # raises, naming the allowed dtypes
        count, itemsize = numel(shape), ITEMSIZE[name]
        end = offset + count * itemsize
        if offset < 0 or end > self.nbytes:
            raise ValueError(
                f"region [{offset}, {end}) outside shm {self.name!r} of {self.nbytes} bytes")
        if offset % itemsize:
            raise ValueError(f"offset {offset} not aligned to {name} ({itemsize} bytes)")
        if count == 0:
            return torch.empty(shape, dtype=torch_dtype)
        # Through a memoryview: torch keeps it alive, and its buffer export
        # makes mmap.close() refuse (BufferError) while any view exists;
        # frombuffer(mmap) alone would let close() unmap under live views.
        flat = torch.frombuffer(memoryview(self._mm), dtype=torch_dtype, count=count, offset=offset)
        return flat.view(shape)

    def contains(self, ptr: int, nbytes: int) -> bool:
        """True when [ptr, ptr + nbytes) lies inside this mapping."""
        return self._mm is not None and self.address <= ptr and ptr + nbytes <= self.address + self.nbytes

    def export(self, tensor: torch.Tensor | None = None, generation: int = 0) -> BufferHandle:
        """Handle for a contiguous view into this region (whole region if None)."""
        if tensor is None:
            return BufferHandle(backend="shm", base=self.name, nbytes=self.nbytes,
                                dtype="uint8", shape=[self.nbytes], generation=generation)
        nbytes = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or not self.contains(tensor.data_ptr(), nbytes):
            raise ValueError(f"tensor is not a contiguous view inside shm {self.name!r}")
        return BufferHandle(
            backend="shm", base=self.name, offset=tensor.data_ptr() - self.address,
            nbytes=nbytes, dtype=dtypes.to_name(tensor.dtype), shape=list(tensor.shape),
            generation=generation)

    def close(self) -> None:
        """Unmap here. Views still alive keep the pages mapped until they die."""
        if self._mm is None:
            return
        if _regions.get(self.name) is self:
            del _regions[self.name]
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:
            pass  # live views hold the mapping; it is unmapped with the last one

    def unlink(self) -> None:
        """Remove the name from /dev/shm (creator only); mappings stay valid."""
        if not self.owner:
            raise PermissionError(f"only the creator may unlink shm {self.name!r}")
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        self.owner = False
        _owned.pop(self.name, None)

    def __enter__(self) -> "ShmRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"{self.nbytes} bytes"
        return f"ShmRegion({self.name!r}, {state}, owner={self.owner})"


def export(tensor: torch.Tensor, generation: int = 0) -> BufferHandle:
    """Handle for a CPU tensor that lives inside a ShmRegion of this process."""
    nbytes = tensor.numel() * tensor.element_size()
    for region in _regions.values():
        if region.contains(tensor.data_ptr(), nbytes):
            return region.export(tensor, generation)
    raise ValueError(
        f"tensor at 0x{tensor.data_ptr():x} ({nbytes} bytes) is not inside any shm "
        "region of this process; allocate it from ShmRegion.tensor() or use tcp")


def open(handle: BufferHandle) -> torch.Tensor:  # noqa: A001 - mirrors buffers.open
    """View of the region a 'shm' handle names, attaching the segment if needed."""
    if handle.backend != "shm":
        raise ValueError(f"not a shm handle: backend {handle.backend!r}")
    region = ShmRegion.attach(handle.base)
    return region.tensor(handle.dtype, handle.shape, handle.offset)


@atexit.register
def _unlink_owned_at_exit() -> None:
    # Safety net for a creator that dies without cleaning up; forked children
    # inherit the table but must not unlink their parent's segments.
    for region in list(_owned.values()):
        if region._creator_pid == os.getpid():
            log.warning("unlinking shm %r left linked at exit", region.name)
            region.unlink()
