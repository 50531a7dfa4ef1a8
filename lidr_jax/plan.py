"""`python -m lidr_jax.plan`: compile every program of a run for TPU topologies, on any machine."""

import os
import sys

# The plan compiles for TPUs it does not have: JAX's own backend here is the CPU (set before JAX starts),
# and libtpu is only asked for a topology's devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from lidr_jax.pipeline.plan import main  # noqa: E402  (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
