"""--mlock: the weights' pages locked in RAM, or a warning that says why not."""

from __future__ import annotations

import ctypes
import logging

import pytest

from runtime import memory_lock
from runtime.loader import load_model


@pytest.fixture
def unlock_after():
    yield
    libc = ctypes.CDLL(None)
    libc.munlockall()


def test_mapped_weights_are_locked(llama3_tiny_path, unlock_after):
    if memory_lock.lock_region(0, 0) is not None:  # mlock of nothing: tells whether mlock exists here
        pytest.skip("no mlock on this platform")
    before = memory_lock.locked_bytes()
    loaded = load_model(llama3_tiny_path, mlock=True)
    size = loaded.gguf.mapping[1]
    assert memory_lock.locked_bytes() - before >= size - 4096  # the whole file map, to a page


def test_a_refused_lock_is_a_warning_not_a_failure(llama3_tiny_path, monkeypatch, caplog):
    import runtime.loader as loader

    monkeypatch.setattr(loader, "lock_region", lambda addr, length: "Cannot allocate memory (raise `ulimit -l`)")
    with caplog.at_level(logging.WARNING, logger="runtime.loader"):
        loaded = load_model(llama3_tiny_path, mlock=True)
    assert loaded.model is not None
    assert "could not lock the model in memory: Cannot allocate memory" in caplog.text
