"""Prompt sets aligned across languages: loading, validation, per-iteration slices, held-out split.

Both methods need the same prompts in every language, matched by id (docs/method.md 1.1, 2.1). Accepted:
- a folder of `{lang}.jsonl`, one JSON object a line with `id` (LIDR layout) or `instruction_id`
  (ICR layout) and `instruction`; optional `translation_task` (bool), `answer` (number), `kind`,
  `split` ("train" | "dev" | "heldout") and `reference` (a reference answer in that language);
- any source `datasets` can load (local JSON/JSONL/Parquet/CSV, or a hub name when the user has
  network), with named columns; languages told apart by a language column or by `{lang}` in the
  path / data_files / config name / split (one file or config per language);
- "default": the project's own prompts in lidr_jax/methods/prompts/default.

Splits. A set whose rows carry `split` labels is split by them and by nothing else: "train" prompts
(and unlabelled ones) are the only ones trained on; "heldout" prompts are the final before/after
measurement and are never used to choose settings; "dev" prompts are the measurement to use while
choosing settings (`PromptSourceConfig.check_split = "dev"`). The labels live in the data, so the split is
the same for every seed, every run size and every reader. A set without labels falls back to a
seeded draw of held-out prompts (`split_heldout`). The packaged default set: ids p000-p131 train,
p132-p167 dev, p168-p215 heldout (its README).

Every problem (missing language file, malformed JSON line, ids that do not align, duplicate ids, an
empty set, an unknown language code) raises PromptSetError naming the file and line, before any
model work. The result is a `PromptSet`: plain tuples aligned with `ids`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from lidr_jax.files import numbered_jsonl
from lidr_jax.methods.languages import check_languages
from lidr_jax.settings import check_settings, setting

DEFAULT_PROMPTS_DIR = Path(__file__).parent / "prompts" / "default"
DEFAULT_LANGUAGES = ("en", "es", "de", "fr", "ru", "zh")
ID_FIELDS = ("id", "instruction_id")  # LIDR layout, ICR layout
SPLITS = ("train", "dev", "heldout")  # values of the optional `split` field


class PromptSetError(ValueError):
    """Bad prompt input: the message names the file (and line) and how to fix it."""


@dataclass(frozen=True)
class PromptSet:
    """The same prompts in several languages. `instructions[lang][i]` is prompt `ids[i]` in `lang`."""

    languages: tuple[str, ...]
    ids: tuple[str, ...]
    instructions: Mapping[str, tuple[str, ...]]
    translation_task: frozenset[str] = frozenset()  # ids whose instruction is itself a translation task
    answers: Mapping[str, float] = field(default_factory=dict)  # id -> numeric answer (arithmetic prompts)
    kinds: Mapping[str, str] = field(default_factory=dict)  # id -> "general" | "arithmetic" | ... where given
    source: str = ""
    splits: Mapping[str, str] = field(default_factory=dict)  # id -> "train" | "dev" | "heldout" where labelled
    references: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # lang -> {id: reference answer}
    check_split: str = "heldout"  # the labelled split the before/after check draws from (`split_heldout`)
    # lang -> {id: the Alpaca `input` field}, already joined to its instruction on a new line; kept apart
    # for what needs the instruction alone (ICR's scoring prompt with icr.selection.scoring_input false)
    inputs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        if set(self.instructions) != set(self.languages):
            raise PromptSetError(
                f"instructions given for {sorted(self.instructions)}, languages {list(self.languages)}"
            )
        for lang in self.languages:
            if len(self.instructions[lang]) != len(self.ids):
                raise PromptSetError(f"{lang}: {len(self.instructions[lang])} instructions for {len(self.ids)} ids")
        if len(set(self.ids)) != len(self.ids):
            raise PromptSetError("prompt ids must be unique")
        bad = sorted({s for s in self.splits.values() if s not in SPLITS} | ({self.check_split} - set(SPLITS[1:])))
        if bad:
            raise PromptSetError(f"unknown split(s) {bad}: splits are {list(SPLITS)}; the check uses dev or heldout")

    def __len__(self) -> int:
        return len(self.ids)

    def by_id(self, lang: str) -> dict[str, str]:
        """{id: instruction} for one language."""
        return dict(zip(self.ids, self.instructions[lang]))

    def instruction(self, lang: str, prompt_id: str) -> str:
        return self.instructions[lang][self.ids.index(prompt_id)]

    def split_of(self, prompt_id: str) -> str:
        """The split label of one prompt; unlabelled prompts are training prompts."""
        return self.splits.get(prompt_id, "train")

    def split(self, name: str) -> PromptSet:
        """The prompts labelled `name` ("train" includes unlabelled ones), in the set's order."""
        if name not in SPLITS:
            raise PromptSetError(f"unknown split {name!r}: splits are {list(SPLITS)}")
        return self.select(pid for pid in self.ids if self.split_of(pid) == name)

    def select(self, ids: Iterable[str]) -> PromptSet:
        """The prompts with these ids, in the given order."""
        pos = {pid: i for i, pid in enumerate(self.ids)}
        ids = tuple(ids)
        missing = [pid for pid in ids if pid not in pos]
        if missing:
            raise PromptSetError(f"ids not in the prompt set {self.source}: {_show(missing)}")
        keep = [pos[pid] for pid in ids]
        sub = {lang: tuple(self.instructions[lang][i] for i in keep) for lang in self.languages}
        idset = set(ids)
        return replace(
            self,
            ids=ids,
            instructions=sub,
            translation_task=frozenset(self.translation_task & idset),
            answers={k: v for k, v in self.answers.items() if k in idset},
            kinds={k: v for k, v in self.kinds.items() if k in idset},
            splits={k: v for k, v in self.splits.items() if k in idset},
            references={lang: {k: v for k, v in refs.items() if k in idset} for lang, refs in self.references.items()},
            inputs={lang: {k: v for k, v in inp.items() if k in idset} for lang, inp in self.inputs.items()},
        )

    def with_languages(self, languages: Iterable[str]) -> PromptSet:
        languages = check_languages(languages)
        missing = [lang for lang in languages if lang not in self.languages]
        if missing:
            raise PromptSetError(f"prompt set {self.source} has no prompts in {missing}; it has {list(self.languages)}")
        return replace(
            self,
            languages=languages,
            instructions={lang: self.instructions[lang] for lang in languages},
            references={lang: refs for lang, refs in self.references.items() if lang in languages},
            inputs={lang: inp for lang, inp in self.inputs.items() if lang in languages},
        )


