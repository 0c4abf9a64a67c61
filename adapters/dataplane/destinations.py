"""Copy destinations: a block device (an attached Cinder volume), a regular file, or an NBD export.

Whether a destination reads as zeroes is always stated by the caller (``reads_as_zero``), never
guessed: a fresh thin Cinder volume usually does, an encrypted or reused one does not, and skipping
zero ranges on a destination that holds old data silently corrupts the copy.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.errors import DestinationError

_BLKZEROOUT = 0x127F  # _IO(0x12, 127): write zeroes to a range of a block device
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20
_NBD_MAX_ZERO = 1 << 30  # NBD lengths are 32-bit; stay well below

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_WRITEBACK_WINDOW = 16  # writes per thread left in the page cache before waiting for their writeback
_EVICT_MIN = 1 << 20  # streamed (full-copy sized) writes leave the cache; small CBT ones stay for verifying

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
_ZEROES = bytes(_ZERO_CHUNK)


class DestinationWriter(Protocol):
    """One copy connection's way to write; ``flush`` makes everything it wrote durable."""

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zero (trim/punch where possible)."""
        ...

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (for verification)."""
        ...

    def flush(self) -> None:
        """Force this writer's completed writes to stable storage."""
        ...

    def close(self) -> None:
        """Release the connection (not the destination)."""
        ...


class OpenDestination(Protocol):
    """A destination opened for one transfer."""

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        ...

    def writer(self) -> DestinationWriter:
        """A writer for one copy connection (thread); call once per thread."""
        ...

    def close(self) -> None:
        """Release everything."""
        ...


class Destination(Protocol):
    """Where a disk is copied to."""

    reads_as_zero: bool

    @property
    def description(self) -> str:
        """For messages."""
        ...

    @property
    def compare_target(self) -> str:
        """Path or NBD URI for ``qemu-img compare``."""
        ...

    def open(self) -> OpenDestination:
        """Open for writing."""
        ...


# ---- files and block devices -------------------------------------------------------------------------


class _Writeback:
    """Streams written data to the device as the copy goes, like nbdcopy does.

    Without this, gigabytes of dirty pages pile up, the kernel throttles the writer in bursts (ext4 on
    this class of machine: 2-3x slower than streaming), and a volume-sized copy evicts everything else
    from the page cache. Writeback of each write starts at once; the writes before the last
    ``_WRITEBACK_WINDOW`` are waited for, and large ones dropped from the cache (small changed-block
    writes stay, so verifying them right after costs no disk reads). Durability still comes from
    fdatasync: errors here are left for it to report.
    """

    def __init__(self, descriptor: int) -> None:
        self._fd = descriptor
        self._recent: deque[tuple[int, int]] = deque()
        self._enabled = True

    def written(self, offset: int, length: int) -> None:
        if not self._enabled:
            return
        if _libc.sync_file_range(self._fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            self._enabled = False  # e.g. a file system without it; plain page-cache writes still work
            return
        self._recent.append((offset, length))
        if len(self._recent) > _WRITEBACK_WINDOW:
            old_offset, old_length = self._recent.popleft()
            flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
            waited = _libc.sync_file_range(self._fd, old_offset, old_length, flags) == 0
            if waited and old_length >= _EVICT_MIN:
                os.posix_fadvise(self._fd, old_offset, old_length, os.POSIX_FADV_DONTNEED)


class _DescriptorWriter:
    """Writes through a descriptor shared by all threads (pwrite/fdatasync are thread-safe)."""

    def __init__(self, descriptor: int, block_device: bool) -> None:
        self._fd = descriptor
        self._block_device = block_device
        self._can_offload_zero = True
        self._writeback = _Writeback(descriptor)

    def write(self, offset: int, data: memoryview) -> None:
        start, length = offset, len(data)
        while data:
            written = os.pwrite(self._fd, data, offset)
            data = data[written:]
            offset += written
        self._writeback.written(start, length)

    def zero(self, offset: int, length: int) -> None:
        if self._can_offload_zero:
            try:
                self._offload_zero(offset, length)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                    raise
                self._can_offload_zero = False  # e.g. a filesystem without hole punching
            else:
                return
        self._write_zeroes(offset, length)

    def _offload_zero(self, offset: int, length: int) -> None:
        if self._block_device:
            fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = min(_ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROES)[:chunk])
            offset += chunk

    def read_into(self, offset: int, view: memoryview) -> None:
        while view:
            count = os.preadv(self._fd, [view], offset)
            if count == 0:
                raise OSError(errno.EIO, f"short read at {offset}")
            view = view[count:]
            offset += count

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Nothing per thread: the descriptor belongs to the open destination."""


class _OpenDescriptor:
    def __init__(self, path: Path, block_device: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        if block_device:
            flags |= os.O_EXCL  # fails with EBUSY if the device is mounted or opened exclusively
        try:
            self._fd = os.open(path, flags)
        except OSError as error:
            raise DestinationError(
                f"cannot open the destination {path}: {error.strerror}",
                "check that the volume is attached to this host, not mounted, and writable"
                if block_device
                else "check that the file exists and is writable",
            ) from error
        mode = os.fstat(self._fd).st_mode
        if block_device != stat.S_ISBLK(mode):
            os.close(self._fd)
            kind = "a block device" if block_device else "a regular file"
            raise DestinationError(f"{path} is not {kind}", "use the destination type that matches the path")
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._block_device = block_device

    @property
    def size(self) -> int:
        return self._size

    def writer(self) -> DestinationWriter:
        return _DescriptorWriter(self._fd, self._block_device)

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class FileDestination:
    """A regular file at least as large as the disk (local mode, tests); zero ranges are punched out."""

    path: Path
    reads_as_zero: bool

    @classmethod
    def create(cls, path: Path, size: int) -> FileDestination:
        """A new sparse file of ``size`` bytes, which therefore reads as zero."""
        with path.open("xb") as handle:
            handle.truncate(size)
        return cls(path, reads_as_zero=True)

    @property
    def description(self) -> str:
        """For messages."""
        return f"file {self.path}"

    @property
    def compare_target(self) -> str:
        """The file's path."""
        return str(self.path)

    def open(self) -> OpenDestination:
        """Open the file read-write."""
        return _OpenDescriptor(self.path, block_device=False)


