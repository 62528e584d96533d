# Sourced by scripts/serve, scripts/test and the Dockerfile: makes a virtualenv with
# gguf-serve installed, taking a CPU build of torch unless a CUDA GPU is present.
#   ensure_env [EXTRA]   EXTRA: "" (runtime only) or "test"
# GGUF_SERVE_VENV picks the virtualenv (default: .venv in the repository); GGUF_SERVE_TORCH
# = auto (CUDA build when a GPU is present) | cuda | cpu picks the torch build.

_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GGUF_SERVE_VENV:-$_repo_root/.venv}"
TORCH_VERSION="2.13.0"

_log() { echo "[install] $*" >&2; }

_install_torch() {
    local py="$VENV/bin/python"
    if "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
        return 0
    fi
    local want="${GGUF_SERVE_TORCH:-auto}"
    # 1. A local wheel (these machines keep the CPU build in pip's find-links): torch itself
    #    from disk, then its small dependencies from the index (torch is already satisfied).
    if [ "$want" != cuda ] && "$py" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        _log "torch $TORCH_VERSION from a local wheel"
        "$py" -m pip install -q "torch==$TORCH_VERSION"; return
    fi
    # 2. With an NVIDIA GPU (or GGUF_SERVE_TORCH=cuda: a CUDA image built on a machine
    #    without one), the registry's default (CUDA) build is what we want.
    if [ "$want" = cuda ] || { [ "$want" = auto ] && command -v nvidia-smi >/dev/null 2>&1 \
            && nvidia-smi -L >/dev/null 2>&1; }; then
        _log "installing the CUDA build of torch $TORCH_VERSION"
        "$py" -m pip install -q "torch==$TORCH_VERSION"; return
    fi
    # 3. No GPU: PyTorch's CPU index, so no CUDA packages are pulled.
    _log "no GPU: installing the CPU build of torch $TORCH_VERSION"
    "$py" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
}

ensure_env() {
    local extra="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        _log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    _install_torch
    local spec="$_repo_root"
    [ -n "$extra" ] && spec="$_repo_root[$extra]"
    local stamp="$VENV/.gguf-serve-installed${extra:+-$extra}"
    # Reinstall when pyproject.toml changed since the last install.
    if [ ! -f "$stamp" ] || [ "$_repo_root/pyproject.toml" -nt "$stamp" ]; then
        _log "installing gguf-serve${extra:+[$extra]}"
        "$VENV/bin/python" -m pip install -q -e "$spec"
        touch "$stamp"
    fi
    # The quantized-weight CPU kernels (C++), compiled once into the user's cache (~40 s the
    # first time, nothing afterwards); a failure here is reported, and --weights dense still works.
    "$VENV/bin/python" -m runtime.ops.cpu_extension >/dev/null \
        || _log "could not build the CPU kernels: only --weights dense will work"
}

# The web page's browser test (tests/test_webui_browser.py) drives Debian's Chromium through
# Playwright (no browser download). Installed here when it is missing and this user can:
# root with apt-get. Never fatal: without it the test skips, or fails when CI is set.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        _log "no chromium, and no root apt-get to install it: the browser test will skip"
        return 0
    fi
    _log "installing Debian's chromium for the browser test (apt-get, about a minute)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
        _log "could not install chromium: the browser test will skip (and fail under CI)"
    fi
    return 0
}
