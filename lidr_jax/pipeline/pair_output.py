"""Writing an iteration's preference pairs, shared by the LIDR and ICR pair stages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lidr_jax.methods import lidr
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train.pairs import write_llamafactory


class NoPairsError(RuntimeError):
    """An iteration built no preference pair; the message gives the counts and the settings to change."""


def write_pairs(run: RunDir, d: Path, pairs: Sequence[lidr.Pair], stats: dict, k: int | None = None) -> dict:
    """`d/pairs.jsonl` (TRL layout), `d/llamafactory/` (LLaMA-Factory's alpaca ranking format and its
    `dataset_info.json` entry `lidr_jax_iter_K`) and `d/stats.json` (`stats` plus pair counts); the stage's outputs.
    No pairs at all is an error naming the likely cause and the settings to change. The per-language
    table of kept and dropped pairs (`stats["table"]`, lidr_jax.methods.filters.PairTable) also goes to
    TensorBoard (`RUN_DIR/tensorboard/pairs`, step = iteration `k`)."""
    if not pairs:
        raise NoPairsError(
            f"no preference pairs were built ({json.dumps(stats)}); every translation may have failed: raise "
            "lidr.translation.max_new_tokens or generation.max_new_tokens, or use more prompts; the table says "
            "which filter dropped them (pair_filters.* turn each off)"
        )
    run.write_jsonl(d / "pairs.jsonl", [p.as_trl() for p in pairs])
    llamafactory = write_llamafactory(  # the same pairs for LLaMA-Factory: dataset_dir d/llamafactory
        [p.as_preference_pair() for p in pairs],
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
    if "table" in stats and k is not None:
        run.on_writer(_pair_tensorboard, stats["table"], run.path / "tensorboard" / "pairs", k)
    return {"pairs": str(d / "pairs.jsonl"), "llamafactory": str(llamafactory["dataset_info"]), "stats": stats}


def _pair_tensorboard(table: dict, logdir: Path, k: int) -> None:
    """`pairs/<lang>/kept` and `pairs/<lang>/dropped_<reason>` scalars at step k."""
    try:
        from tensorboardX import SummaryWriter  # optional dependency: the run works without it
    except ImportError:
        return
    with SummaryWriter(str(logdir)) as w:
        for lang, row in table.items():
            w.add_scalar(f"pairs/{lang}/kept", row["kept"], k)
            for reason, n in row["dropped"].items():
                w.add_scalar(f"pairs/{lang}/dropped_{reason}", n, k)
