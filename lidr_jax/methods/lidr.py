"""LIDR (Language Imbalance Driven Rewarding, Yang et al. 2024, arXiv 2410.08964): the model-free parts.

METHOD.md section 1. The model answers each prompt in English (y_en) and in each target language X
(y_X), then translates both ways with itself: y_en→X and y_X→en. Its English is better than its X,
so for every X and every prompt id where BOTH translations succeeded:

    target pair:    prompt x_X,  chosen y_en→X,  rejected y_X
    dominant pair:  prompt x_en, chosen y_en,    rejected y_X→en

For prompts that are themselves translation tasks the target pair's chosen is the untranslated y_en
(translating the answer of "Translate ... into French" would break it). Here:
- `translation_request` / `parse_translation`: the tagged translation prompt and its parser;
- `translation_jobs`: which texts the translate stage must translate;
- `build_pairs`: pairs with provenance and statistics, from plain dicts of generations/translations.
Nothing here touches a model; iterate.py runs the sampler and feeds the results in.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from lidr_jax.methods.languages import language_name
from lidr_jax.methods.prompt_sets import PromptSet

Message = dict[str, str]

TEXT_OPEN, TEXT_CLOSE = "<text>", "</text>"
RESULT_OPEN, RESULT_CLOSE = "<translation>", "</translation>"


# ---------------------------------------------------------------- the translation prompt


def chat_prompt(instruction: str, system_prompt: str | None = None) -> list[Message]:
    """A user turn (after an optional system turn): the prompt of a generation or of a pair."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": instruction}]


def translation_request(text: str, target_lang: str, system_prompt: str | None = None) -> tuple[list[Message], str]:
    """(messages, prefill) asking the model to translate `text` into `target_lang` (an ISO code).

    The text sits between <text> tags; the answer is asked for between <translation> tags and the
    assistant turn is pre-filled with the opening tag, so generation starts inside the translation
    and `parse_translation` reads up to the closing tag (METHOD.md 1.3). The language is named in
    English: the instruction-following of an English-dominant model is best in English.
    """
    name = language_name(target_lang)
    content = (
        f"Translate the text between {TEXT_OPEN} and {TEXT_CLOSE} into {name}. Keep its meaning, tone and "
        f"formatting (lists, line breaks, numbers). Write only the {name} translation, between "
        f"{RESULT_OPEN} and {RESULT_CLOSE}, with no notes or explanations.\n\n"
        f"{TEXT_OPEN}\n{text}\n{TEXT_CLOSE}"
    )
    return chat_prompt(content, system_prompt), RESULT_OPEN


def parse_translation(generated: str) -> str | None:
    """The translation in text generated after the prefill; None when it failed.

    Failed: no closing tag (typically a long text cut by the length limit: METHOD.md counts these as
    failures, 78 of 1,000 en→fr in the paper) or nothing between the tags. A repeated opening tag at
    the start (the prefill echoed back) is skipped.
    """
    text = generated.lstrip()
    text = text.removeprefix(RESULT_OPEN)
    end = text.find(RESULT_CLOSE)
    if end < 0:
        return None
    result = text[:end].strip()
    return result or None


# ---------------------------------------------------------------- what to translate


@dataclass(frozen=True)
class TranslationJob:
    id: str  # prompt id
    source_lang: str
    target_lang: str
    text: str

    @property
    def direction(self) -> str:
        return f"{self.source_lang}->{self.target_lang}"


def translation_jobs(
    prompts: PromptSet, generations: Mapping[str, Mapping[str, str]], dominant: str = "en"
) -> list[TranslationJob]:
    """Every translation `build_pairs` needs: y_en into each X, and each y_X into English.

    Translation-task prompts need no en→X translation (their target pair keeps y_en), so none is
    asked for. Order: by target language, then prompt id, so a stage can batch per direction.
    """
    _check_generations(prompts, generations, dominant)
    jobs = []
    for lang in _targets(prompts, dominant):
        for pid in prompts.ids:
            if pid not in prompts.translation_task:
                jobs.append(TranslationJob(pid, dominant, lang, generations[dominant][pid]))
        for pid in prompts.ids:
            jobs.append(TranslationJob(pid, lang, dominant, generations[lang][pid]))
    return jobs


def _targets(prompts: PromptSet, dominant: str) -> list[str]:
    if dominant not in prompts.languages:
        raise ValueError(
            f"the dominant language {dominant!r} is not among the prompt languages {list(prompts.languages)}"
        )
    return [lang for lang in prompts.languages if lang != dominant]


