"""Wake an asyncio loop when files in a directory change: Linux inotify via ctypes.

Used by WalReader.wait_for so a tailing process sleeps until the writer writes,
instead of polling. ``DirWatcher.open`` returns None where inotify is missing
(not Linux, no libc symbol, watch limit reached); callers then poll slowly.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


class DirWatcher:
    """Sets ``changed`` whenever a file in the directory is modified or created."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self.loop = loop
        self.changed = asyncio.Event()
        loop.add_reader(fd, self._on_readable)

    @classmethod
    def open(cls, directory: Path, loop: asyncio.AbstractEventLoop) -> DirWatcher | None:
        lib = _libc()
        if lib is None:
            return None
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        wd = lib.inotify_add_watch(fd, os.fsencode(directory), IN_MODIFY | IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            os.close(fd)
            return None
        return cls(fd, loop)

    def _on_readable(self) -> None:
        # Drain every queued event; what changed does not matter, only that something did.
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError:
            self.close()
        self.changed.set()

    def close(self) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
