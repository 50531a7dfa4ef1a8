"""Preference-pair datasets: read/write, chat-template tokenization, truncation and bucketed batches.

Formats read (JSONL, or a JSON list in a `.json` file; the format is detected per record):
- TRL: `prompt` / `chosen` / `rejected` (`reject` accepted as an alias). Each is a string or a chat
  message list. A string prompt is treated as one user turn and a string response as one assistant
  turn, because the pipeline always trains through the model's chat template. Without `prompt` and
  with message lists ("implicit prompt"), the prompt is the longest shared leading run of messages.
  Any other keys (language, prompt id, source...) are provenance: kept in `PreferencePair.extra` and
  written back by `write_trl_jsonl`.
- LLaMA-Factory alpaca ranking: `instruction`, `input`, `output: [chosen, rejected]` (the older
  form) or `chosen`/`rejected` keys (the current form); optional `system` and `history`
  ([[user, assistant], ...]). The user turn is `instruction + "\\n" + input`, as LLaMA-Factory does.

Formats written, for other trainers (`python -m lidr_jax.pairs convert`, and every pairs stage):
TRL JSONL (`write_trl_jsonl`; TRL and OpenRLHF read it as it is) and LLaMA-Factory alpaca ranking
JSONL with its `dataset_info.json` entry (`write_llamafactory`; chosen/rejected as plain strings).

Tokenization (`encode_pairs`): prompt = `chat_ids(prompt, add_generation_prompt=True)`; response =
the text that the full conversation's rendering adds after the prompt's rendering (the assistant
text plus the template's end-of-turn), checked by prefix. Truncation rule: a prompt longer than
`max_prompt_len` keeps its END (the instruction's last words sit next to the answer); a response
longer than `max_response_len` keeps its START (the part the model writes first). Both are counted.

Batches (`pair_batch`): one packed row per pair, `prompt | chosen | rejected`, right padded, so the
prompt is run once for both answers; T is the batch's longest row rounded up to a bucket
(`bucket_length`) so jit compiles once per bucket. Only the logits that predict an answer token
are computed (`logit_index`), so the prompt and the padding contribute nothing to a log-prob.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidr_jax.files import atomic_write_json, atomic_write_jsonl, numbered_jsonl
from lidr_jax.model.scoring import AnswerRows, answer_batch
from lidr_jax.model.scoring import answer_token_ids as response_ids

Message = dict[str, str]
Turns = list[Message]


class PairFormatError(ValueError):
    """A pair file record is malformed; the message names the file and line."""


@dataclasses.dataclass
class PreferencePair:
    """One preference pair as written by the user: prompt and responses in their original form
    (string or message list) and any provenance keys."""

    prompt: str | Turns
    chosen: str | Turns
    rejected: str | Turns
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------ reading


def _is_turns(x) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x
    )


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


ROLES = ("system", "user", "assistant")  # what a chat template renders; any other role is a typo or a tool turn


def _check_field(value, name: str):
    if not (isinstance(value, str) or (_is_turns(value) and value)):
        raise ValueError(
            f"`{name}` must be a string or a non-empty list of {{role, content}} messages with string values, "
            f"got {_shown(value)}; write the text as a JSON string"
        )
    for m in value if isinstance(value, list) else ():
        if m["role"] not in ROLES:
            raise ValueError(f"`{name}` has a message with role {_shown(m['role'])}; roles are {', '.join(ROLES)}")
    return value


def pair_from_record(rec: dict[str, Any]) -> PreferencePair:
    """A `PreferencePair` from one TRL or LLaMA-Factory alpaca record (raises ValueError if neither)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    rec = dict(rec)
    if "instruction" in rec:  # LLaMA-Factory alpaca ranking
        instruction, query = rec.pop("instruction"), rec.pop("input", "") or ""
        if not isinstance(instruction, str) or not isinstance(query, str):
            bad = ("instruction", instruction) if not isinstance(instruction, str) else ("input", query)
            raise ValueError(f"alpaca `{bad[0]}` must be a string, got {_shown(bad[1])}")
        if "output" in rec:
            out = rec.pop("output")
            if not (isinstance(out, list) and len(out) == 2 and all(isinstance(o, str) for o in out)):
                raise ValueError("alpaca ranking `output` must be a list of two strings [chosen, rejected]")
            chosen, rejected = out
        elif "chosen" in rec and ("rejected" in rec or "reject" in rec):
            chosen, rejected = rec.pop("chosen"), rec.pop("rejected", None) or rec.pop("reject")
        else:
            raise ValueError("alpaca ranking record needs `output: [chosen, rejected]` or `chosen` and `rejected`")
        turns: Turns = []
        system = rec.pop("system", None)
        if system is not None and not isinstance(system, str):
            raise ValueError(f"alpaca `system` must be a string, got {_shown(system)}")
        if system:
            turns.append({"role": "system", "content": system})
        for pair in rec.pop("history", None) or []:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"alpaca `history` must hold [user, assistant] string pairs, got {_shown(pair)}")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = instruction + ("\n" + query if query else "")
        prompt: str | Turns = user if not turns else turns + [{"role": "user", "content": user}]
        return PreferencePair(prompt, _check_field(chosen, "chosen"), _check_field(rejected, "rejected"), rec)
    if "rejected" in rec and "reject" in rec:
        raise ValueError("record has both `rejected` and its alias `reject`; keep one")
    if "chosen" not in rec or ("rejected" not in rec and "reject" not in rec):
        raise ValueError(
            "record is neither TRL (`prompt`/`chosen`/`rejected`) nor LLaMA-Factory alpaca "
            f"(`instruction`/`input`/`output`); keys: {sorted(rec)}"
        )
    chosen = _check_field(rec.pop("chosen"), "chosen")
    rejected = _check_field(rec.pop("rejected") if "rejected" in rec else rec.pop("reject"), "rejected")
    if "prompt" in rec:
        return PreferencePair(_check_field(rec.pop("prompt"), "prompt"), chosen, rejected, rec)
    if not (_is_turns(chosen) and _is_turns(rejected)):
        raise ValueError("record has no `prompt`; an implicit prompt needs message lists for chosen and rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("record has no `prompt` and chosen/rejected share no leading messages")
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], rec)


