#!/usr/bin/env bash
# Tensor-parallel gguf-serve: N processes under torchrun, each holding 1/N of every layer.
# Rank 0 binds the HTTP/gRPC ports, schedules and samples; ranks > 0 follow its steps.
#
#   scripts/launch_torchrun.sh N [gguf-serve flags...]
#   scripts/launch_torchrun.sh 2 -m model.gguf --device cuda --port 8080
#
# NCCL with --device cuda (rank r on GPU -mg + r), gloo on the CPU. Extra torchrun flags
# (multi-node: --nnodes, --rdzv-endpoint, ...) replace the default --standalone through
# $TORCHRUN_ARGS; $PYTHON picks the interpreter.
#
# SIGTERM to torchrun reaches every rank: rank 0 drains (--shutdown-timeout, default 30 s)
# while the other ranks keep following its steps, then all exit 0. torchrun kills ranks
# still running 30 s after it forwarded the signal, so keep --shutdown-timeout under ~25 s
# here if in-flight requests should end cleanly rather than be killed.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NPROC [gguf-serve flags...]" >&2
    exit 2
fi
nproc=$1
shift
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${PYTHON:-python3}" -m torch.distributed.run ${TORCHRUN_ARGS:---standalone} --nproc-per-node "$nproc" \
    -m http_api.server "$@"
