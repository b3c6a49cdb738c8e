#!/usr/bin/env bash
# One click: install what this machine needs (first run only), then start the web UI.
# server.py reads CMD_FLAGS.txt itself; arguments given here come after those flags and win.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
exec installer_files/env/bin/python server.py "$@"