def _show(items, n: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


# ---------------------------------------------------------------- slicing


def iteration_slice(prompts: PromptSet, index: int, per_iteration: int | None, offset: int = 0) -> PromptSet:
    """Fresh prompts for iteration `index` (0 for the first): ids[offset + index*n : offset + (index+1)*n].

    The paper trains each iteration on new prompts (Alpagasus ids 0-999, then 1000-1999). With
    `per_iteration=None` every iteration reuses all prompts from `offset` on. Too few prompts left is
    an error (reusing prompts silently would change the method).
    """
    if index < 0 or offset < 0:
        raise PromptSetError(f"iteration index ({index}) and offset ({offset}) must be >= 0")
    if per_iteration is None:
        start, stop = offset, len(prompts)
    else:
        if per_iteration <= 0:
            raise PromptSetError(f"prompts per iteration must be positive, got {per_iteration}")
        start, stop = offset + index * per_iteration, offset + (index + 1) * per_iteration
    if stop > len(prompts) or start >= stop:
        raise PromptSetError(
            f"iteration {index} needs prompts {start}..{stop - 1} but {prompts.source or 'the prompt set'} has "
            f"{len(prompts)} prompts: lower prompts per iteration or the number of iterations, or add prompts"
        )
    return prompts.select(prompts.ids[start:stop])


def split_heldout(prompts: PromptSet, n_heldout: int, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """(train, held_out), both in the set's order.

    A set with `split` labels: train = the "train" (and unlabelled) prompts, never a dev or held-out
    one; held_out = `n_heldout` prompts drawn with a seeded RNG from the split named by
    `prompts.check_split` ("heldout", or "dev" while choosing settings), all of them when `n_heldout`
    is its size. A set without labels: `n_heldout` ids drawn from all prompts, the rest for training.
    """
    if not prompts.splits:
        if prompts.check_split != "heldout":
            raise PromptSetError(
                f"the check split {prompts.check_split!r} needs a prompt set whose rows carry `split` labels; "
                f"{prompts.source or 'this set'} has none: set check_split to heldout or label the rows"
            )
        if not 0 <= n_heldout < len(prompts):
            raise PromptSetError(f"held-out size {n_heldout} must be in [0, {len(prompts)}) for {len(prompts)} prompts")
        held = _seeded_draw(prompts.ids, n_heldout, seed)
        return prompts.select(pid for pid in prompts.ids if pid not in held), prompts.select(
            pid for pid in prompts.ids if pid in held
        )
    pool = prompts.split(prompts.check_split).ids
    if not 0 <= n_heldout <= len(pool):
        raise PromptSetError(
            f"held-out size {n_heldout} must be in [0, {len(pool)}]: {prompts.source or 'the prompt set'} labels "
            f"{len(pool)} prompts {prompts.check_split!r}; lower the held-out size or label more prompts"
        )
    train = prompts.split("train")
    if not len(train):
        raise PromptSetError(f"{prompts.source or 'the prompt set'} labels no prompt 'train': nothing to train on")
    held = _seeded_draw(pool, n_heldout, seed)
    return train, prompts.select(pid for pid in pool if pid in held)


def _seeded_draw(ids: Sequence[str], n: int, seed: int) -> set[str]:
    picked = np.random.default_rng(seed).choice(len(ids), size=n, replace=False).tolist()
    return {ids[i] for i in picked}


# ---------------------------------------------------------------- assembling rows into a PromptSet


@dataclass(frozen=True)
class _Row:
    id: str
    instruction: str
    where: str  # "file:line" or "source row N", for error messages
    translation_task: bool | None = None
    answer: float | None = None
    kind: str | None = None
    split: str | None = None
    reference: str | None = None
    input: str | None = None  # the Alpaca `input` field, already joined to `instruction`


def _assemble(rows: Mapping[str, list[_Row]], where: Mapping[str, str], source: str, task_ids=None) -> PromptSet:
    languages = tuple(rows)
    for lang in languages:
        if not rows[lang]:
            raise PromptSetError(f"empty prompt set: {where[lang]} has no prompts for language {lang!r}")
        first: dict[str, str] = {}
        for row in rows[lang]:
            if row.id in first:
                raise PromptSetError(
                    f"{row.where}: duplicate id {row.id!r} (first at {first[row.id]}); ids must be unique"
                )
            first[row.id] = row.where
    ref = "en" if "en" in languages else languages[0]
    ref_ids = [r.id for r in rows[ref]]
    problems = []
    for lang in languages:
        ids = {r.id for r in rows[lang]}
        lacks = [pid for pid in ref_ids if pid not in ids]
        extra = [r.id for r in rows[lang] if r.id not in set(ref_ids)]
        if lacks:
            problems.append(f"{where[lang]} lacks {len(lacks)} id(s) of {where[ref]}: {_show(lacks)}")
        if extra:
            problems.append(f"{where[lang]} has {len(extra)} id(s) not in {where[ref]}: {_show(extra)}")
    if problems:
        raise PromptSetError(
            "prompt ids do not align across languages: " + "; ".join(problems) + ". Every language needs the same ids."
        )
    instructions = {}
    for lang in languages:
        text = {r.id: r.instruction for r in rows[lang]}
        instructions[lang] = tuple(text[pid] for pid in ref_ids)
    flagged = {r.id for lang in languages for r in rows[lang] if r.translation_task}
    if task_ids is not None:
        flagged |= set(task_ids) & set(ref_ids)
    answers, kinds, splits, first_split = {}, {}, {}, {}
    for lang in languages:  # the first language that gives an answer/kind for an id wins
        for r in rows[lang]:
            if r.answer is not None:
                answers.setdefault(r.id, r.answer)
            if r.kind is not None:
                kinds.setdefault(r.id, r.kind)
            if r.split is not None:  # a split must agree: a disagreement could train on a held-out prompt
                if r.id in splits and splits[r.id] != r.split:
                    raise PromptSetError(
                        f"{r.where}: split {r.split!r} for id {r.id!r}, but {first_split[r.id]} says {splits[r.id]!r}; "
                        "every language file must give an id the same split"
                    )
                splits.setdefault(r.id, r.split)
                first_split.setdefault(r.id, r.where)
    references = {lang: {r.id: r.reference for r in rows[lang] if r.reference is not None} for lang in languages}
    references = {lang: refs for lang, refs in references.items() if refs}
    inputs = {lang: {r.id: r.input for r in rows[lang] if r.input} for lang in languages}
    return PromptSet(
        languages,
        tuple(ref_ids),
        instructions,
        frozenset(flagged),
        answers,
        kinds,
        source,
        splits,
        references,
        inputs={lang: inp for lang, inp in inputs.items() if inp},
    )


@dataclass(frozen=True)
class _Fields:
    """Field (column) names of one prompt source."""

    id: str
    instruction: str = "instruction"
    flag: str = "translation_task"
    answer: str = "answer"
    split: str = "split"
    reference: str = "reference"


def _row_from_record(rec, where: str, f: _Fields) -> _Row:
    if not isinstance(rec, dict):
        raise PromptSetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name in (f.id, f.instruction):
        if name not in rec:
            raise PromptSetError(
                f"{where}: no field {name!r} (fields here: {sorted(rec)}); set the id/instruction field"
            )
        if rec[name] is None:
            what = "the prompt's text" if name == f.instruction else "the prompt's id, the same in every language"
            raise PromptSetError(f"{where}: {name!r} is null; write {what} there, or remove that prompt")
    pid = rec[f.id]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise PromptSetError(f"{where}: id must be a string or integer, got {pid!r}")
    text = rec[f.instruction]
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where}: {f.instruction!r} must be a non-empty string, got {text!r}")
    extra = rec.get("input")  # Alpaca layout: the input follows the instruction on a new line
    if extra is not None and not isinstance(extra, str):
        raise PromptSetError(f"{where}: 'input' must be a string, got {extra!r}")
    if extra:
        text = text + "\n" + extra
    flag = rec.get(f.flag)
    if flag is not None and not isinstance(flag, bool):
        raise PromptSetError(f"{where}: {f.flag!r} must be true or false, got {flag!r}")
    answer = rec.get(f.answer)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (int, float))):
        raise PromptSetError(f"{where}: {f.answer!r} must be a number, got {answer!r}")
    split = rec.get(f.split)
    if split is not None and split not in SPLITS:
        raise PromptSetError(f"{where}: {f.split!r} must be one of {list(SPLITS)}, got {split!r}")
    reference = rec.get(f.reference)
    if reference is not None and (not isinstance(reference, str) or not reference.strip()):
        raise PromptSetError(f"{where}: {f.reference!r} must be a non-empty string, got {reference!r}")
    kind = rec.get("kind")
    return _Row(
        str(pid),
        text,
        where,
        flag,
        None if answer is None else float(answer),
        kind if isinstance(kind, str) else None,
        split,
        reference,
        extra or None,
    )