def _records(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed JSON) for a JSONL file, or (index + 1, item) for a JSON list file."""
    if path.suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = ""  # not a JSON list then: numbered_jsonl names the file, the line and the fix
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise PairFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg}) at line {e.lineno}") from None
            yield from ((i + 1, item) for i, item in enumerate(items))
            return
    yield from numbered_jsonl(path, PairFormatError)


def _numbered_pairs(path: Path) -> list[tuple[int, PreferencePair]]:
    """(line number, or item number of a JSON list; pair) of every record (`read_pairs`)."""
    if not path.exists():
        raise FileNotFoundError(f"pair file {path} does not exist")
    if path.is_dir():
        raise PairFormatError(f"pair file {path} is a folder; pass a .jsonl or .json file of pairs")
    pairs = []
    for lineno, rec in _records(path):
        try:
            pairs.append((lineno, pair_from_record(rec)))
        except ValueError as e:
            where = f" (item {lineno} of the JSON list)" if path.suffix == ".json" else ""
            raise PairFormatError(f"{path}:{lineno}{where}: {e}") from None
    if not pairs:
        raise PairFormatError(f"{path}: no pairs in the file")
    return pairs


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """All pairs of a JSONL or JSON-list file, TRL or LLaMA-Factory alpaca records (mixed is fine).
    A malformed record raises `PairFormatError` naming the file and line (item number for JSON lists)."""
    return [p for _, p in _numbered_pairs(Path(path))]


# Pairs DPO can learn no preference from, by reason: the same answer twice gives a DPO loss whose
# gradient is zero whatever the weights (only the NLL term trains, on that answer), and an empty
# chosen answer is its end-of-turn alone, so the pair teaches the model to stop before answering.
DEGENERATE = {
    "empty_chosen": "with an empty chosen answer",
    "identical": "whose chosen answer equals the rejected one",
}


def _answer(x: str | Turns) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in _turns(x, "assistant")]


def degenerate_reason(p: PreferencePair) -> str | None:
    """A key of `DEGENERATE` when `p` is such a pair (compared after stripping whitespace), else None."""
    chosen = _answer(p.chosen)
    if not any(text for _, text in chosen):
        return "empty_chosen"
    if chosen == _answer(p.rejected):
        return "identical"
    return None


def read_training_pairs(path: str | os.PathLike, drop_degenerate: bool = True) -> tuple[list[PreferencePair], str]:
    """`read_pairs` for training: the pairs to train on, and a one-line warning that counts the
    `DEGENERATE` pairs with their lines ("" when there are none). They are left out when
    `drop_degenerate` (what the pipeline's pair filters do by default), else kept (what TRL does,
    silently). `PairFormatError` when nothing is left to train on."""
    path = Path(path)
    numbered = _numbered_pairs(path)
    found: dict[str, list[int]] = {}
    kept = []
    for lineno, p in numbered:
        reason = degenerate_reason(p)
        if reason is not None:
            found.setdefault(reason, []).append(lineno)
        if reason is None or not drop_degenerate:
            kept.append(p)
    if not found:
        return kept, ""
    where = "item" if path.suffix == ".json" else "line"
    counts = []
    for reason, lines in found.items():
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        counts.append(f"{len(lines)} {DEGENERATE[reason]} ({where}{'s' if len(lines) > 1 else ''} {shown})")
    n = sum(map(len, found.values()))
    counted = f"{path}: {n} of {len(numbered)} pairs teach DPO no preference: {'; '.join(counts)}"
    if not kept:
        raise PairFormatError(
            f"{counted}; nothing is left to train on: fix the file, or set drop_degenerate_pairs=false to train on them"
        )
    if drop_degenerate:
        return kept, (
            f"warning: {counted}; left out of training (an identical pair has a zero DPO gradient, an empty chosen "
            "answer teaches the model to stop at once); fix or remove them, or set drop_degenerate_pairs=false "
            "to train on them as TRL does"
        )
    return kept, f"warning: {counted}; trained on anyway (drop_degenerate_pairs=false)"


def trl_record(p: PreferencePair) -> dict[str, Any]:
    """A TRL record: `prompt`, `chosen`, `rejected` as given (strings or message lists), then the
    provenance keys. TRL's DPOTrainer and OpenRLHF read it as it is."""
    return {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **p.extra}


