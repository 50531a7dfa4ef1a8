"""`python -m lidr_jax.evaluate`: MGSM, X-AlpacaEval outputs, language fidelity, head-to-head."""

import os
import sys

from lidr_jax.parallel.huge_pages import restart_with_huge_pages

if __name__ == "__main__":
    restart_with_huge_pages()  # before JAX allocates anything (its docstring says why)

# torch is not a dependency (the product never imports it): transformers' "PyTorch was not found" advice at
# import is noise on a user's terminal. Set for the command only, before anything imports transformers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from lidr_jax.eval.evaluate import main  # noqa: E402 (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
