"""`python -m lidr_jax.dpo`: DPO-train a model on a preference-pair file."""

import sys

from lidr_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
