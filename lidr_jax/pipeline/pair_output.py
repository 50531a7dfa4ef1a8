"""Writing an iteration's preference pairs, shared by the LIDR and ICR pair stages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lidr_jax.methods import lidr
from lidr_jax.pipeline.run_dir import RunDir


def write_pairs(run: RunDir, d: Path, pairs: Sequence[lidr.Pair], stats: dict) -> dict:
    """`d/pairs.jsonl` (TRL layout) and `d/stats.json` (`stats` plus pair counts); the stage's outputs.
    No pairs at all is an error naming the likely cause and the settings to change."""
    if not pairs:
        raise RuntimeError(
            f"no preference pairs were built ({json.dumps(stats)}); every translation may have failed: raise "
            "lidr.translation.max_new_tokens or generation.max_new_tokens, or use more prompts"
        )
    run.write_jsonl(d / "pairs.jsonl", [p.as_trl() for p in pairs])
    per_lang: dict[str, int] = {}
    for p in pairs:
        per_lang[p.language] = per_lang.get(p.language, 0) + 1
    stats = {**stats, "pairs_per_language": per_lang, "pairs": len(pairs)}
    run.write_json(d / "stats.json", stats)
    return {"pairs": str(d / "pairs.jsonl"), "stats": stats}
