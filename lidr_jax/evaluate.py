"""`python -m lidr_jax.evaluate`: MGSM, X-AlpacaEval outputs, language fidelity, head-to-head."""

import sys

from lidr_jax.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
