"""MGSM (Shi et al. 2022): grade-school math in 11 languages; accuracy of the final number and the
off-target rate (answers not written in the question's language).

Data layout (the benchmark's own): one file `mgsm_{lang}.tsv` per language, no header, each line
`question<TAB>answer`; the answer is a number, sometimes with a thousands separator ("114,200").

Prompt: the question in its own language inside the model's chat template, preceded by a short
zero-shot instruction written in the same language (ours, not the benchmark's) asking for reasoning
step by step and a last line "Answer: N" with the language's own word for "Answer". Few-shot is
optional: k (question, answer) pairs from another TSV file go before it as earlier chat turns.
Decoding is greedy.

Number extraction (`extract_number`) is deliberately forgiving, because a right answer written as
"১৮", "１８", "18,00 €" or "$1,234." must not count as wrong:
- any Unicode decimal digit (Bengali, Telugu, Thai, Arabic-Indic, full-width, ...) becomes ASCII;
- thousands separators (`,` `.` `'` and spaces, only in groups of exactly 3) and decimal comma or
  point are told apart by position and group lengths;
- the number after the last answer marker ("Answer", "Antwort", "Ответ", "答案", "উত্তর", "####",
  "\\boxed{" ...) wins; without a marker, the last number of the text.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from lidr_jax.files import as_path, read_utf8
from lidr_jax.methods.langid import detect_language

MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

# The word for "Answer" per language: used both in the instruction and as an extraction marker.
ANSWER_WORD = {
    "bn": "উত্তর",
    "de": "Antwort",
    "en": "Answer",
    "es": "Respuesta",
    "fr": "Réponse",
    "ja": "答え",
    "ru": "Ответ",
    "sw": "Jibu",
    "te": "సమాధానం",
    "th": "คำตอบ",
    "zh": "答案",
}

# Zero-shot instructions, one per language, written for this project. `{question}` is substituted.
ZERO_SHOT_TEMPLATES = {
    "en": 'Solve the following math problem step by step. End with a line "Answer: N", where N is the final '
    "number.\n\n{question}",
    "de": 'Löse die folgende Mathematikaufgabe Schritt für Schritt. Schließe mit einer Zeile "Antwort: N" ab, '
    "wobei N die Endzahl ist.\n\n{question}",
    "es": 'Resuelve el siguiente problema de matemáticas paso a paso. Termina con una línea "Respuesta: N", '
    "donde N es el número final.\n\n{question}",
    "fr": "Résous le problème de mathématiques suivant étape par étape. Termine par une ligne « Réponse : N », "
    "où N est le nombre final.\n\n{question}",
    "ru": "Реши следующую математическую задачу шаг за шагом. Закончи строкой «Ответ: N», где N — итоговое "
    "число.\n\n{question}",
    "zh": "请一步一步地解答下面的数学题。最后一行写“答案：N”，其中 N 是最终的数字。\n\n{question}",
    "ja": "次の算数の問題を一歩ずつ解いてください。"
    "最後に「答え：N」（N は最終的な数値）という行で終えてください。\n\n{question}",
    "bn": 'নিচের গণিত সমস্যাটি ধাপে ধাপে সমাধান করো। শেষে "উত্তর: N" লাইনটি লেখো, যেখানে N হলো চূড়ান্ত সংখ্যা।\n\n{question}',
    "te": 'కింది గణిత సమస్యను దశలవారీగా పరిష్కరించండి. చివరగా "సమాధానం: N" అనే వరుసతో ముగించండి, ఇక్కడ N తుది సంఖ్య.\n\n{question}',
    "th": 'จงแก้โจทย์คณิตศาสตร์ต่อไปนี้ทีละขั้นตอน แล้วจบด้วยบรรทัด "คำตอบ: N" โดยที่ N คือตัวเลขสุดท้าย\n\n{question}',
    "sw": 'Tatua tatizo lifuatalo la hisabati hatua kwa hatua. Malizia kwa mstari "Jibu: N", ambapo N ni namba ya '
    "mwisho.\n\n{question}",
}

# Markers after which the final answer is expected. Every language's marker is tried on every output:
# an off-target answer (a French question answered in English) still has its number read.
_EXTRA_MARKERS = ("answer is", "final answer", "####", "\\boxed{", "réponse finale", "respuesta final", "答")
_MARKER_RE = re.compile(
    "|".join(re.escape(m) for m in sorted({*ANSWER_WORD.values(), *_EXTRA_MARKERS}, key=len, reverse=True)),
    re.IGNORECASE,
)

# A number: an optional minus not glued to a word or digit; then either digits grouped by spaces in
# threes (French "1 234,5"), or digits with inner , . ' ’ separators. Validity is decided in Python.
_SPACE = " \u00a0\u202f\u2009"
_NUMBER_RE = re.compile(
    rf"(?<![0-9A-Za-z])(-)?"
    rf"(\d{{1,3}}(?:[{_SPACE}]\d{{3}})+(?:[.,]\d+)?(?!\d)|\d+(?:[.,'’]\d+)*)"
)


@dataclasses.dataclass(frozen=True)
class MgsmItem:
    question: str
    answer: float


def mgsm_file(data_dir: str | Path, lang: str) -> Path:
    return as_path(data_dir) / f"mgsm_{lang}.tsv"


def read_mgsm(path: str | Path, limit: int | None = None) -> list[MgsmItem]:
    """Items of one MGSM TSV file (the first `limit` if given)."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MGSM file {path} not found; point the data path at a folder of mgsm_{{lang}}.tsv")
    items = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        answer = parse_number(parts[-1].strip()) if len(parts) == 2 else None
        if answer is None:
            raise ValueError(f"{path}:{lineno}: expected 'question<TAB>number', got {line[:80]!r}")
        items.append(MgsmItem(parts[0].strip(), answer))
        if limit is not None and len(items) >= limit:
            break
    return items