def write_trl_jsonl(pairs: Sequence[PreferencePair], path: str | os.PathLike) -> Path:
    """TRL JSONL (`trl_record` per line), written atomically."""
    return atomic_write_jsonl(path, (trl_record(p) for p in pairs))


def _text_of(x: str | Turns, what: str) -> str:
    if isinstance(x, str):
        return x
    if len(x) == 1 and x[0]["role"] == "assistant":
        return x[0]["content"]
    raise ValueError(f"alpaca format holds a single assistant answer; this {what} has {len(x)} messages")


def alpaca_record(p: PreferencePair) -> dict[str, Any]:
    """One LLaMA-Factory alpaca ranking record: `instruction`, `input` (""), optional `system` and
    `history` ([[user, assistant], ...]), `chosen` and `rejected` as plain strings (LLaMA-Factory's
    converter takes a pair only when both are strings), then the provenance keys. A multi-turn prompt
    must alternate user/assistant and end with a user turn."""
    turns = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else list(p.prompt)
    rec: dict[str, Any] = {}
    if turns[0]["role"] == "system":
        rec["system"] = turns.pop(0)["content"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("alpaca format needs the prompt to end with a user turn")
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"alpaca history must alternate user/assistant; message {i} is {m['role']!r}")
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    rec = {"instruction": turns[-1]["content"], "input": "", **rec}
    if history:
        rec["history"] = history
    rec["chosen"], rec["rejected"] = _text_of(p.chosen, "chosen"), _text_of(p.rejected, "rejected")
    return {**rec, **p.extra}


