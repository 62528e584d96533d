#!/usr/bin/env bash
# Measures gguf-serve next to llama.cpp on this machine, now: llama-bench beside
# scripts/bench.py (prompt 512, decode; prompts again under --gemm-dtype int8), then
# llama-server and gguf-serve in turn under the same streaming client
# (scripts/bench_http.py, 1 and 8 clients).
#
# llama.cpp is built from the source llama-cpp-python ships (pip download of its sdist),
# outside the repository, in ~/.cache/gguf-serve/llama.cpp (the first run: ~20-30 min on
# 2 cores). Machines differ by 2x from one day to the next here: compare only figures
# taken in the same run.
#
# Usage: scripts/compare_llama_cpp.sh [-m model.gguf] [-t threads] [-- flags for bench.py and gguf-serve,
#        such as --decode-dtype float32]
set -euo pipefail
source "$(dirname "$0")/install.sh"
ensure_env ""

MODEL="" THREADS=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        -m) MODEL="$2"; shift 2 ;;
        -t) THREADS="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PY="$VENV/bin/python"
[[ -n "$MODEL" ]] || MODEL="$("$PY" -c 'from runtime.default_model import default_model_path; print(default_model_path())')"

LC="${XDG_CACHE_HOME:-$HOME/.cache}/gguf-serve/llama.cpp"
BIN="$LC/src/vendor/llama.cpp/build/bin"
if [[ ! -x "$BIN/llama-server" || ! -x "$BIN/llama-bench" ]]; then
    mkdir -p "$LC"
    "$PY" -m pip download --no-binary :all: --no-deps -d "$LC" llama-cpp-python >&2
    rm -rf "$LC/src" && mkdir -p "$LC/src"
    tar xzf "$(ls -t "$LC"/llama_cpp_python-*.tar.gz | head -1)" -C "$LC/src" --strip-components 1
    (cd "$LC/src/vendor/llama.cpp" \
        && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2 \
        && cmake --build build --target llama-bench llama-server -j "$(nproc)" >&2)
fi

echo "== llama-bench (llama.cpp), -t $THREADS"
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r 3
echo "== scripts/bench.py (gguf-serve engine), --threads $THREADS $*"
"$PY" scripts/bench.py -m "$MODEL" --threads "$THREADS" --clients "" --repeats 3 "$@"
echo "== scripts/bench.py, prompts with --gemm-dtype int8 (llama.cpp's own prompt numerics)"
"$PY" scripts/bench.py -m "$MODEL" --threads "$THREADS" --clients "" --repeats 3 --decode-tokens 8 "$@" --gemm-dtype int8

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
serve_and_measure() {  # name, command...
    local name="$1"; shift
    "$@" > "$LC/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 240); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
        sleep 0.5
    done
    echo "== $name: scripts/bench_http.py, 1 and 8 clients"
    "$PY" scripts/bench_http.py --url "http://127.0.0.1:$PORT" --clients 1,8
    kill "$pid"
    wait "$pid" 2> /dev/null || true
}
serve_and_measure llama-server "$BIN/llama-server" -m "$MODEL" --port "$PORT" -np 8 -t "$THREADS" -c 4096
serve_and_measure gguf-serve "$VENV/bin/gguf-serve" -m "$MODEL" --port "$PORT" -np 8 -t "$THREADS" -c 4096 \
    --grpc-port 0 "$@"
