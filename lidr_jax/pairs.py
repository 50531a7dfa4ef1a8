"""`python -m lidr_jax.pairs convert IN --to trl|llamafactory OUT`: pair files for other trainers."""

import sys

from lidr_jax.train.pairs import main

if __name__ == "__main__":
    sys.exit(main())
