#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the study's five experiments on a subset of the
# colour bucket with both committed model organisms (direct, text-routed) and writes
# runs/main/report.html, which puts the two side by side.
# Arguments pass through, e.g. `bash scripts/main.sh --model /models/FLUX.2-klein-9B --out runs/klein9b`.
# (The parity demonstration against diffusers is `python -m flux2ref.demo`.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FLUXJAX_VENV:-$root/.venv}/bin/python" -m experiments.run_all "$@"
