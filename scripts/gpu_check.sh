#!/usr/bin/env bash
# The GPU checks of the GPU loaders (pytest -m gpu), in one short run on a CUDA machine.
#
#   scripts/gpu_check.sh fetch          # here, with PyPI: wheels the GPU machine lacks -> .whl/
#   scripts/gpu_check.sh run [TESTS..]  # there: install .whl/ (if any), build exllamav2's CUDA
#                                       # extension, run pytest -m gpu -s, results into $OUT
#
# `run` uses installer_files/env/bin/python when this checkout was installed on a GPU machine
# (start_linux.sh put requirements-cuda.txt in), else the system python3 with the wheels from
# `fetch` (a machine that cannot reach PyPI, such as the lent GPU machine, whose python3
# already holds torch, transformers, pandas, pytest and ninja). TESTS default to the ExLlamaV2
# tests. Logs and a summary go to $OUT (default test-artifacts/gpu); docs/GPU.md says what to
# copy from them.
set -uo pipefail
cd "$(dirname "$0")/.."

# Wheels for a CPython 3.12 x86-64 machine: exllamav2 (pure Python) and what its converter
# and loader import that the GPU machine's image does not have.
WHEELS=(exllamav2==0.3.2 fastparquet==2026.9.0 cramjam==2.14.0)
DEFAULT_TESTS=(tests/test_exllamav2_loader.py)

fetch() {
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -l .whl
}

run() {
  local out=${OUT:-test-artifacts/gpu}
  mkdir -p "$out"
  local py=python3
  [ -x installer_files/env/bin/python ] && py=installer_files/env/bin/python
  if [ "$py" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing .whl/ failed" | tee "$out/summary.txt"; return 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  {
    date -u +"date: %Y-%m-%dT%H:%MZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
    command -v nvcc >/dev/null && nvcc --version | tail -1
  } 2>&1 | tee "$out/summary.txt"
  # exllamav2 compiles its extension at first import (minutes, once per machine): time it
  # apart from the tests so a test's timeout never includes it.
  local start=$SECONDS
  "$py" -c 'import exllamav2, exllamav2.ext; print("exllamav2", exllamav2.__version__, "extension ready")' \
    >"$out/extension_build.log" 2>&1
  local rc=$?
  echo "extension build: rc $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  if [ $rc -ne 0 ]; then tail -40 "$out/extension_build.log"; return $rc; fi
  # --noconftest: the shared fixtures build the app and the tiny GGUF kit, which the gpu tests
  # do not use (and whose packages the GPU machine may lack).
  local tests=("$@")
  [ ${#tests[@]} -eq 0 ] && tests=("${DEFAULT_TESTS[@]}")
  "$py" -m pytest --noconftest -p no:cacheprovider -m gpu -s -o timeout=900 -rA "${tests[@]}" 2>&1 | tee "$out/pytest.log"
  rc=${PIPESTATUS[0]}
  grep -E '^\[|passed|failed|skipped|error' "$out/pytest.log" | tail -20 >>"$out/summary.txt"
  # Keep the built extension when it is small enough to bring back and carry next time.
  local ext
  ext=$(find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name 'exllamav2_ext*.so' 2>/dev/null | head -1)
  if [ -n "$ext" ] && [ "$(stat -c %s "$ext")" -lt 16000000 ]; then cp "$ext" "$out/"; fi
  echo "pytest rc $rc" | tee -a "$out/summary.txt"
  return "$rc"
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 fetch | run [TESTS...]" >&2; exit 2 ;;
esac