def mgsm_messages(question: str, lang: str, examples: Sequence[MgsmItem] = ()) -> list[dict[str, str]]:
    """The chat messages for one question: k solved examples as earlier turns, then the question."""
    if lang not in ZERO_SHOT_TEMPLATES:
        raise ValueError(f"no MGSM instruction for language {lang!r}; known: {sorted(ZERO_SHOT_TEMPLATES)}")
    template = ZERO_SHOT_TEMPLATES[lang]
    messages = []
    for ex in examples:
        messages.append({"role": "user", "content": template.format(question=ex.question)})
        messages.append({"role": "assistant", "content": f"{ANSWER_WORD[lang]}: {format_number(ex.answer)}"})
    messages.append({"role": "user", "content": template.format(question=question)})
    return messages


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def normalize_digits(text: str) -> str:
    """Every Unicode decimal digit as ASCII (Bengali, Telugu, Thai, Arabic-Indic, full-width, ...);
    full-width ASCII forms, Arabic decimal/thousands separators and the minus sign as ASCII.

    Not NFKC: that would also turn "m²" into "m2" and invent a number."""
    out = []
    for ch in text:
        if ch.isdecimal() and not ("0" <= ch <= "9"):
            out.append(str(unicodedata.decimal(ch)))
        elif "\uff01" <= ch <= "\uff5e":  # full-width ASCII block, 0xFEE0 above the ASCII one
            out.append(chr(ord(ch) - 0xFEE0))
        else:
            out.append(ch)
    return "".join(out).translate({0x066B: ".", 0x066C: ",", 0x2212: "-", 0x3000: " "})