def _check_generations(prompts: PromptSet, generations, dominant: str) -> None:
    for lang in prompts.languages:
        missing = [pid for pid in prompts.ids if pid not in generations.get(lang, {})]
        if missing:
            raise ValueError(
                f"no {lang} generation for {len(missing)} prompt id(s) ({', '.join(missing[:5])}): "
                "the generate stage output is incomplete; rerun it"
            )


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One preference pair with its provenance. `prompt` is a chat message list (TRL conversational)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    id: str  # prompt id
    language: str  # language of the prompt and both responses
    kind: str  # "target" | "dominant" (LIDR) | "icr"
    chosen_from: str  # e.g. "translation:en->fr", "generation:en", "sample:3"
    rejected_from: str
    meta: Mapping[str, object] = field(default_factory=dict)

    def as_trl(self) -> dict:
        """A TRL conversational preference record plus provenance columns."""
        return {
            "prompt": list(self.prompt),
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
            "id": self.id,
            "language": self.language,
            "kind": self.kind,
            "chosen_from": self.chosen_from,
            "rejected_from": self.rejected_from,
            **({"meta": dict(self.meta)} if self.meta else {}),
        }

    def as_preference_pair(self):
        """The same record as a lidr_jax.train.pairs.PreferencePair (for write_trl_jsonl / encode_pairs)."""
        from lidr_jax.train.pairs import PreferencePair

        rec = self.as_trl()
        return PreferencePair(rec.pop("prompt"), rec.pop("chosen"), rec.pop("rejected"), extra=rec)


@dataclass(frozen=True)
class LIDRPairSettings:
    """How LIDR pairs are built.

    english_pairs: which dominant (English) pairs to keep. Each X gives one candidate per prompt,
      (x_en, y_en, y_X→en). The authors' script kept only the last X's (METHOD.md 1.4, a quirk).
      "all" keeps every X's; "sample_one" (default) keeps one X per prompt, drawn with a seeded RNG
      among the X whose translations succeeded. Default "sample_one" because it keeps the paper's
      data mix (1,000 prompts x 4 X -> 4,000 target + 1,000 English = the ~5,000 pairs per iteration
      it reports) instead of weighting English 4x and repeating each y_en four times in the NLL term,
      while, unlike the quirk, every language's back-translation gets to be a rejected answer.
    drop_identical: drop pairs whose chosen and rejected are equal (after stripping whitespace).
      The paper adds no filter, so they are kept by default and only counted: such a pair gives a
      zero DPO gradient, and the NLL term still trains on the chosen answer.
    system_prompt: an optional system turn in every pair's prompt.
    """

    dominant: str = "en"
    english_pairs: Literal["all", "sample_one"] = "sample_one"
    seed: int = 0
    drop_identical: bool = False
    system_prompt: str | None = None

    def __post_init__(self):
        if self.english_pairs not in ("all", "sample_one"):
            raise ValueError(f"english_pairs must be 'all' or 'sample_one', got {self.english_pairs!r}")


