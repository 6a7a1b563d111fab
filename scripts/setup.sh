#!/usr/bin/env bash
# Creates .venv (once) and installs fluxjax with the PyTorch reference stack.
# torch's CPU build goes in first: installing diffusers without it would pull a multi-GB CUDA build.
# The package installs the library (fluxjax) alone; a path file puts the checkout's own folders
# (experiments, organisms, flux2ref, conversion, benchmarks) on the venv's path, so that they import
# from any directory.
# Re-running is cheap: a stamp file records the hash of what was installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLUXJAX_VENV:-$root/.venv}"
stamp="$venv/.fluxjax-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e "$root[reference,experiments,judge,test]"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root" > "$site/fluxjax-checkout.pth"
echo "$want" > "$stamp"