def parse_number(token: str) -> float | None:
    """A number written with any usual grouping and decimal convention, or None if it is not one.

    "1,234" "1.234" "1 234" "1'234" -> 1234 (one separator followed by exactly 3 digits is a thousands
    separator: MGSM answers are integers, so this is the safer reading); "3,5" "3.5" -> 3.5;
    "1.234,5" "1,234.5" -> 1234.5 (the last separator is the decimal one). Bad grouping ("1,2,3") -> None.
    """
    token = normalize_digits(token).strip()
    negative = token.startswith("-")
    body = token[1:] if negative else token
    body = re.sub(f"[{_SPACE}'’]", "_", body)  # these only ever group thousands
    if not re.fullmatch(r"\d+(?:[_.,]\d+)*", body):
        return None
    seps = re.findall(r"[_.,]", body)
    decimal = None
    if seps and seps[-1] in ".," and (len(seps) == 1 or seps[-1] not in seps[:-1]):
        # The last separator is a decimal one unless it is a lone "," or "." before exactly 3 digits.
        tail = body.rsplit(seps[-1], 1)[1]
        head = body.rsplit(seps[-1], 1)[0]
        lone_group = len(seps) == 1 and len(tail) == 3 and head != "0"
        if not lone_group:
            decimal = seps[-1]
    if decimal is not None:
        int_part, frac = body.rsplit(decimal, 1)
    else:
        int_part, frac = body, ""
    groups = re.split(r"[_.,]", int_part)
    if len(groups) > 1 and (len(groups[0]) > 3 or any(len(g) != 3 for g in groups[1:])):
        return None
    if len(set(re.findall(r"[_.,]", int_part))) > 1:
        return None  # mixed group separators: "1.234,567.8"
    value = float("".join(groups) + ("." + frac if frac else ""))
    return -value if negative else value


def find_numbers(text: str) -> list[float]:
    """Every number in `text`, in order. A badly grouped run ("1,2,3") counts as its separate parts."""
    text = normalize_digits(text)
    numbers = []
    for m in _NUMBER_RE.finditer(text):
        value = parse_number((m.group(1) or "") + m.group(2))
        if value is None:
            parts = [float(p) for p in re.split(rf"[.,'’{_SPACE}]", m.group(2)) if p]
            if m.group(1) and parts:
                parts[0] = -parts[0]
            numbers.extend(parts)
        else:
            numbers.append(value)
    return numbers


def extract_number(text: str) -> float | None:
    """The model's final answer: the first number after the last answer marker that has a number after
    it, else the last number in the text, else None."""
    text = normalize_digits(text).replace("*", "")  # markdown bold around "**Answer:**"
    for m in reversed(list(_MARKER_RE.finditer(text))):
        after = find_numbers(text[m.end() :])
        if after:
            return after[0]
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def is_correct(prediction: float | None, answer: float) -> bool:
    return prediction is not None and abs(prediction - answer) < 1e-6 * max(1.0, abs(answer))


def score_mgsm(
    items: Sequence[MgsmItem], outputs: Sequence[str], lang: str, too_long: Sequence[bool] | None = None
) -> dict:
    """Accuracy and off-target rate of `outputs` (one model answer per item, same order) in `lang`.

    Returns {"accuracy", "off_target_rate", "n", "prompt_too_long", "records": [{question, answer, output,
    prediction, correct, detected_language, prompt_too_long}]}. An answer with no letters at all counts
    as off-target. `too_long[i]`: item i's prompt did not fit the context after the answer budget, so it
    was not answered (never cut); it stays in `n` and is scored wrong, and `prompt_too_long` counts it.
    """
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} MGSM items but {len(outputs)} outputs for {lang}")
    too_long = list(too_long) if too_long is not None else [False] * len(items)
    records = []
    for item, out, skipped in zip(items, outputs, too_long):
        pred = extract_number(out)
        detected = detect_language(out)
        records.append(
            dict(
                question=item.question,
                answer=item.answer,
                output=out,
                prediction=pred,
                correct=is_correct(pred, item.answer),
                detected_language=detected,
                prompt_too_long=bool(skipped),
            )
        )
    n = len(records)
    return dict(
        accuracy=sum(r["correct"] for r in records) / n if n else 0.0,
        off_target_rate=sum(r["detected_language"] != lang for r in records) / n if n else 0.0,
        n=n,
        prompt_too_long=sum(too_long),
        records=records,
    )
