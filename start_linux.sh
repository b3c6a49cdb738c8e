#!/usr/bin/env bash
# One click: install what this machine needs (first run only), then start the web UI.
# server.py reads CMD_FLAGS.txt itself; arguments given here come after those flags and win.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
# The packages of the extensions settings.yaml / CMD_FLAGS.txt / these arguments enable (once each);
# a failure leaves that extension disabled, with the reason in the log, and the UI still starts.
installer_files/env/bin/python scripts/install_extensions.py --enabled "$@" \
  || echo "Some extensions' packages did not install: those extensions stay disabled." >&2
exec installer_files/env/bin/python server.py "$@"
