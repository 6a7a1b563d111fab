#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long checks; the default selection, `-m 'not slow'`,
# is in pyproject.toml). Tests run on $FLUXJAX_TEST_WORKERS processes (default 2; pytest-xdist, each
# test file on one worker, so that a file's fixtures are built once); FLUXJAX_TEST_WORKERS=0 runs them
# in this process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
workers="${FLUXJAX_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m pytest "$@"
fi
exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
