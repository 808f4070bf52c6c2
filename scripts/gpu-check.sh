#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds with `--features cuda`, runs the tests that
# use the GPU (the library's tests, where `--device auto` takes the GPU, and the gRPC
# API and Train tests with their in-process servers forced onto it with FUSION_DEVICE=cuda),
# then examples/gpu_parity.rs: GPU vs CPU outputs of the built-in model on the same
# inputs (fails over 1e-4 in f32) and Predict-path throughput at batch 1, 8, 32, 64.
# A few minutes once built (a cold build is ~15 min on 2 cores, less on more).
#
# Toolkit: a system CUDA (nvcc on PATH or in $CUDA_HOME/bin) if there is one, else the
# PyPI wheels set up by scripts/check-cuda-build.sh (needs the driver for CUDA 13,
# >= 580). The real driver's libcuda.so.1 is used at run time, never the link stub.
#
#   scripts/gpu-check.sh                 # everything
#   SKIP_TESTS=1 scripts/gpu-check.sh    # parity and throughput only
#   PARITY_ARGS="--data /path/to/av-digits --seconds 1" scripts/gpu-check.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: no NVIDIA driver here" >&2; exit 1; }
nvidia-smi -L | grep -q GPU || { echo "gpu-check: nvidia-smi lists no GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
fi
export CUDA_COMPUTE_CAP
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-$root/target/cuda}

if command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH="$CUDA_HOME/bin:$PATH"
  export LD_LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  log "system CUDA toolkit: $(command -v nvcc)"
else
  log "no system nvcc: using the PyPI toolkit (scripts/check-cuda-build.sh)"
  # shellcheck source=scripts/check-cuda-build.sh
  SETUP_ONLY=1 source "$root/scripts/check-cuda-build.sh"
fi
nvcc --version | tail -n2
log "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

log "build: cargo build --release --features cuda --bins --example gpu_parity"
cargo build --release --features cuda --bins --example gpu_parity

if [ -z "${SKIP_TESTS:-}" ]; then
  log "tests on the GPU: library tests, then gRPC API tests with FUSION_DEVICE=cuda"
  cargo test --release --features cuda --lib
  FUSION_DEVICE=cuda cargo test --release --features cuda --test grpc_api
  # Train runs on the serving device: the Train tests, with the servers on the GPU.
  FUSION_DEVICE=cuda cargo test --release --features cuda --test train
fi

log "parity and throughput: examples/gpu_parity.rs"
# shellcheck disable=SC2086
"$CARGO_TARGET_DIR/release/examples/gpu_parity" ${PARITY_ARGS:-}
log "OK ($(( $(date +%s) - start ))s)"
