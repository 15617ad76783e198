#!/usr/bin/env bash
# Compile check of the CUDA rasterizer (splat_cuda.cu) on machines without a GPU.
#
# Compiles splat_cuda.cu to an object file with nvcc and the flags torch.utils.cpp_extension.load would use,
# against the torch and Python headers of the active python. Nothing is linked or run. A CPU-only torch
# wheel lacks the generated header c10/cuda/impl/cuda_cmake_macros.h, so a stub of it is put on the
# include path. Exits nonzero if compilation fails; exits 0 with a note if there is no nvcc.
#
# Run from anywhere:  bash .ci/check_cuda.sh        (NVCC=/path/to/nvcc and PYTHON=... override the defaults)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$nvcc" ]]; then
  echo "nvcc not found, skipping CUDA compile check"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Stub for the header that CMake generates in CUDA builds of torch (absent from CPU wheels).
mkdir -p "$work/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"

# Include paths and the nvcc flags torch passes to every extension (torch.utils.cpp_extension).
mapfile -t includes < <("$python" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print(path)
EOF
)
mapfile -t torch_flags < <("$python" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS; print('\n'.join(COMMON_NVCC_FLAGS))")

args=(-c "$repo/splat_cuda.cu" -o "$work/splat_cuda.o"
      -std=c++20 -O3 -arch=sm_80 --compiler-options -fPIC
      -DTORCH_EXTENSION_NAME=splat_cuda_ext -DTORCH_API_INCLUDE_EXTENSION_H
      "${torch_flags[@]}" -I "$work/stub")
for dir in "${includes[@]}"; do args+=(-isystem "$dir"); done

echo "$("$nvcc" --version | tail -n 1)"
echo "compiling splat_cuda.cu (sm_80) ..."
if "$nvcc" "${args[@]}"; then
  echo "OK: splat_cuda.cu compiles"
else
  echo "FAILED: splat_cuda.cu does not compile" >&2
  exit 1
fi
