"""Writing an iteration's preference pairs, shared by the LIDR and ICR pair stages."""

from __future__ import annotations

import json
from collections.abc import Sequence

from lidr_jax.files import AnyPath
from lidr_jax.methods import lidr
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train.pairs import PreferencePair, write_llamafactory


def preference_pair(pair: lidr.Pair) -> PreferencePair:
    """The same record as a lidr_jax.train.pairs.PreferencePair (for write_trl_jsonl / encode_pairs)."""
    rec = pair.as_trl()
    return PreferencePair(rec.pop("prompt"), rec.pop("chosen"), rec.pop("rejected"), extra=rec)


class NoPairsError(RuntimeError):
    """An iteration built no preference pair; the message gives the counts and the settings to change."""


def write_pairs(run: RunDir, d: AnyPath, pairs: Sequence[lidr.Pair], stats: dict) -> dict:
    """`d/pairs.jsonl` (TRL layout), `d/llamafactory/` (LLaMA-Factory's alpaca ranking format and its
    `dataset_info.json` entry `lidr_jax_iter_K`) and `d/stats.json` (`stats` plus pair counts); the stage's outputs.
    No pairs at all is an error naming the likely cause and the settings to change. The per-language
    table of kept and dropped pairs (`stats["table"]`, lidr_jax.methods.filters.PairTable) reaches
    TensorBoard and W&B with the stage's other numbers when the stage is marked done
    (`RunDir.log_stage`: `pairs/stats/table/<lang>/kept`, `.../dropped/<reason>`, step = iteration)."""
    if not pairs:
        raise NoPairsError(
            f"no preference pairs were built ({json.dumps(stats)}); every translation may have failed: raise "
            "lidr.translation.max_new_tokens or generation.max_new_tokens, or use more prompts; the table says "
            "which filter dropped them (pair_filters.* turn each off)"
        )
    run.write_jsonl(d / "pairs.jsonl", [p.as_trl() for p in pairs])
    llamafactory = write_llamafactory(  # the same pairs for LLaMA-Factory: dataset_dir d/llamafactory
        [preference_pair(p) for p in pairs],
        d / "llamafactory" / "pairs.jsonl",
        f"lidr_jax_{d.parent.name}",
        write_jsonl=run.write_jsonl,
        write_json=run.write_json,
    )
    per_lang: dict[str, int] = {}
    for p in pairs:
        per_lang[p.language] = per_lang.get(p.language, 0) + 1
    stats = {**stats, "pairs_per_language": per_lang, "pairs": len(pairs)}
    run.write_json(d / "stats.json", stats)
    return {"pairs": str(d / "pairs.jsonl"), "llamafactory": str(llamafactory["dataset_info"]), "stats": stats}
