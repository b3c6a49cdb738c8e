#!/usr/bin/env bash
# Install the app and the test tools (first run only), then lint and run every test.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k generation
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh --dev
export PATH="$PWD/installer_files/env/bin:$PATH"
ruff check .
lint-imports
python -m pytest "$@"
