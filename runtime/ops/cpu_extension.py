"""The compiled CPU kernels (csrc/*.cpp), built once per source version into the user's cache."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from runtime.default_model import cache_dir
from runtime.errors import GGUFServeError

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
COMPILED = ("quant_cpu.cpp", "fused_cpu.cpp", "norm_cpu.cpp", "decode_layer.cpp", "prompt_attention.cpp")  # translation units; the .h files are included
# -ffp-contract=off: no fused multiply-adds in dequantization, so blocks match the torch
# reference bit for bit; -fopenmp-simd: `omp simd` vectorization hints only (threads are
# work_pool.h's, not an OpenMP runtime's).
CFLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-pthread"]


class KernelBuildError(GGUFServeError):
    """The C++ kernels could not be compiled or loaded here."""


def sources() -> list[Path]:
    """Every file of csrc/ (translation units and the headers they include), in name order."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def build_dir() -> Path:
    """Where the compiled module lives: keyed by the sources, their folder and torch's version."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    # cpp_extension rebuilds when the sources' paths change: two checkouts, two folders
    h.update(str(CSRC).encode())
    for path in sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return cache_dir() / "ops" / h.hexdigest()[:16]


def _find_ninja() -> None:
    """cpp_extension runs `ninja` from PATH: add this interpreter's bin directory, where the
    `ninja` dependency installs it, for a venv used without activation (CI, `.venv/bin/gguf-serve`)."""
    if shutil.which("ninja") is None:
        bindir = str(Path(sys.executable).parent)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load(verbose: bool = False) -> ModuleType:
    """Compile (first time, ~1 min) or load the kernels; KernelBuildError when the toolchain fails."""
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    _find_ninja()
    try:
        # One builder at a time, by an flock the OS releases if its holder dies. cpp_extension's
        # own lock is a file that a builder killed mid-build leaves behind, on which every later
        # start would wait forever; holding the flock, no builder is alive, so it is stale.
        with open(out / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = out / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that was killed", stale)
                stale.unlink()
            module: ModuleType = cpp_extension.load(
                name="gguf_serve_quant_cpu",
                sources=[str(CSRC / name) for name in COMPILED],
                extra_cflags=CFLAGS,
                extra_ldflags=["-pthread"],
                build_directory=str(out),
                verbose=verbose,
            )
    except (OSError, RuntimeError, ImportError) as e:  # compiler missing, ninja missing, build failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise KernelBuildError(
            f"could not build the CPU kernels in {out} ({first}); "
            "install a C++ compiler or start with --weights dense"
        ) from e
    log.info("quantized CPU kernels: %s build from %s", module.isa(), out)
    return module


if __name__ == "__main__":  # `python -m runtime.ops.cpu_extension`: build at install time
    logging.basicConfig(level=logging.INFO)
    print(f"CPU kernels ready ({load(verbose=True).isa()}) in {build_dir()}")
