"""LIDR (Language Imbalance Driven Rewarding, Yang et al. 2024, arXiv 2410.08964): the model-free parts.

docs/method.md section 1. The model answers each prompt in English (y_en) and in each target language X
(y_X), then translates both ways (with itself, by default: lidr_jax.methods.translator): y_en→X and
y_X→en. Its English is better than its X, so for every X and every prompt id where BOTH translations
succeeded:

    target pair:    prompt x_X,  chosen y_en→X,  rejected y_X
    dominant pair:  prompt x_en, chosen y_en,    rejected y_X→en

For prompts that are themselves translation tasks the target pair's chosen is the untranslated y_en
(translating the answer of "Translate ... into French" would break it). Here:
- `LIDRPrompts`, `TranslationPrompt`: every text LIDR sends, as settings with our own wording by
  default (docs/reproducing.md says where the authors' texts are, to paste them in);
- `styled_prompts`: the arithmetic style wraps each instruction in a request to answer in its language;
- `translation_request` / `parse_translation`: the tagged translation prompt and its parser;
- `translation_jobs`: which texts the translate stage must translate;
- `build_pairs`: pairs through the quality filters (lidr_jax.methods.filters), with provenance and a
  per-language table of what was kept and dropped.
Nothing here touches a model; the pipeline runs the sampler and feeds the results in.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from lidr_jax.methods.filters import PairFilterConfig, PairTable, check_language, pair_reason, provenance
from lidr_jax.methods.languages import language_name
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.settings import check_settings, setting

Message = dict[str, str]

# Our own wording (the authors' texts are in their repositories: docs/reproducing.md).
DEFAULT_TRANSLATION_TEMPLATE = (
    "Translate the text between {text_open} and {text_close} into {language}. Keep its meaning, tone and "
    "formatting (lists, line breaks, numbers). Write only the {language} translation, between "
    "{result_open} and {result_close}, with no notes or explanations.\n\n"
    "{text_open}\n{text}\n{text_close}"
)
DEFAULT_ARITHMETIC_TEMPLATE = (
    "{instruction}\n\nWork through the problem step by step and write your answer in {language}."
)


def check_template(template: str, required: Collection[str], allowed: Collection[str], what: str) -> None:
    """Raise ValueError naming `what` when `template` lacks a required {placeholder} or has an unknown one
    (write a literal brace as {{ or }})."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{what}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(names - set(allowed))
    missing = sorted(set(required) - names)
    if unknown or missing:
        raise ValueError(
            f"{what}: placeholders {sorted(allowed)} are known"
            + (f", {['{' + n + '}' for n in unknown]} is not" if unknown else "")
            + (f"; {['{' + n + '}' for n in missing]} is required" if missing else "")
            + " (write a literal brace as {{ or }})"
        )


@dataclass(frozen=True)
class TranslationPrompt:
    """The translation request (docs/method.md 1.3): `template` with the placeholders {text}, {language}
    (the English name of the target language) and the four tags; the assistant turn is pre-filled
    with `prefill` ("" = none) so generation starts inside the result; `system_prompt` is the
    translation's own system turn (None = none)."""

    template: str = setting(
        DEFAULT_TRANSLATION_TEMPLATE, "the request: {text} required; {language} and the four tags may appear"
    )
    text_open: str = setting("<text>", "tag before the text to translate")
    text_close: str = setting("</text>", "tag after the text to translate")
    result_open: str = setting("<translation>", "tag the translation starts after")
    result_close: str = setting("</translation>", "tag the translation ends at (never empty)")
    prefill: str = setting("<translation>", 'start of the assistant turn, inside the result; "" = none')
    system_prompt: str | None = setting(None, "the translation's own system turn (null = none)")

    def __post_init__(self):
        check_settings(self)
        check_template(
            self.template,
            ("text",),
            ("text", "language", "text_open", "text_close", "result_open", "result_close"),
            "translation template",
        )
        if not self.result_close:
            raise ValueError("result_close must not be empty: a translation ends at it")


