"""`python -m lidr_jax.export`: a run's policy, an HF directory or a GGUF file to an HF directory."""

import sys

from lidr_jax.pipeline.export_run import main

if __name__ == "__main__":
    sys.exit(main())
