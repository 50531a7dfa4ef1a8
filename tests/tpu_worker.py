"""Subprocess worker for tests/test_plan.py: work that needs its own JAX start (a forced CPU device count,
libtpu's environment). Prints one `RESULT {json}` line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tests.` and `lidr_jax`

import jax  # noqa: E402
import numpy as np  # noqa: E402


def splash_on_mesh() -> dict:
    """Splash (interpret mode) under a 4-device CPU mesh, rows and heads split (shard_map), against xla
    without a mesh: the packed log-probs of the same rows."""
    from lidr_jax.parallel.sharding import MeshConfig, make_mesh, parse_rules, use_mesh
    from lidr_jax.train.packing import packed_logprobs
    from tests.dpo_helpers import numpy_init, tiny_config
    from tests.test_attention import _packed, _pairs

    config = tiny_config()
    params = jax.tree.map(lambda a: a * 3.0 if a.ndim > 1 else a, numpy_init(config, seed=4))
    batch, _ = _packed(_pairs(n=8), share_prompt=False, row_tokens=128)
    batch = {k: np.concatenate([v, v]) for k, v in batch.items()}  # 2+ rows, so rows split over data
    want = jax.jit(lambda p, b: packed_logprobs(p, b, config, chunk=0))(params, batch)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))
    with use_mesh(mesh, parse_rules()):
        fn = jax.jit(lambda p, b: packed_logprobs(p, b, config, chunk=0, attention="splash_interpret"))
        hlo = fn.lower(params, batch).as_text()
        got = fn(params, batch)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want))
    return {"max_abs_diff": diff, "shard_map": "shard_map" in hlo or "custom_call" in hlo, "rows": len(batch["tokens"])}


if __name__ == "__main__":
    print("RESULT " + json.dumps(globals()[sys.argv[1]]()))
