"""glibc malloc's thresholds are raised for the server (runtime/allocator.py), and can be left alone."""

import subprocess
import sys

import pytest

from runtime.allocator import _glibc

SCRIPT = """
import ctypes, ctypes.util
from runtime.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
print(keep_freed_memory())
before = libc.mallinfo2().hblks
buf = libc.malloc(8 << 20)  # 8 MiB: an mmap of its own under glibc's default thresholds
print(libc.mallinfo2().hblks - before)
libc.free(buf)
"""


def _run(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env={**env, "PATH": "/usr/bin:/bin"}
    )
    return out.stdout.split()


@pytest.mark.skipif(not _glibc(), reason="glibc only (elsewhere keep_freed_memory is a no-op)")
def test_thresholds_are_set_on_glibc_unless_asked_not_to():
    import os

    env = {k: v for k, v in os.environ.items() if k != "GGUF_SERVE_MALLOC"}
    assert _run(env) == ["True", "0"]  # from the heap: its pages stay for the next step
    assert _run({**env, "GGUF_SERVE_MALLOC": "default"}) == ["False", "1"]