@dataclass(frozen=True)
class LIDRPrompts:
    """The texts LIDR's generation sends (the pairs' system prompt is LIDRPairConfig.system_prompt).

    generation_system_prompt: a system turn when answering the prompts (None = none; the LIDR paper's
      generation used the chat template's usual one).
    style: "plain" sends the instruction as it is; "arithmetic" wraps it in `arithmetic_template`
      ({instruction}, {language}), a request to answer in the prompt's language (the authors' GSM8K
      variant), for generation and in the pairs.
    translation: the translation request.
    """

    generation_system_prompt: str | None = setting(
        None, "a system turn when answering the prompts (null = none; the paper's used the chat template's own)"
    )
    style: Literal["plain", "arithmetic"] = setting(
        "plain", "plain: the instruction as it is | arithmetic: wrapped in arithmetic_template"
    )
    arithmetic_template: str = setting(
        DEFAULT_ARITHMETIC_TEMPLATE, "style arithmetic: {instruction} (required) and {language}"
    )
    translation: TranslationPrompt = setting(TranslationPrompt(), "the translation request")

    def __post_init__(self):
        check_settings(self)
        check_template(self.arithmetic_template, ("instruction",), ("instruction", "language"), "arithmetic template")


def styled_prompts(prompts: PromptSet, style: LIDRPrompts) -> PromptSet:
    """The prompt set as generation and the pairs see it: unchanged for "plain"; for "arithmetic"
    every instruction wrapped in the arithmetic template with its own language's name."""
    if style.style == "plain":
        return prompts
    wrapped = {
        lang: tuple(
            style.arithmetic_template.format(instruction=text, language=language_name(lang))
            for text in prompts.instructions[lang]
        )
        for lang in prompts.languages
    }
    return dataclasses.replace(prompts, instructions=wrapped)


# ---------------------------------------------------------------- the translation prompt


