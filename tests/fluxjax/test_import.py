"""Importing any module of `fluxjax` (its `conversion` subpackage included), the `conversion` front or
`flux2ref` imports neither torch, diffusers nor transformers (`flux2ref` and `fluxjax.text` import them inside the functions that need them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.processes  # every test here starts a Python process

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKED = ("torch", "diffusers", "transformers")
# Prepended to each child script: a meta-path finder that refuses every BLOCKED package.
BLOCKER = f"""import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} must not be imported here")
        return None

sys.meta_path.insert(0, Refuse())
"""


def test_library_imports_without_torch_or_diffusers():
    script = BLOCKER + textwrap.dedent(f"""
        import importlib, pkgutil
        import fluxjax, conversion, flux2ref
        for package in (fluxjax, conversion, flux2ref):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        import fluxjax.conversion.__main__, conversion.__main__
        pulled = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        assert not pulled, pulled
        print("clean")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]


def test_the_blocker_blocks():
    """Guards the test above: the same finder does stop a torch import."""
    script = BLOCKER + textwrap.dedent(f"""
        import flux2ref.models
        try:
            flux2ref.models.diffusers_transformer()
        except ImportError as e:
            print("blocked:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "blocked: diffusers must not be imported here" in done.stdout, done.stderr[-3000:]
