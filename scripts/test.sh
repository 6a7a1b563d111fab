#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long checks; the default selection, `-m 'not slow'`,
# is in pyproject.toml). Tests run on $FLUXJAX_TEST_WORKERS processes (default 2; pytest-xdist, each
# test file on one worker, so that a file's fixtures are built once); FLUXJAX_TEST_WORKERS=0 runs them
# in this process.
# `--fast` runs the fast tier instead: the library's own tests (tests/fluxjax) that run in the test
# process against JAX alone, that is without the slow ones, without those checked against a PyTorch
# reference (marker `parity`) and without those that start other processes (marker `processes`).
# It keeps JAX's persistent compilation cache in .cache/jax-fast-tier (set JAX_COMPILATION_CACHE_DIR
# to move it; at most 512 MiB): a rerun compiles only the programs that changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
if [ "${1:-}" = --fast ]; then
  shift
  set -- tests/fluxjax -m "not slow and not parity and not processes" "$@"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$root/.cache/jax-fast-tier}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
  # bounded: the least recently used entries go past 512 MiB (one run of the tier writes about 32 MiB)
  export JAX_COMPILATION_CACHE_MAX_SIZE="${JAX_COMPILATION_CACHE_MAX_SIZE:-536870912}"
fi
workers="${FLUXJAX_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m pytest "$@"
fi
exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
