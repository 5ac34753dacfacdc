"""A sequential file writer for multi-GB outputs: bytes are gathered in large page-aligned blocks that a background
thread writes with ``O_DIRECT`` where the filesystem allows it.

Why: on this kind of machine (a virtual disk) buffered writes of a 2 GB file followed by ``fsync`` ran at
0.2-0.37 GB/s (writeback trickles the page cache out in small pieces) while 16 MB direct writes of the same bytes
ran at 1-2.5 GB/s (measured with dd and this class); and output nobody is about to read no longer evicts the page
cache. The producer keeps
working while the thread waits on the disk (``os.write`` releases the GIL). Durability is unchanged: the file is
still ``fsync``-ed before the caller renames it into place. Where ``O_DIRECT`` is refused (tmpfs, some network
filesystems, a non-Linux OS) the same blocks are written through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from pathlib import Path

import numpy as np

BLOCK_BYTES = 16 << 20
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's block (<= 4096)
O_DIRECT = getattr(os, "O_DIRECT", 0)


class SequentialWriter:
    """``write(bytes-like)`` appends; ``close()`` flushes, trims the aligned tail, fsyncs; ``abort()`` gives up."""

    def __init__(self, path: str | Path, *, block_bytes: int = BLOCK_BYTES, buffers: int = 3, direct: bool = True,
                 mode: int = 0o644):
        if block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a multiple of {ALIGN}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = bool(direct and O_DIRECT)
        try:
            self._fd = os.open(path, flags | (O_DIRECT if self.direct else 0), mode)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self.direct = False
            self._fd = os.open(path, flags, mode)
        self._block = block_bytes
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(buffers):  # anonymous mappings are page-aligned
            self._free.put(np.frombuffer(mmap.mmap(-1, block_bytes), dtype=np.uint8))
        self._full: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._cur = self._free.get()
        self._fill = 0
        self.size = 0
        self._thread = threading.Thread(target=self._drain, name="dsbuild-writer", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        view = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        while len(view):
            n = min(len(view), self._block - self._fill)
            self._cur[self._fill:self._fill + n] = view[:n]  # a numpy copy releases the GIL
            self._fill += n
            self.size += n
            view = view[n:]
            if self._fill == self._block:
                self._hand_over()

    def _hand_over(self) -> None:
        self._full.put((self._cur, self._fill))
        self._cur, self._fill = self._free.get(), 0
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self._write_all(memoryview(buf)[: -(-n // ALIGN) * ALIGN if self.direct else n])
            except BaseException as e:  # handed to the producer at its next block or at close()
                self._error = e
            finally:
                self._free.put(buf)

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                # The filesystem opened the file for direct I/O but refuses these writes: go through the page cache.
                # Only whole aligned blocks were written so far, so the file offset is still where it should be.
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
                self.direct = False
                continue
            view = view[n:]

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def close(self) -> None:
        """Write what is left, cut the direct-I/O padding off the end and fsync; raises any write error."""
        try:
            if self._fill:
                self._full.put((self._cur, self._fill))
                self._fill = 0
            self._stop()
            if self._error is not None:
                raise self._error
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SequentialWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
