import os
import sys

# Tests run on CPU in float32 at full matmul precision; 8 host devices only where a test asks.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
from testenv import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags()  # before JAX starts; inherited by the processes tests start
# Only the library is installed; the checkout's other folders (experiments, organisms, flux2ref, ...)
# import from the repository root, in this process (pyproject's `pythonpath`) and in the child
# processes the tests start.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> str:
    """A random tiny FLUX.2 [klein] model folder in the diffusers layout (flux2ref.folder), built once."""
    from flux2ref.folder import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-klein", seed=0)


@pytest.fixture
def cudnn_version(monkeypatch):
    """jax reads cuDNN's version from the CUDA plugin at trace time (tracing or lowering the cuDNN
    kernel on a machine without CUDA); report 9.12 without one (any 9.x takes the bias path)."""
    import types

    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "cuda_versions", types.SimpleNamespace(cudnn_get_version=lambda: 91200))
