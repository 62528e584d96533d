"""Keeping the model's pages in RAM (llama.cpp's --mlock): mlock of the file's map, else mlockall."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MCL_CURRENT = 1  # <sys/mman.h>: every page mapped now


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _reason() -> str:
    err = ctypes.get_errno()
    hint = " (raise `ulimit -l` or grant CAP_IPC_LOCK)" if err in (1, 11, 12) else ""  # EPERM, EAGAIN, ENOMEM
    return f"{os.strerror(err)}{hint}"


def lock_region(address: int, length: int) -> str | None:
    """mlock [address, address + length): None when locked, else why not."""
    try:
        rc = _libc().mlock(ctypes.c_void_p(address), ctypes.c_size_t(length))
    except (OSError, AttributeError) as e:  # no libc with mlock here
        return str(e)
    return None if rc == 0 else _reason()


def lock_all_current() -> str | None:
    """mlockall(MCL_CURRENT): every page the process maps now (weights copied into memory)."""
    try:
        rc = _libc().mlockall(ctypes.c_int(MCL_CURRENT))
    except (OSError, AttributeError) as e:
        return str(e)
    return None if rc == 0 else _reason()


def locked_bytes() -> int:
    """VmLck of this process (Linux), in bytes; 0 where /proc says nothing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
