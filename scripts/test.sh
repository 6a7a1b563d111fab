#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long checks; the default selection, `-m 'not slow'`,
# is in pyproject.toml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m pytest "$@"
