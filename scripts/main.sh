#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the study's five experiments on a subset of the
# colour bucket with both committed model organisms (direct, text-routed), block sweeps and the
# study's table (runs/main/report.html), and exactly the study's colour cells (run_all --study,
# runs/main-study/report.html).
# Arguments pass through to the first run, e.g.
# `bash scripts/main.sh --model /models/FLUX.2-klein-9B --out runs/klein9b` (then the study run is skipped:
# run `python -m experiments.run_all --study ...` with the same model).
# (The parity demonstration against diffusers is `python -m flux2ref.demo`.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
python="${FLUXJAX_VENV:-$root/.venv}/bin/python"
"$python" -m experiments.run_all "$@"
if [ "$#" -eq 0 ]; then
    "$python" -m experiments.run_all --study --out runs/main-study
fi
