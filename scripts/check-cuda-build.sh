#!/usr/bin/env bash
# Checks that the `cuda` cargo feature compiles and links, on a machine with no GPU
# and no system CUDA toolkit: nvcc and the CUDA libraries come from NVIDIA's PyPI
# wheels (CUDA 13.x) in a venv under target/, and the driver library (libcuda.so,
# which only ships with the NVIDIA driver) is replaced at link time by a stub.
#
# Idempotent: a second run reuses the venv, the links, the stub and the build.
#
#   scripts/check-cuda-build.sh                    # cuda, release, all targets
#   FEATURES=cudnn scripts/check-cuda-build.sh     # cuDNN as well
#   CARGO_TARGETS=--bins scripts/check-cuda-build.sh
#   CUDA_COMPUTE_CAP=80 scripts/check-cuda-build.sh
#   SETUP_ONLY=1 . scripts/check-cuda-build.sh      # (sourced) just set the env up
#
# Output: target/cuda-venv (about 2 GB of wheels), target/cuda (the build).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

FEATURES=${FEATURES:-cuda}
CARGO_TARGETS=${CARGO_TARGETS:---all-targets}
PROFILE_FLAG=${PROFILE_FLAG:---release}
venv=${CUDA_VENV:-$root/target/cuda-venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-$root/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

log() { printf '[check-cuda-build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)

# 1. The toolkit, from PyPI.
wheels=(nvidia-cuda-nvcc nvidia-cuda-cccl nvidia-cuda-runtime nvidia-cublas
        nvidia-curand nvidia-cuda-nvrtc)
case ",$FEATURES," in *,cudnn,*) wheels+=(nvidia-cudnn-cu13) ;; esac
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(printf '%s\n' "${wheels[@]}" | sort | tr '\n' '+')"
if [ ! -f "$stamp" ]; then
  log "installing wheels: ${wheels[*]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"
  touch "$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CUDA_HOME="$site/nvidia/cu13"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc at $CUDA_HOME/bin/nvcc" >&2; exit 1; }
export PATH="$CUDA_HOME/bin:$PATH"

# 2. Plain-named links (the wheels ship only libfoo.so.N; `-lfoo` needs libfoo.so).
for lib in "$CUDA_HOME"/lib/lib*.so.*; do
  [ -e "$lib" ] || continue
  base=$(basename "$lib"); plain="${base%%.so.*}.so"
  [ -e "$CUDA_HOME/lib/$plain" ] || ln -s "$base" "$CUDA_HOME/lib/$plain"
done
if [ -d "$site/nvidia/cudnn/lib" ]; then
  export CUDNN_LIB="$site/nvidia/cudnn"
  for lib in "$CUDNN_LIB"/lib/lib*.so.*; do
    base=$(basename "$lib"); plain="${base%%.so.*}.so"
    [ -e "$CUDNN_LIB/lib/$plain" ] || ln -s "$base" "$CUDNN_LIB/lib/$plain"
  done
fi
export LD_LIBRARY_PATH="$CUDA_HOME/lib${CUDNN_LIB:+:$CUDNN_LIB/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 3. cudarc pins the CUDA version it binds to; it knows up to 13.4, so a newer nvcc
#    is bound as 13.4 (the driver API is backward compatible).
nvcc_ver=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r major minor <<<"$nvcc_ver"
if [ -z "${CUDARC_CUDA_VERSION:-}" ]; then
  if [ "$major" -gt 13 ] || { [ "$major" -eq 13 ] && [ "$minor" -gt 4 ]; }; then
    CUDARC_CUDA_VERSION=13040
  else
    CUDARC_CUDA_VERSION=$(printf '%d0%d0' "$major" "$minor")
  fi
fi
export CUDARC_CUDA_VERSION
log "nvcc $major.$minor, CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
log "CUDA_HOME=$CUDA_HOME"

# 4. Stub libcuda.so for the link (lib/stubs is on cudarc's link search path).
cargo fetch --quiet
cudarc_ver=$(awk '/^name = "cudarc"$/{getline; gsub(/"/,"",$3); print $3}' Cargo.lock)
cudarc_src=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 2 -type d \
  -name "cudarc-$cudarc_ver" | head -n1)
[ -n "$cudarc_src" ] || { echo "cudarc $cudarc_ver sources not found after cargo fetch" >&2; exit 1; }
if [ ! -f "$CUDA_HOME/lib/stubs/libcuda.so" ] \
   || [ "$root/scripts/cuda/make-libcuda-stub.sh" -nt "$CUDA_HOME/lib/stubs/libcuda.so" ]; then
  bash "$root/scripts/cuda/make-libcuda-stub.sh" "$cudarc_src" "$CUDA_HOME/lib/stubs"
fi

if [ -n "${SETUP_ONLY:-}" ]; then
  log "environment ready (SETUP_ONLY)"
  # shellcheck disable=SC2317  # `exit` is reached when the script is run, not sourced
  return 0 2>/dev/null || exit 0
fi

# 5. Build.
log "cargo build $PROFILE_FLAG --features $FEATURES $CARGO_TARGETS (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
# shellcheck disable=SC2086  # CARGO_TARGETS may hold several flags
cargo build "$PROFILE_FLAG" --features "$FEATURES" $CARGO_TARGETS
log "OK: --features $FEATURES builds and links ($(( $(date +%s) - start ))s)"
