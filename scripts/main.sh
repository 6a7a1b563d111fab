#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the demonstration.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m flux2ref.demo "$@"
