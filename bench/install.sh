#!/usr/bin/env bash
# Tools the benchmark needs beyond the service's own dependencies; safe to run again.
#   wrk (Debian package): the HTTP load generator, driven by bench/load/wrk/*.lua
#   matplotlib, py-spy (PyPI, into the project's venv): plots and the profile of the service
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v wrk >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi

if ! "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1 || [ ! -x "$VENV/bin/py-spy" ]; then
    # python -m pip, not bin/pip: the latter's shebang names the venv it was made in, which
    # is another one in a copied venv (the helpers' working copies).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check matplotlib py-spy
fi
echo "bench tools ready: $(wrk -v 2>&1 | head -1)"