# ---------------------------------------------------------------- JSONL folders


def load_id_list(path: str | Path, id_field: str = "id") -> frozenset[str]:
    """Ids from a JSONL file with an `id` field (e.g. translation_task_ids.jsonl) or a text file, one id a line."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"id list {path} does not exist")
    if path.suffix == ".txt":
        return frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    ids = set()
    for lineno, rec in list(numbered_jsonl(path, PromptSetError)):
        if not isinstance(rec, dict) or id_field not in rec:
            raise PromptSetError(f"{path}:{lineno}: no field {id_field!r}; an id list needs one {id_field!r} a line")
        ids.add(str(rec[id_field]))
    return frozenset(ids)


def load_jsonl_dir(
    folder: str | Path,
    languages: Iterable[str],
    id_field: str | None = None,
    instruction_field: str = "instruction",
    translation_task_ids: str | Path | Iterable[str] | None = None,
    translation_task_field: str = "translation_task",
    answer_field: str = "answer",
    split_field: str = "split",
    reference_field: str = "reference",
) -> PromptSet:
    """A folder of `{lang}.jsonl`. `id_field=None` takes "id" or "instruction_id", whichever the files have."""
    folder = Path(folder)
    languages = check_languages(languages)
    if not languages:
        raise PromptSetError("no languages given: name at least one language code")
    if not folder.is_dir():
        raise PromptSetError(f"prompt folder {folder} does not exist")
    present = sorted(p.stem for p in folder.glob("*.jsonl"))
    rows, where = {}, {}
    for lang in languages:
        path = folder / f"{lang}.jsonl"
        if not path.is_file():
            raise PromptSetError(
                f"no prompt file for language {lang!r}: expected {path} (files there for: "
                f"{', '.join(present) or 'none'}); add the file or drop {lang!r} from the languages"
            )
        records = list(numbered_jsonl(path, PromptSetError))
        field_name = id_field or _detect_id_field(records, path)
        fields = _Fields(
            field_name, instruction_field, translation_task_field, answer_field, split_field, reference_field
        )
        rows[lang] = [_row_from_record(rec, f"{path}:{n}", fields) for n, rec in records]
        where[lang] = str(path)
    return _assemble(rows, where, str(folder), _task_ids(translation_task_ids))


def _detect_id_field(records, path) -> str:
    if not records:
        return ID_FIELDS[0]  # empty file: _assemble reports it
    lineno, rec = records[0]
    for name in ID_FIELDS:
        if isinstance(rec, dict) and name in rec:
            return name
    fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise PromptSetError(
        f"{path}:{lineno}: no id field (looked for {list(ID_FIELDS)}; fields: {fields}); set id_column"
    )


def _task_ids(spec) -> frozenset[str] | None:
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        return load_id_list(spec)
    return frozenset(str(x) for x in spec)


def load_default_prompts(languages: Iterable[str] = DEFAULT_LANGUAGES) -> PromptSet:
    """The project's own prompts (lidr_jax/methods/prompts/default): 216 per language in en, es, de, fr, ru,
    zh, labelled train / dev / heldout (the folder's README)."""
    return load_jsonl_dir(DEFAULT_PROMPTS_DIR, languages)


# ---------------------------------------------------------------- any datasets source


@dataclass(frozen=True)
class PromptSourceConfig:
    """Where prompts come from (a config section). "{lang}" in path, data_files, name or split is replaced
    by each language code (one file or config per language); otherwise `language_column` tells languages
    apart."""

    path: str = setting(
        "default",
        '"default" (the project\'s prompts), a folder of {lang}.jsonl, a local JSON/JSONL/Parquet/CSV file, '
        "or a hub dataset name",
    )
    languages: tuple[str, ...] = setting(DEFAULT_LANGUAGES, "languages to read (the run sets its own languages)")
    format: Literal["auto", "jsonl_dir", "datasets"] = setting("auto", "auto: from the path")
    id_column: str | None = setting(None, 'column of the prompt ids; null: "id" or "instruction_id"')
    instruction_column: str = setting("instruction", "column of the prompt text")
    language_column: str | None = setting(None, "column of the language code, when one file holds every language")
    data_files: str | None = setting(None, "datasets: file name or glob inside `path`, may contain {lang}")
    name: str | None = setting(None, "datasets: config name, may contain {lang}")
    split: str = setting("train", "datasets: the split to read, may contain {lang}")
    translation_task_ids: str | None = setting(None, 'a JSONL of {"id": ...} or a .txt of translation-task ids')
    translation_task_column: str = setting("translation_task", "column flagging translation-task prompts")
    answer_column: str = setting(
        "answer", "column of a prompt's numeric answer (arithmetic prompts), where there is one"
    )
    split_column: str = setting("split", 'optional labels train | dev | heldout (module docstring, "Splits")')
    reference_column: str = setting(
        "reference", "optional reference answers (lidr_jax.eval.heldout's likelihood signal)"
    )
    check_split: Literal["heldout", "dev"] = setting(
        "heldout",
        "the labelled split the before/after check answers: heldout (the final measurement) or dev "
        "(while choosing settings, so that the held-out numbers are never used to tune)",
    )

    def __post_init__(self):
        check_settings(self)


def load_prompts(source: PromptSourceConfig) -> PromptSet:
    """Load and validate the prompt set a `PromptSourceConfig` describes."""
    return replace(_load_source(source), check_split=source.check_split)


def _load_source(source: PromptSourceConfig) -> PromptSet:
    languages = check_languages(source.languages)
    if source.path == "default":
        return load_jsonl_dir(DEFAULT_PROMPTS_DIR, languages, translation_task_ids=source.translation_task_ids)
    fmt = source.format
    if fmt == "auto":
        is_dir = Path(source.path).is_dir()
        fmt = "jsonl_dir" if is_dir and source.data_files is None and source.language_column is None else "datasets"
    if fmt == "jsonl_dir":
        return load_jsonl_dir(
            source.path,
            languages,
            source.id_column,
            source.instruction_column,
            source.translation_task_ids,
            source.translation_task_column,
            source.answer_column,
            source.split_column,
            source.reference_column,
        )
    return _load_datasets_source(source, languages)


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _import_datasets():
    try:  # optional: the `datasets` extra, needed only for sources other than JSONL folders
        import datasets
    except ImportError:
        raise PromptSetError(
            "reading this prompt source needs the optional package `datasets`: pip install 'lidr_jax[datasets]' "
            "(a folder of {lang}.jsonl files needs nothing extra)"
        ) from None
    return datasets


def _load_one(datasets, source: PromptSourceConfig, lang: str | None):
    def sub(s):
        return s.replace("{lang}", lang) if (s is not None and lang is not None) else s

    path, data_files, name, split = sub(source.path), sub(source.data_files), sub(source.name), sub(source.split)
    local = Path(path)
    label = f"{path}" + (f" [{data_files}]" if data_files else "") + (f" ({name}/{split})" if name else "")
    try:
        if local.is_file():
            builder = _BUILDERS.get(local.suffix)
            if builder is None:
                raise PromptSetError(f"{local}: unsupported file type {local.suffix!r}; use one of {sorted(_BUILDERS)}")
            return datasets.load_dataset(builder, data_files=str(local), split="train"), label
        if local.is_dir() and data_files:
            files = sorted(local.glob(data_files))
            if not files:
                raise PromptSetError(
                    f"no file matches {local / data_files}" + (f" for language {lang!r}" if lang else "")
                )
            builder = _BUILDERS.get(files[0].suffix)
            if builder is None:
                raise PromptSetError(f"{files[0]}: unsupported file type; use one of {sorted(_BUILDERS)}")
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train"), label
        if not local.exists() and ("{lang}" in source.path or local.suffix in _BUILDERS or path.startswith((".", "/"))):
            raise PromptSetError(f"no prompt file for language {lang!r}: {path} does not exist")
        return datasets.load_dataset(path, name, split=split, data_files=data_files), label
    except PromptSetError:
        raise
    except Exception as e:  # hub or parsing failure: say what was being loaded and why
        raise PromptSetError(f"could not load prompts from {label}: {type(e).__name__}: {e}") from e


def _load_datasets_source(source: PromptSourceConfig, languages: tuple[str, ...]) -> PromptSet:
    datasets = _import_datasets()
    per_language = any("{lang}" in (s or "") for s in (source.path, source.data_files, source.name, source.split))
    if not per_language and source.language_column is None:
        raise PromptSetError(
            f"prompt source {source.path}: cannot tell languages apart; set language_column, or put {{lang}} "
            "in path, data_files, name or split (one file or config per language)"
        )
    tables = {lang: _load_one(datasets, source, lang) for lang in languages} if per_language else None
    if tables is None:
        ds, label = _load_one(datasets, source, None)
        _need_columns(ds, [source.language_column], label)
        lang_col = [str(x) for x in ds[source.language_column]]
        tables = {}  # rows in languages not asked for are left out
        for lang in languages:
            idx = [i for i, x in enumerate(lang_col) if x == lang]
            tables[lang] = (ds.select(idx), f"{label} ({source.language_column}={lang})")
    rows, where = {}, {}
    for lang, (ds, label) in tables.items():
        id_col = source.id_column or next((c for c in ID_FIELDS if c in ds.column_names), None)
        if id_col is None:
            raise PromptSetError(f"{label}: no id column (looked for {list(ID_FIELDS)}; columns: {ds.column_names})")
        _need_columns(ds, [id_col, source.instruction_column], label)
        fields = _Fields(
            id_col,
            source.instruction_column,
            source.translation_task_column,
            source.answer_column,
            source.split_column,
            source.reference_column,
        )
        optional = (fields.flag, fields.answer, fields.split, fields.reference, "kind")
        cols = [id_col, source.instruction_column] + [c for c in optional if c in ds.column_names]
        data = {c: list(ds[c]) for c in cols}
        rows[lang] = [
            _row_from_record({c: data[c][i] for c in cols}, f"{label} row {i}", fields) for i in range(len(ds))
        ]
        where[lang] = label
    return _assemble(rows, where, source.path, _task_ids(source.translation_task_ids))


def _need_columns(ds, columns, label):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise PromptSetError(f"{label}: no column {missing[0]!r} (columns: {ds.column_names}); set the column name")
