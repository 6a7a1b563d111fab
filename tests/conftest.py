import os
import sys

# Tests run on CPU in float32 at full matmul precision; 8 host devices only where a test asks.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
