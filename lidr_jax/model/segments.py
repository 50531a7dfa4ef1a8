"""Packed rows: which token of a row may attend to which, written once for every attention path.

A scoring or training row may hold several sequences that share a prefix (lidr_jax.model.scoring's
`prompt | chosen | rejected`, several such groups per row in lidr_jax.train.packing). Each token carries a
segment number s: the token belongs to group `s // 3`, and `s % 3 == 0` marks the group's shared prefix.
A token sees an earlier token of its own group when that token is in the prefix or in its own segment;
it never sees another group, and the two answers of a group never see each other.

`MASKED` is the finite "minus infinity" every attention path puts on a score it must not see: a query that
sees nothing (padding) then gets a uniform softmax (or p = 0 over a block) instead of NaN, and NaN never
reaches the gradients.
"""

from __future__ import annotations

import numpy as np

MASKED = float(np.finfo(np.float32).min)


def segment_group(segments):
    """The group each segment belongs to (arrays of NumPy or JAX alike)."""
    return segments // 3


def prefix_segment(segments):
    """The segment number of each segment's group prefix."""
    return 3 * (segments // 3)


def segment_sees(query_segments, key_segments):
    """Whether a query of segment `query_segments` may see a key of segment `key_segments` (broadcast;
    causal order and padding are the caller's): same group, and the key in the prefix or in the query's
    own segment."""
    same_group = segment_group(query_segments) == segment_group(key_segments)
    return same_group & ((key_segments % 3 == 0) | (key_segments == query_segments))
