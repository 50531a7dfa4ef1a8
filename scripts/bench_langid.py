"""Accuracy of lidr_jax's language identification (lidr_jax.methods.langid, py3langid) on the shared
evaluation data: the share of X-AlpacaEval instructions (805 per language) and MGSM questions (250 per
language) whose detected language is the file's language, restricted to the project's language table
(the setting lidr_jax uses) and over py3langid's full label set. BENCHMARKS.md, "Language identification".

    python -m scripts.bench_langid [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import py3langid

from lidr_jax.eval.evaluate import read_x_alpacaeval
from lidr_jax.eval.mgsm import MGSM_LANGUAGES, mgsm_file, read_mgsm
from lidr_jax.methods.langid import detect_language

ALPACA = ("en", "es", "ru", "de", "fr", "zh")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    data = Path(p.parse_args().data)
    full = py3langid.classify
    sets = {
        f"xa {lang}": (lang, [r["instruction"] for r in read_x_alpacaeval(data / "x-alpacaeval" / f"{lang}.json")])
        for lang in ALPACA
    }
    sets |= {
        f"mgsm {lang}": (lang, [item.question for item in read_mgsm(mgsm_file(data / "mgsm", lang))])
        for lang in MGSM_LANGUAGES
    }
    start, n = time.perf_counter(), 0
    print("| set | texts | restricted (lidr_jax) | all 142 labels |\n|---|---|---|---|")
    for name, (lang, texts) in sets.items():
        restricted = sum(detect_language(t) == lang for t in texts) / len(texts)
        everything = sum(full(t)[0] == lang for t in texts) / len(texts)
        n += 2 * len(texts)
        print(f"| {name} | {len(texts)} | {100 * restricted:.2f} | {100 * everything:.2f} |")
    print(f"\n{n} classifications in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