@dataclass(frozen=True)
class BlockDeviceDestination:
    """A block device such as an attached Cinder volume (opened exclusively); zeroes via BLKZEROOUT."""

    path: Path
    reads_as_zero: bool

    @property
    def description(self) -> str:
        """For messages."""
        return f"block device {self.path}"

    @property
    def compare_target(self) -> str:
        """The device's path."""
        return str(self.path)

    def open(self) -> OpenDestination:
        """Open the device read-write and exclusively (fails if it is mounted)."""
        return _OpenDescriptor(self.path, block_device=True)


# ---- NBD exports -------------------------------------------------------------------------------------


class _NbdWriter:
    """One NBD connection per copy thread; ``flush`` covers the writes made on this connection."""

    def __init__(self, uri: str) -> None:
        self._handle = nbdlib.connect(uri)
        if self._handle.is_read_only():
            nbdlib.shutdown_quietly(self._handle)
            raise DestinationError(f"the NBD export {uri} is read-only", "export it writable")
        self._can_zero = self._handle.can_zero()
        self._can_flush = self._handle.can_flush()

    def write(self, offset: int, data: memoryview) -> None:
        self._handle.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = min(_NBD_MAX_ZERO if self._can_zero else _ZERO_CHUNK, end - offset)
            if self._can_zero:
                self._handle.zero(chunk, offset)
            else:
                self._handle.pwrite(memoryview(_ZEROES)[:chunk], offset)
            offset += chunk

    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self._handle.pread(len(view), offset)

    def flush(self) -> None:
        if self._can_flush:
            self._handle.flush()

    def close(self) -> None:
        nbdlib.shutdown_quietly(self._handle)


class _OpenNbd:
    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._writers: list[_NbdWriter] = []
        self._lock = threading.Lock()
        self._spare: _NbdWriter | None = self._new_writer()  # also serves the first writer() call
        self._size = self._spare._handle.get_size()

    def _new_writer(self) -> _NbdWriter:
        try:
            writer = _NbdWriter(self._uri)
        except nbdlib.error_type() as error:
            raise DestinationError(
                f"cannot connect to the destination NBD export {self._uri}: {error}",
                "check that the NBD server is running and the URI is right",
            ) from error
        with self._lock:
            self._writers.append(writer)
        return writer

    @property
    def size(self) -> int:
        return self._size

    def writer(self) -> DestinationWriter:
        with self._lock:
            spare, self._spare = self._spare, None
        return spare or self._new_writer()

    def close(self) -> None:
        with self._lock:
            writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()


@dataclass(frozen=True)
class NbdDestination:
    """A writable NBD export (e.g. nbdkit serving a volume on another host)."""

    uri: str
    reads_as_zero: bool

    @property
    def description(self) -> str:
        """For messages."""
        return f"NBD export {self.uri}"

    @property
    def compare_target(self) -> str:
        """The export's URI."""
        return self.uri

    def open(self) -> OpenDestination:
        """Connect (one connection per copy thread is opened later)."""
        return _OpenNbd(self.uri)