@dataclass
class LIDRStats:
    """What build_pairs did. Keys of per-direction dicts are "en->fr" / "fr->en"."""

    prompts: int
    target_languages: tuple[str, ...]
    target_pairs: dict[str, int]  # X -> target pairs kept
    dominant_pairs: dict[str, int]  # X -> English pairs kept whose rejected is y_X→en
    failed: dict[str, int]  # direction -> failed translations (None)
    dropped: dict[str, list[str]]  # X -> prompt ids with no pair for X (a needed translation failed)
    identical: dict[str, int]  # "target:fr" / "dominant:fr" -> pairs with chosen == rejected
    translation_task_pairs: int  # target pairs whose chosen is the untranslated y_en

    @property
    def total(self) -> int:
        return sum(self.target_pairs.values()) + sum(self.dominant_pairs.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def build_pairs(
    prompts: PromptSet,
    generations: Mapping[str, Mapping[str, str]],
    to_target: Mapping[str, Mapping[str, str | None]],
    to_dominant: Mapping[str, Mapping[str, str | None]],
    settings: LIDRPairSettings = LIDRPairSettings(),
) -> tuple[list[Pair], LIDRStats]:
    """LIDR preference pairs (METHOD.md 1.4).

    generations: {lang: {id: answer}} for the dominant language and every X.
    to_target:   {X: {id: y_en→X or None if the translation failed}}.
    to_dominant: {X: {id: y_X→en or None}}.
    A pair for (X, id) needs both translations (only y_X→en for translation-task ids, whose en→X
    translation is not used and may be absent). A missing entry (as opposed to None) means a stage
    did not finish and raises. Returns (pairs, stats): target pairs grouped by X, then English pairs.
    """
    dom = settings.dominant
    targets = _targets(prompts, dom)
    _check_generations(prompts, generations, dom)
    for name, table in (("en->X", to_target), ("X->en", to_dominant)):
        for lang in targets:
            need = [p for p in prompts.ids if not (name == "en->X" and p in prompts.translation_task)]
            missing = [p for p in need if p not in table.get(lang, {})]
            if missing:
                direction = f"{dom}->{lang}" if name == "en->X" else f"{lang}->{dom}"
                raise ValueError(
                    f"no {direction} translation result for {len(missing)} prompt id(s) ({', '.join(missing[:5])}): "
                    "the translate stage output is incomplete; rerun it (a failed translation is None, not absent)"
                )
    x_en = prompts.by_id(dom)
    stats = LIDRStats(len(prompts), tuple(targets), {}, {}, {}, {}, {}, 0)
    valid: dict[str, list[str]] = {}  # id -> the X whose pair can be built
    pairs: list[Pair] = []
    for lang in targets:
        fwd, back = to_target.get(lang, {}), to_dominant[lang]
        stats.failed[f"{dom}->{lang}"] = sum(fwd.get(p, "") is None for p in prompts.ids)
        stats.failed[f"{lang}->{dom}"] = sum(back[p] is None for p in prompts.ids)
        stats.dropped[lang], stats.target_pairs[lang] = [], 0
        x_lang = prompts.by_id(lang)
        for pid in prompts.ids:
            is_task = pid in prompts.translation_task
            if back[pid] is None or (not is_task and fwd[pid] is None):
                stats.dropped[lang].append(pid)
                continue
            valid.setdefault(pid, []).append(lang)
            chosen, chosen_from = (
                (generations[dom][pid], f"generation:{dom}") if is_task else (fwd[pid], f"translation:{dom}->{lang}")
            )
            pair = Pair(
                chat_prompt(x_lang[pid], settings.system_prompt),
                chosen,
                generations[lang][pid],
                pid,
                lang,
                "target",
                chosen_from,
                f"generation:{lang}",
            )
            if _keep(pair, f"target:{lang}", stats, settings):
                pairs.append(pair)
                stats.target_pairs[lang] += 1
                stats.translation_task_pairs += is_task
    stats.dominant_pairs = dict.fromkeys(targets, 0)
    for lang, pid in _english_sources(prompts.ids, valid, targets, settings):
        pair = Pair(
            chat_prompt(x_en[pid], settings.system_prompt),
            generations[dom][pid],
            to_dominant[lang][pid],
            pid,
            dom,
            "dominant",
            f"generation:{dom}",
            f"translation:{lang}->{dom}",
        )
        if _keep(pair, f"dominant:{lang}", stats, settings):
            pairs.append(pair)
            stats.dominant_pairs[lang] += 1
    return pairs, stats


def _english_sources(ids, valid: dict[str, list[str]], targets: list[str], settings: LIDRPairSettings):
    """(X, id) of the English pairs to build, grouped by X in target order."""
    picked: dict[str, list[str]] = {lang: [] for lang in targets}
    for pid in ids:
        langs = valid.get(pid, [])
        if not langs:
            continue
        if settings.english_pairs == "all":
            chosen_langs = langs
        else:
            # One RNG per id (seeded by the run seed and the id), so a prompt's draw does not depend
            # on which other prompts are in the slice.
            rng = np.random.default_rng([settings.seed, zlib.crc32(pid.encode("utf-8"))])
            chosen_langs = [langs[int(rng.integers(len(langs)))]]
        for lang in chosen_langs:
            picked[lang].append(pid)
    return [(lang, pid) for lang in targets for pid in picked[lang]]


def _keep(pair: Pair, key: str, stats: LIDRStats, settings: LIDRPairSettings) -> bool:
    if pair.chosen.strip() == pair.rejected.strip():
        stats.identical[key] = stats.identical.get(key, 0) + 1
        return not settings.drop_identical
    return True