def llamafactory_records(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """`alpaca_record` of every pair with the same keys in every row: `system` ("") and `history` ([])
    are filled in everywhere when any pair has them, because LLaMA-Factory loads the file with
    `datasets`, which gives a row without a key None, and its converter wants a string system prompt."""
    records = [alpaca_record(p) for p in pairs]
    for key, empty in (("system", ""), ("history", [])):
        if any(key in r for r in records):
            for r in records:
                r.setdefault(key, empty)
    return records


def llamafactory_dataset_entry(file_name: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `dataset_info.json` entry that makes LLaMA-Factory read `file_name` as a ranking (DPO) set."""
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    for key in ("system", "history"):
        if records and key in records[0]:
            columns[key] = key
    return {"file_name": file_name, "formatting": "alpaca", "ranking": True, "columns": columns}


def write_llamafactory(
    pairs: Sequence[PreferencePair],
    path: str | os.PathLike,
    name: str,
    *,
    write_jsonl=atomic_write_jsonl,
    write_json=atomic_write_json,
) -> dict[str, Path]:
    """LLaMA-Factory files for `pairs`: the alpaca ranking records at `path` (JSONL) and an entry `name`
    in `dataset_info.json` beside it (an existing file keeps its other entries), so LLaMA-Factory
    trains on them with `dataset_dir: <path's folder>` and `dataset: <name>`.

    `write_jsonl(path, rows)` and `write_json(path, obj)` write the files (the pipeline passes its run
    directory's writers). Returns {"pairs": path, "dataset_info": path}."""
    path = Path(path)
    records = llamafactory_records(pairs)
    info_path = path.parent / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{info_path} is not valid JSON ({e.msg}); fix or remove it") from None
        if not isinstance(info, dict):
            raise ValueError(f"{info_path} is not a JSON object of dataset entries; fix or remove it")
    info[name] = llamafactory_dataset_entry(path.name, records)
    write_jsonl(path, records)
    write_json(info_path, info)
    return {"pairs": path, "dataset_info": info_path}


def check_destination(dst: str | os.PathLike) -> None:
    """OUT of `pairs convert` is a file path: not empty, not a folder, not under a file."""
    if not os.fspath(dst).strip():
        raise PairFormatError("OUT is empty; give the file to write, e.g. pairs.trl.jsonl")
    out = Path(dst)
    if out.is_dir():
        raise PairFormatError(f"OUT {out} is a folder; give a file path to write, e.g. {out / 'pairs.jsonl'}")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PairFormatError(f"OUT {out} cannot be written: {parent} is a file; give a path under a folder")


def convert(
    src: str | os.PathLike, to: str, dst: str | os.PathLike, name: str | None = None, drop_degenerate: bool = False
) -> dict[str, Path]:
    """Rewrite the pair file `src` (TRL or LLaMA-Factory alpaca, JSONL or JSON list) for another trainer:
    `to="trl"` writes TRL JSONL at `dst`; `to="llamafactory"` writes alpaca ranking JSONL at `dst`
    and its `dataset_info.json` entry `name` (default: `dst`'s stem) beside it. The DPO command's
    checks apply: a pair with an empty chosen answer or chosen == rejected is refused (`PairFormatError`
    naming the lines), or left out with `drop_degenerate` (the warning printed on stderr)."""
    check_destination(dst)
    pairs, warning = read_training_pairs(src, drop_degenerate=False)
    if warning:
        counted = warning.removeprefix("warning: ").split("; trained on anyway")[0]
        if not drop_degenerate:
            raise PairFormatError(f"{counted}; fix or remove them, or pass --drop-degenerate to leave them out")
        pairs = [p for p in pairs if degenerate_reason(p) is None]
        if not pairs:
            raise PairFormatError(f"{counted}; nothing is left to convert")
        print(f"warning: {counted}; left out", file=sys.stderr)
    if to == "trl":
        return {"pairs": write_trl_jsonl(pairs, dst)}
    if to == "llamafactory":
        return write_llamafactory(pairs, dst, name or Path(dst).stem)
    raise ValueError(f"unknown pair format {to!r}; choose trl or llamafactory")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lidr_jax.pairs convert IN --to trl|llamafactory OUT [--name NAME]`."""
    parser = argparse.ArgumentParser(
        prog="python -m lidr_jax.pairs", description="Preference-pair files for other trainers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert",
        help="rewrite a pair file as TRL JSONL or LLaMA-Factory alpaca ranking (+ dataset_info.json)",
        description="IN: TRL (prompt/chosen/rejected, strings or messages) or LLaMA-Factory alpaca ranking "
        "records, JSONL or a JSON list. OUT: a .jsonl file; for llamafactory, dataset_info.json beside it gets "
        "an entry NAME (other entries are kept), so LLaMA-Factory reads it with dataset_dir=OUT's folder.",
    )
    c.add_argument("src", metavar="IN")
    c.add_argument("--to", required=True, choices=("trl", "llamafactory"))
    c.add_argument("dst", metavar="OUT")
    c.add_argument("--name", default=None, help="dataset name in dataset_info.json (default: OUT's stem)")
    c.add_argument(
        "--drop-degenerate",
        action="store_true",
        help="leave out pairs with an empty chosen answer or chosen == rejected (refused otherwise)",
    )
    args = parser.parse_args(argv)
    if Path(args.dst).resolve() == Path(args.src).resolve():
        print(f"error: OUT is IN ({args.src}); write to another file", file=sys.stderr)
        return 2
    try:
        written = convert(args.src, args.to, args.dst, args.name, args.drop_degenerate)
    except (PairFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


# ------------------------------------------------------------------------------------- tokenization


def _turns(x: str | Turns, role: str) -> Turns:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


@dataclasses.dataclass
class EncodedPairs:
    """Token ids of every pair (prompt shared by chosen and rejected) and truncation counts."""

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    truncated_prompts: int = 0
    truncated_responses: int = 0
    truncated_to_row: int = 0  # pairs cut to fit one packed row (`fit_pair`)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> np.ndarray:
        """Packed row length of each pair: prompt + chosen + rejected (`pair_batch`)."""
        return np.array(
            [len(p) + len(c) + len(r) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], np.int64
        )

    def answer_lengths(self) -> np.ndarray:
        """Scored tokens of each pair: chosen + rejected (`pair_batch`'s entries)."""
        return np.array([len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids)], np.int64)

    def fingerprint(self) -> str:
        """A hash of every token id: stored reference log-probs are checked against it."""
        h = hashlib.sha256()
        for arrays in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            for a in arrays:
                h.update(np.asarray(a, np.int32).tobytes() + b"|")
        return h.hexdigest()[:16]

    def summary(self) -> str:
        return (
            f"{len(self)} pairs; truncated: {self.truncated_prompts} prompts (kept their end), "
            f"{self.truncated_responses} responses (kept their start), "
            f"{self.truncated_to_row} pairs to fit a row"
        )


def fit_pair(p: np.ndarray, c: np.ndarray, r: np.ndarray, row_tokens: int):
    """A pair cut to fit one packed row of `row_tokens` (prompt + chosen + rejected), and whether it was cut.

    Rule: a prompt longer than half the row keeps its last row_tokens // 2 tokens; then, if the answers
    do not fit the rest (A tokens), each keeps its start: the shorter answer keeps up to half of A
    (at least 1 token), the longer one the remainder."""
    if len(p) + len(c) + len(r) <= row_tokens:
        return p, c, r, False
    if row_tokens < 4:
        raise ValueError(f"row_tokens={row_tokens} cannot hold a prompt and two answers")
    p = p[-(row_tokens // 2) :] if len(p) > row_tokens // 2 else p
    budget = row_tokens - len(p)
    if len(c) + len(r) > budget:
        short = min(len(c), len(r), max(1, budget // 2))
        keep_c, keep_r = (short, budget - short) if len(c) <= len(r) else (budget - short, short)
        c, r = c[: min(len(c), keep_c)], r[: min(len(r), keep_r)]
    return p, c, r, True


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer, max_prompt_len: int, max_response_len: int, row_tokens: int = 0
) -> EncodedPairs:
    """Tokenize pairs with the model's chat template and apply the truncation rule (module docstring);
    with `row_tokens` (several pairs per row, lidr_jax.train.packing) each pair is then cut to fit one
    row (`fit_pair`, counted in `truncated_to_row`)."""
    enc = EncodedPairs([], [], [])
    for p in pairs:
        prompt = _turns(p.prompt, "user")
        ids = tokenizer.chat_ids(prompt, add_generation_prompt=True)
        if len(ids) > max_prompt_len:
            ids = ids[-max_prompt_len:]
            enc.truncated_prompts += 1
        enc.prompt_ids.append(np.asarray(ids, np.int32))
        for resp, out in ((p.chosen, enc.chosen_ids), (p.rejected, enc.rejected_ids)):
            r = response_ids(tokenizer, prompt, _turns(resp, "assistant"))
            if len(r) > max_response_len:
                r = r[:max_response_len]
                enc.truncated_responses += 1
            if not r:
                raise ValueError("a response encodes to zero tokens; every pair needs a non-empty answer")
            out.append(np.asarray(r, np.int32))
        if row_tokens and row_tokens != "auto":  # auto: rows chosen later (lidr_jax.train.autotune)
            *fitted, cut = fit_pair(enc.prompt_ids[-1], enc.chosen_ids[-1], enc.rejected_ids[-1], row_tokens)
            enc.prompt_ids[-1], enc.chosen_ids[-1], enc.rejected_ids[-1] = fitted
            enc.truncated_to_row += int(cut)
    return enc


# ------------------------------------------------------------------------------------------ batches


def pair_batch(enc: EncodedPairs, indices: Sequence[int], pad_id: int, **shape) -> dict[str, np.ndarray]:
    """A batch of pairs, one packed row per pair: `prompt | chosen | rejected | padding`.

    The prompt is run once for both answers (a quarter of the FLOPs of two rows when prompt and
    answers are equally long): the rejected answer attends to the prompt and to itself, never to the
    chosen answer, and its positions continue from the prompt's end, as in its own row
    (lidr_jax.model.llama.hidden_states, `segments_BT`).

    Keys, [B, T]: tokens, positions, segments (0 prompt, 1 chosen, 2 rejected), attention_mask (real
    tokens). Keys, [B, E]: one entry per response token to score: logit_index (the position whose
    logits predict it: the last prompt token for the first token of either answer, else the answer's
    previous token), targets (the token), chosen_mask / rejected_mask (which answer it belongs to;
    padding entries are in neither). E is the longest chosen + rejected, bucketed like T. And weight
    [B]: 1 for real pairs, 0 for filler pairs that pad a short last batch up to `batch_size`, so
    shapes stay static. `shape`: batch_size, length (forces T), entries (forces E), bucket_multiple, as
    lidr_jax.model.scoring.answer_batch takes them.
    """
    out = answer_batch(AnswerRows(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids), indices, pad_id, **shape)
    out["weight"] = (np.arange(len(out["tokens"])) < len(indices)).astype(np.float32)  # filler rows: weight 0
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The pair order of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run sees the same data in the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)
