"""Shared fixtures: the default model (assembled from its package once), the llama3-tiny reference model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU), so their
# tests check the same kernel code; it must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from runtime.default_model import default_model_path as path

    return path()


@pytest.fixture(scope="session")
def llama3_tiny_path() -> Path:
    """Random-weight Llama with the real Llama 3 vocabulary; llama.cpp's outputs on it are in tests/data."""
    return DATA / "llama3_tiny_f32.gguf"


@pytest.fixture(scope="session")
def default_engine(default_model_path):
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    return Engine(EngineConfig(model_path=str(default_model_path), n_ctx=1024))


@pytest.fixture(scope="module")
def loaded(llama3_tiny_path):
    """llama3-tiny loaded once per test module (modules may define their own)."""
    from runtime.loader import load_model

    return load_model(llama3_tiny_path)


# -- the compiled CPU kernels (tests of runtime/ops) ----------------------------------------


@pytest.fixture(scope="module")
def kernels():
    """The compiled CPU kernels' module, registered as the ops' CPU implementation."""
    from runtime import ops
    from runtime.ops.cpu_extension import load

    ops.use_cpu_kernels()
    return load()


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request, kernels):
    """Each ISA build of the kernels this CPU can run, in turn."""
    runnable = list(kernels.use_isa(""))
    if request.param not in runnable:
        pytest.skip(f"this CPU cannot run the {request.param} build")
    kernels.use_isa(request.param)
    yield request.param
    kernels.use_isa(runnable[0])
