"""Padded sizes: few distinct array shapes means few XLA compilations.

Each caller states its own constants (the sampler pads prompts, the DPO batches pad packed pairs).
"""

from __future__ import annotations


def bucket(n: int, *, minimum: int, knee: int, step: int) -> int:
    """The padded size of `n`: powers of two from `minimum` while n <= `knee`, above it the next
    multiple of `step` (never below `minimum`)."""
    if n > knee:
        return max(minimum, -(-n // step) * step)
    size = minimum
    while size < n:
        size *= 2
    return size
