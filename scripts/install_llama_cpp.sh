#!/usr/bin/env bash
# Install llama-cpp-python into the given Python, built for this machine.
#
# llama-cpp-python ships no wheels on PyPI, so it is compiled from source (6-7 minutes
# on 2 cores). The wheel is cached outside the repository, keyed by version and build
# flags, so the second install on the same machine takes seconds.
#
# The default build uses -march=native, which enables AMX on recent Xeons; ggml's AMX
# kernels die with SIGILL there (llama.cpp #28756), so we build with explicit ISA
# switches instead and only turn on what /proc/cpuinfo shows.
#
# Usage: scripts/install_llama_cpp.sh PYTHON cpu|cuda|metal
set -euo pipefail

PY=${1:?usage: install_llama_cpp.sh PYTHON cpu|cuda|metal}
KIND=${2:-cpu}
VERSION=0.3.36
CACHE=${LLM_WHEEL_CACHE:-$HOME/.cache/llm-workbench/wheels}

flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ -r /proc/cpuinfo ]; then
  has() { grep -qw "$1" /proc/cpuinfo; }
  has avx && flags+=" -DGGML_AVX=ON"
  has avx2 && flags+=" -DGGML_AVX2=ON"
  has fma && flags+=" -DGGML_FMA=ON"
  has f16c && flags+=" -DGGML_F16C=ON"
  if has avx512f && has avx512bw && has avx512vl; then
    flags+=" -DGGML_AVX512=ON"
    has avx512_vnni && flags+=" -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && flags+=" -DGGML_AVX512_BF16=ON"
    has avx512vbmi && flags+=" -DGGML_AVX512_VBMI=ON"
  fi
fi
case "$KIND" in
  cuda) flags+=" -DGGML_CUDA=ON" ;;
  metal) flags="-DGGML_METAL=ON" ;;
  cpu) ;;
  *) echo "unknown build kind: $KIND (cpu, cuda or metal)" >&2; exit 2 ;;
esac

key=$(printf '%s %s %s' "$VERSION" "$KIND" "$flags" | sha256sum | cut -c1-12)
dir="$CACHE/llama-cpp-python-$VERSION-$KIND-$key"
if ! ls "$dir"/*.whl >/dev/null 2>&1; then
  echo "Building llama-cpp-python $VERSION ($KIND) - this takes several minutes once."
  echo "CMAKE_ARGS=$flags"
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  CMAKE_ARGS="$flags" "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$dir.partial"
  rm -rf "$dir" && mv "$dir.partial" "$dir"
fi
"$PY" -m pip install --no-deps --force-reinstall "$dir"/*.whl