def chat_prompt(instruction: str, system_prompt: str | None = None) -> list[Message]:
    """A user turn (after an optional system turn): the prompt of a generation or of a pair."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": instruction}]


def translation_request(
    text: str, target_lang: str, prompt: TranslationPrompt = TranslationPrompt()
) -> tuple[list[Message], str]:
    """(messages, prefill) asking to translate `text` into `target_lang` (an ISO code).

    The language is named in English: the instruction-following of an English-dominant model is
    best in English. `parse_translation` reads the result up to the closing tag (docs/method.md 1.3).
    """
    content = prompt.template.format(
        text=text,
        language=language_name(target_lang),
        text_open=prompt.text_open,
        text_close=prompt.text_close,
        result_open=prompt.result_open,
        result_close=prompt.result_close,
    )
    return chat_prompt(content, prompt.system_prompt), prompt.prefill


def parse_translation(
    generated: str, prompt: TranslationPrompt = TranslationPrompt(), *, prefilled: bool = True, keep_unclosed=False
) -> str | None:
    """The translation in the generated text; None when it failed.

    prefilled: the text continues the prefill (the assistant turn started inside the result). A
      repeated opening tag at its start (the prefill echoed back) is skipped. Without a prefill (an
      endpoint), anything before the first opening tag is a preamble and is skipped.
    Failed: nothing between the tags, or no closing tag (typically a long text cut by the length
    limit: docs/method.md counts these as failures, 78 of 1,000 en→fr in the paper) unless
    `keep_unclosed`, which keeps the text after the opening tag (the ICR authors' translate-the-answer
    baseline does).
    """
    text = generated.lstrip()
    if prompt.result_open:
        at = text.find(prompt.result_open)
        if at == 0 or (at > 0 and not prefilled):
            text = text[at + len(prompt.result_open) :]
    end = text.find(prompt.result_close)
    if end < 0 and not keep_unclosed:
        return None
    result = (text if end < 0 else text[:end]).strip()
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


@dataclass(frozen=True)
class LIDRPairConfig:
    """How LIDR pairs are built.

    english_pairs: which dominant (English) pairs to keep. Each X gives one candidate per prompt,
      (x_en, y_en, y_X→en). "last" keeps only the last X's (in the run's language order), as the
      authors' script leaves them (docs/method.md 1.4); "all" keeps every X's; "sample_one" (default)
      keeps one X per prompt, drawn with a seeded RNG among the X whose translations succeeded.
      Default "sample_one" because it keeps the paper's data mix (1,000 prompts x 4 X -> 4,000
      target + 1,000 English = the ~5,000 pairs per iteration it reports) instead of weighting
      English 4x and repeating each y_en four times in the NLL term, while, unlike "last", every
      language's back-translation gets to be a rejected answer.
    system_prompt: the system turn of every training pair's prompt (None = none; the authors most
      likely trained without one).
    The quality filters are a separate group shared with ICR (lidr_jax.methods.filters).
    """

    dominant: str = setting("en", "the dominant language (a run sets its own)")
    english_pairs: Literal["sample_one", "all", "last"] = setting(
        "sample_one", "which dominant-language pairs to keep: one X per prompt, every X's, or the last X's"
    )
    seed: int = setting(0, "seeds sample_one's draw (a run derives it)")
    system_prompt: str | None = setting(None, "the system turn of every training pair's prompt (null = none)")

    def __post_init__(self):
        check_settings(self)


@dataclass
class LIDRStats:
    """What build_pairs did. Keys of per-direction dicts are "en->fr" / "fr->en"; `table` is the
    per-language table of lidr_jax.methods.filters.PairTable (the dominant language's row counts the
    English pairs)."""

    prompts: int
    target_languages: tuple[str, ...]
    target_pairs: dict[str, int]  # X -> target pairs kept
    dominant_pairs: dict[str, int]  # X -> English pairs kept whose rejected is y_X→en
    failed: dict[str, int]  # direction -> failed translations (None)
    dropped: dict[str, list[str]]  # X -> prompt ids with no pair for X (a needed translation failed)
    translation_task_pairs: int  # target pairs whose chosen is the untranslated y_en
    table: dict[str, dict] = field(default_factory=dict)
    translator: str = "policy"

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
    settings: LIDRPairConfig = LIDRPairConfig(),
    filters: PairFilterConfig | None = None,
    *,
    length_cut: Mapping[str, Collection[str]] | None = None,
    translator: str = "policy",
    prompt_cut: Mapping[str, Collection[str]] | None = None,
) -> tuple[list[Pair], LIDRStats]:
    """LIDR preference pairs (docs/method.md 1.4) through the quality filters.

    generations: {lang: {id: answer}} for the dominant language and every X.
    to_target:   {X: {id: y_en→X or None if the translation failed}}.
    to_dominant: {X: {id: y_X→en or None}}.
    length_cut:  {lang: ids whose generation stopped at the token limit} (for the length_cut filter;
      a target pair's chosen is cut when the English answer it translates was).
    filters:     the quality filters (None: PairFilterConfig(), the defaults).
    translator:  who translated (lidr_jax.methods.translator.TranslatorConfig.name), for provenance.
    prompt_cut:  {X: ids whose pair for X needs a prompt that was over its stage's prompt limit and
      was not generated (`prompt_cut_ids`)}: dropped and counted as `prompt_cut`, never trained on.
    A pair for (X, id) needs both translations (only y_X→en for translation-task ids, whose en→X
    translation is not used and may be absent). A missing entry (as opposed to None) means a stage
    did not finish and raises. The language filter checks the chosen answer against the pair's
    language, except in the pairs of a translation-task prompt, target and English alike (its
    answer's language is the one the instruction asks for), unless `language_translation_tasks`.
    Returns (pairs, stats): target pairs grouped by X, then English pairs.
    """
    filters = PairFilterConfig() if filters is None else filters
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
    cut = {lang: set(ids) for lang, ids in (length_cut or {}).items()}
    too_long = {lang: set(ids) for lang, ids in (prompt_cut or {}).items()}
    x_en = prompts.by_id(dom)
    counts = PairTable([*targets, dom])
    stats = LIDRStats(len(prompts), tuple(targets), {}, {}, {}, {}, 0, translator=translator)
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
            if pid in too_long.get(lang, ()):
                stats.dropped[lang].append(pid)
                counts.count(lang, "prompt_cut")
                continue
            if back[pid] is None or (not is_task and fwd[pid] is None):
                stats.dropped[lang].append(pid)
                counts.count(lang, "translation_failed")
                continue
            valid.setdefault(pid, []).append(lang)
            if is_task and not filters.translation_tasks:
                counts.count(lang, "translation_task")
                continue
            y_en, y_x = generations[dom][pid], generations[lang][pid]
            chosen, chosen_from = (y_en, f"generation:{dom}") if is_task else (fwd[pid], f"translation:{dom}->{lang}")
            reason = pair_reason(
                chosen,
                y_x,
                lang,
                filters,
                cut=pid in cut.get(dom, ()),
                source=None if is_task else y_en,
                check_lang=filters.language_translation_tasks or not is_task,
                dominant=dom,
            )
            counts.count(lang, reason)
            if reason is not None:
                continue
            meta = {**provenance(chosen, y_x, filters), "translator": "none" if is_task else translator}
            pairs.append(
                Pair(
                    chat_prompt(x_lang[pid], settings.system_prompt),
                    chosen,
                    y_x,
                    pid,
                    lang,
                    "target",
                    chosen_from,
                    f"generation:{lang}",
                    meta,
                )
            )
            stats.target_pairs[lang] += 1
            stats.translation_task_pairs += is_task
    stats.dominant_pairs = dict.fromkeys(targets, 0)
    for lang, pid in _english_sources(prompts.ids, valid, targets, settings):
        y_en, back = generations[dom][pid], to_dominant[lang][pid]
        check_lang = filters.language_translation_tasks or pid not in prompts.translation_task
        reason = pair_reason(y_en, back, dom, filters, cut=pid in cut.get(dom, ()), check_lang=check_lang, dominant=dom)
        if reason is None and filters.back_translation and not check_language(back, dom, filters.min_letters):
            reason = "language"  # the back-translation stayed in (or drifted to) another language
        counts.count(dom, reason)
        if reason is not None:
            continue
        pairs.append(
            Pair(
                chat_prompt(x_en[pid], settings.system_prompt),
                y_en,
                back,
                pid,
                dom,
                "dominant",
                f"generation:{dom}",
                f"translation:{lang}->{dom}",
                {**provenance(y_en, back, filters), "translator": translator},
            )
        )
        stats.dominant_pairs[lang] += 1
    stats.table = counts.to_dict()
    return pairs, stats


def prompt_cut_ids(
    generation_rows: Iterable[Mapping],
    translation_rows: Iterable[Mapping],
    targets: Sequence[str],
    dominant: str = "en",
) -> dict[str, set[str]]:
    """{X: ids whose pair for X needs a prompt its stage skipped as over the prompt limit} from the
    generate stage's rows ({lang, id, finish_reasons}) and the translate stage's ({source, target, id,
    finish_reason}): a dominant-language answer feeds every X's pairs, an X answer and both
    translations of X feed X's."""
    out: dict[str, set[str]] = {lang: set() for lang in targets}
    for row in generation_rows:
        if row["finish_reasons"][0] == "prompt_too_long":
            for lang in targets if row["lang"] == dominant else [row["lang"]]:
                out.setdefault(lang, set()).add(row["id"])
    for row in translation_rows:
        if row.get("finish_reason") == "prompt_too_long":
            lang = row["target"] if row["source"] == dominant else row["source"]
            out.setdefault(lang, set()).add(row["id"])
    return out


def _english_sources(ids, valid: dict[str, list[str]], targets: list[str], settings: LIDRPairConfig):
    """(X, id) of the English pairs to build, grouped by X in target order."""
    picked: dict[str, list[str]] = {lang: [] for lang in targets}
    for pid in ids:
        langs = valid.get(pid, [])
        if not langs:
            continue
        if settings.english_pairs == "all":
            chosen_langs = langs
        elif settings.english_pairs == "last":
            chosen_langs = [targets[-1]] if targets[-1] in langs else []
        else:
            # One RNG per id (seeded by the run seed and the id), so a prompt's draw does not depend
            # on which other prompts are in the slice.
            rng = np.random.default_rng([settings.seed, zlib.crc32(pid.encode("utf-8"))])
            chosen_langs = [langs[int(rng.integers(len(langs)))]]
        for lang in chosen_langs:
            picked[lang].append(pid)
    return [(lang, pid) for lang in targets for pid in picked[lang]]
