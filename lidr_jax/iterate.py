"""`python -m lidr_jax.iterate`: the main job (LIDR or ICR iterations, resumable)."""

import sys

from lidr_jax.pipeline.runner import main

if __name__ == "__main__":
    sys.exit(main())
