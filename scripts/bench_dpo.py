"""DPO train-step benchmark: lidr_jax vs TRL's DPOTrainer (PyTorch), side by side on this CPU.

    python scripts/bench_dpo.py                 # CPU: embedded SmolLM2-135M (float32), 4 pairs x 256 tokens
    python scripts/bench_dpo.py --gpu           # GPU: random Llama-3.2-1B and Llama-3-8B configs, bf16 compute
    python scripts/bench_dpo.py --gpu --dry-run # the GPU path on a tiny config (runs anywhere)
    python scripts/bench_dpo.py --real 64       # real-length pairs from ../shared/data/llama3_m0, one epoch
    python scripts/bench_dpo.py --kernel 2048   # one forward+backward at T tokens: torch vs JAX dense vs JAX blocks

Real-length mode (`--real N`): the first N records of ../shared/data/llama3_m0/en_to_fr_translations.jsonl
whose French translation succeeded (non-empty and not the English text): prompt = the instruction, chosen =
the English answer, rejected = the French translation, tokenized once with the embedded SmolLM2's chat
template (lidr_jax.train.pairs.encode_pairs, answers capped at 1,024 tokens) and handed as the same token
ids to both sides. One epoch, 4 pairs per optimizer step on both sides in the same (seeded) order, reference
log-probs precomputed by lidr_jax (packed as training packs; not timed) and given to both.
lidr_jax chooses its packing and recomputation as its trainer does with `dpo.row_tokens: auto` and
`dpo.compute.remat: auto` (lidr_jax.train.autotune: rows, micro-batches per step and remat policy from the
compiled train step's memory_analysis() against MemAvailable less 4 GiB; `--row-tokens` / `--real-remat`
fix either), `pack_shapes: step` (each step's rows as long as its pairs, rounded up to 256: one
compilation per distinct shape, compiled before the epoch and reported apart, as is the time of the
choice), xla attention over the packed rows' block pairs only (lidr_jax.train.packing.block_attention).
`--profile N`: where the largest step of N real pairs spends its time, per XLA op (forward, backward,
recomputation; GEMMs by einsum, block attention's other ops), under jax.profiler. TRL runs its
DPOTrainer with max_length None (no truncation) and sdpa attention; `padding_free` is disabled in TRL
1.16 (it warns and pads), so its knob for this data is the batch size:
`trl:B` in `--order` is B pairs per micro-batch x 4/B gradient-accumulation steps (B=1 pads only each
pair's chosen against its rejected; B=4 pads 8 sequences to the longest). The runs alternate in the order
of `--order` (default jax,trl:1,trl:4,jax,trl:4,trl:1), each in its own process; the ratio is lidr_jax's
median pairs/s over the best TRL setting's median. A run may name its malloc: `jax@4k`, `trl:1@hp`; by
default lidr_jax runs with glibc asking for huge pages, as its commands do (lidr_jax.parallel.huge_pages),
and TRL without, as a plain `python` runs it.
`--real 64` is the issue's full mode (about an hour per run on a shared 2-core machine).

Bench-only dependency: TRL (`pip install trl`, tested with trl 1.16, transformers 5, torch 2.13 CPU).

Both sides train on the same batch: 4 pairs whose prompt and responses are fixed random token ids (128
prompt + 128 response tokens: every row exactly 256 tokens), reference log-probs precomputed (by lidr_jax,
not timed) and handed to both, sigmoid DPO with beta 0.1 and no NLL term (TRL's default objective), AdamW,
clipping at 1.0, one micro-batch per step. TRL runs its own DPOTrainer.training_step (its loss and its
forward over the concatenated [chosen; rejected] batch) plus clipping, optimizer and scheduler steps, which
is the body of the Trainer loop; building the batch with TRL's DataCollatorForPreference avoids TRL
re-tokenizing text (random ids do not round-trip through text). Each side runs in its own subprocess so
peak memory (ru_maxrss) is its own. Model FLOPs are 6 x params x tokens plus attention (12 L T D per token,
fwd + bwd), compared with the best jitted float32 matmul rate this machine reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT, RESPONSE, PAIRS = 128, 128, 4


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pairs(vocab: int, pairs: int = PAIRS, seed: int = 0):
    from lidr_jax.train.pairs import EncodedPairs

    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(10, vocab, n).astype(np.int32)

    return EncodedPairs(
        [ids(PROMPT) for _ in range(pairs)],
        [ids(RESPONSE) for _ in range(pairs)],
        [ids(RESPONSE) for _ in range(pairs)],
    )


def model_flops(config, tokens: int, seq: int, head_tokens: int | None = None) -> float:
    """Training FLOPs (6 per weight per token, plus attention over `seq`) of `tokens` tokens, with
    the vocabulary head at `head_tokens` of them (default: all). The input embedding lookup is not a
    matmul; a tied embedding counts once, as the head."""
    from lidr_jax.model.llama import abstract_params, count_params

    head = config.vocab_size * config.hidden_size
    body = count_params(abstract_params(config)) - (head if config.tie_word_embeddings else 2 * head)
    attn = 12 * config.num_hidden_layers * seq * config.num_attention_heads * config.head_dim
    return (6 * body + attn) * tokens + 6 * head * (tokens if head_tokens is None else head_tokens)


def packed_flops(config, pairs: int, prompt: int, response: int) -> float:
    """FLOPs lidr_jax executes for the same step: one packed row per pair (the prompt run once) and
    the vocabulary head only at the 2 x response scored positions (lidr_jax.train.pairs.pair_batch)."""
    row = prompt + 2 * response
    return model_flops(config, pairs * row, row, head_tokens=pairs * 2 * response)


def matmul_rate(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------- sides


def side_export(out: Path):
    from lidr_jax.formats.export import export_hf
    from lidr_jax.formats.load import load_pretrained

    export_hf(load_pretrained("smollm2-135m-instruct"), out / "hf", dtype="float32")


def jax_train_steps(config, params, enc, cfg, steps: int, warmup: int, ref=None):
    """(seconds per step list, ref) for `steps` timed train steps after `warmup` untimed ones."""
    from lidr_jax.train.trainer import (
        init_state,
        lr_schedule,
        make_optimizer,
        make_train_step,
        reference_logprobs,
        step_batch,
    )

    if ref is None:
        ref = reference_logprobs(params, config, enc, cfg, progress=False)
    opt = make_optimizer(cfg, steps + warmup)
    step = make_train_step(config, cfg, opt, lr_schedule(cfg, steps + warmup))
    state = init_state(params, opt)
    batch = step_batch(enc, ref, np.arange(len(enc)), cfg, pad_id=0)
    times = []
    for k in range(warmup + steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        float(m["loss"])  # wait for the step
        if k >= warmup:
            times.append(time.perf_counter() - t)
    return times, ref


def side_jax(out: Path, steps: int, warmup: int):
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.train.dpo import DPOConfig

    model = load_pretrained(out / "hf")
    enc = synthetic_pairs(model.config.vocab_size)
    cfg = DPOConfig(
        batch_size=PAIRS, nll_weight=0.0, learning_rate=1e-6, warmup=0, compute=ScoringConfig(batch_size=PAIRS)
    )
    times, ref = jax_train_steps(model.config, model.params, enc, cfg, steps, warmup)
    np.savez(out / "ref.npz", **ref)
    return {
        "step_s": float(np.median(times)),
        "times": times,
        "peak_mb": _peak_mb(),
        "flops": model_flops(model.config, 2 * PAIRS * (PROMPT + RESPONSE), PROMPT + RESPONSE),
        "executed_flops": packed_flops(model.config, PAIRS, PROMPT, RESPONSE),
    }


def side_trl(out: Path, steps: int, warmup: int):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "hf")
    enc = synthetic_pairs(model.config.vocab_size)
    ref = np.load(out / "ref.npz")
    args = trl.DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=PAIRS,
        learning_rate=1e-6,
        beta=0.1,
        precompute_ref_log_probs=True,
        max_length=None,
        report_to=[],
        use_cpu=True,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=10**6,
    )
    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * PAIRS)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + warmup)
    examples = [
        {
            "prompt_ids": enc.prompt_ids[i].tolist(),
            "chosen_ids": enc.chosen_ids[i].tolist(),
            "rejected_ids": enc.rejected_ids[i].tolist(),
            "ref_chosen_logps": float(ref["chosen"][i]),
            "ref_rejected_logps": float(ref["rejected"][i]),
        }
        for i in range(PAIRS)
    ]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape == (2 * PAIRS, PROMPT + RESPONSE), batch["input_ids"].shape
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we replace
    model.train()
    times = []
    for k in range(warmup + steps):
        t = time.perf_counter()
        trainer.training_step(model, batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        if k >= warmup:
            times.append(time.perf_counter() - t)
    return {
        "step_s": float(np.median(times)),
        "times": times,
        "peak_mb": _peak_mb(),
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# -------------------------------------------------------------------------------- real-length mode

REAL_DATA = REPO.parent / "shared" / "data" / "llama3_m0" / "en_to_fr_translations.jsonl"
REAL_BATCH = 4
REAL_BUCKET = 256  # lidr_jax: a step's row length is rounded up to a multiple of this (one compilation each)


def real_pairs(n: int):
    """The first n (instruction, English answer, French translation) pairs whose translation succeeded."""
    from lidr_jax.files import read_jsonl
    from lidr_jax.train.pairs import PreferencePair

    pairs = []
    for rec in read_jsonl(REAL_DATA):
        fr = rec.get("en2fr_reponse") or ""
        if fr.strip() and fr != rec["response"]:
            pairs.append(PreferencePair(rec["instruction"], rec["response"], fr, {"id": rec["id"]}))
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"only {len(pairs)} usable pairs in {REAL_DATA}")


def real_prepare(out: Path, n: int, row_tokens: int):
    """Tokenize the pairs, compute the reference log-probs (lidr_jax), write both and the step order."""
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.train.dpo import DPOConfig
    from lidr_jax.train.pairs import encode_pairs
    from lidr_jax.train.trainer import reference_logprobs, step_indices, steps_per_epoch

    model = load_pretrained(out / "hf")
    enc = encode_pairs(real_pairs(n), model.tokenizer, 1 << 20, 1024)
    lengths = enc.lengths()
    cfg = DPOConfig(batch_size=REAL_BATCH, compute=ScoringConfig(batch_size=REAL_BATCH))
    steps = [step_indices(k, n, cfg).tolist() for k in range(steps_per_epoch(n, cfg))]
    # default: rows that hold the largest step's pairs, so each step is one row as long as it needs
    row_tokens = row_tokens or int(-(-max(lengths[s].sum() for s in steps) // REAL_BUCKET) * REAL_BUCKET)
    cfg = cfg.replace(row_tokens=row_tokens, pack_shapes="step", bucket_multiple=REAL_BUCKET)  # packed, as training
    ref = reference_logprobs(model.params, model.config, enc, cfg, progress=False)
    data = {
        "prompt": [a.tolist() for a in enc.prompt_ids],
        "chosen": [a.tolist() for a in enc.chosen_ids],
        "rejected": [a.tolist() for a in enc.rejected_ids],
        "ref_chosen": ref["chosen"].tolist(),
        "ref_rejected": ref["rejected"].tolist(),
        "steps": steps,
        "row_tokens": row_tokens,
        "truncated_responses": enc.truncated_responses,
    }
    (out / "real.json").write_text(json.dumps(data))
    answers = np.array([len(c) for c in enc.chosen_ids]), np.array([len(r) for r in enc.rejected_ids])
    return {
        "pairs": n,
        "row_tokens": row_tokens,
        "answers_capped": enc.truncated_responses,
        "prompt_median": float(np.median([len(p) for p in enc.prompt_ids])),
        "chosen_median": float(np.median(answers[0])),
        "rejected_median": float(np.median(answers[1])),
        "pair_max": int(lengths.max()),
    }


def _real_data(out: Path):
    from lidr_jax.train.pairs import EncodedPairs

    d = json.loads((out / "real.json").read_text())
    enc = EncodedPairs(*([np.asarray(x, np.int32) for x in d[k]] for k in ("prompt", "chosen", "rejected")))
    ref = {"chosen": np.asarray(d["ref_chosen"], np.float32), "rejected": np.asarray(d["ref_rejected"], np.float32)}
    return d, enc, ref


def real_dpo_config(row_tokens: int, remat: str, **extra):
    """The real-length comparison's DPO settings on lidr_jax's side: plain DPO (no NLL), constant learning
    rate, rows of each step's own length (`pack_shapes: step`, bucketed), `row_tokens` 0 = auto."""
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.train.dpo import DPOConfig

    return DPOConfig(
        batch_size=REAL_BATCH,
        nll_weight=0.0,
        learning_rate=1e-6,
        warmup=0,
        schedule="constant",
        row_tokens=row_tokens or "auto",
        pack_shapes="step",
        bucket_multiple=REAL_BUCKET,
        compute=ScoringConfig(remat=remat),
        **extra,
    )


def real_side_jax(out: Path, row_tokens: int, remat: str = "auto"):
    import jax

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.train import autotune
    from lidr_jax.train.trainer import init_state, lr_schedule, make_optimizer, make_train_step, step_batch

    d, enc, ref = _real_data(out)
    model = load_pretrained(out / "hf")
    # this machine is shared: others' processes may grow while the epoch runs
    cfg = real_dpo_config(row_tokens, remat, memory_margin_gib=4.0)
    steps = [np.asarray(s) for s in d["steps"]]
    choice, choose_s = None, 0.0
    if autotune.is_auto(cfg):  # as the trainer does: packing and remat from the compiled step's memory
        t = time.perf_counter()
        cfg, kept, _, choice = autotune.choose(model.config, model.params, enc, cfg, ref=ref)
        choose_s = time.perf_counter() - t
        print(choice.describe(), file=sys.stderr, flush=True)
        if choice.dropped:
            raise SystemExit(f"{choice.dropped} pairs do not fit this machine's memory: the sides would differ")
    opt = make_optimizer(cfg, len(steps))
    step_fn = make_train_step(model.config, cfg, opt, lr_schedule(cfg, len(steps)))
    state = init_state(model.params, opt)
    # Every step's batch first, and one compilation per distinct shape (timed apart, like TRL's model load).
    batches = [step_batch(enc, ref, idx, cfg, 0) for idx in steps]
    compiled, compile_s = {}, 0.0
    for batch in batches:
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in compiled:
            t = time.perf_counter()
            compiled[key] = step_fn.lower(state, batch).compile()
            compile_s += time.perf_counter() - t
    real = slots = 0
    times = []
    t = time.perf_counter()
    for batch in batches:
        real, slots = real + int(batch["attention_mask"].sum()), slots + batch["attention_mask"].size
        t0 = time.perf_counter()
        state, m = compiled[tuple((k, v.shape) for k, v in sorted(batch.items()))](state, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    epoch_s = time.perf_counter() - t
    return {
        "epoch_s": epoch_s,
        "compile_s": compile_s,
        "compilations": len(compiled),
        "pairs_per_s": len(enc) / epoch_s,
        "padding_share": 1 - real / slots,
        "tokens_per_s": real / epoch_s,
        "step_shapes": sorted({tuple(b["tokens"].shape) for b in batches}),  # (micro-batches, rows, tokens)
        "step_s": times,
        "row_tokens": cfg.row_tokens,
        "remat": cfg.compute.remat,
        "grad_accum": cfg.grad_accum,
        "choose_s": choose_s,
        "choice_peak_mb": choice.chosen.peak / 2**20 if choice else None,
        "choice_budget_mb": choice.budget / 2**20 if choice else None,
        "peak_mb": _peak_mb(),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform}",
    }


def real_side_trl(out: Path, batch_size: int):
    """TRL's DPOTrainer on the same steps: `batch_size` pairs per micro-batch, REAL_BATCH // batch_size
    micro-batches of gradient accumulation per optimizer step (the same effective batch)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, enc, ref = _real_data(out)
    accum = REAL_BATCH // batch_size
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "hf")
    args = trl.DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=1e-6,
        beta=0.1,
        precompute_ref_log_probs=True,
        max_length=None,
        padding_free=False,  # disabled in TRL 1.16 (it warns and falls back to padding)
        report_to=[],
        use_cpu=True,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=10**6,
    )
    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * REAL_BATCH)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=len(d["steps"]))
    trainer.current_gradient_accumulation_steps = accum  # set by Trainer's own loop, which we replace
    model.train()
    real = slots = 0
    times = []
    t = time.perf_counter()
    for idx in d["steps"]:
        t0 = time.perf_counter()
        for a in range(0, len(idx), batch_size):
            batch = trainer.data_collator(
                [
                    {
                        "prompt_ids": d["prompt"][i],
                        "chosen_ids": d["chosen"][i],
                        "rejected_ids": d["rejected"][i],
                        "ref_chosen_logps": float(ref["chosen"][i]),
                        "ref_rejected_logps": float(ref["rejected"][i]),
                    }
                    for i in idx[a : a + batch_size]
                ]
            )
            real, slots = real + int(batch["attention_mask"].sum()), slots + batch["attention_mask"].numel()
            trainer.training_step(model, batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        times.append(time.perf_counter() - t0)
    epoch_s = time.perf_counter() - t
    return {
        "epoch_s": epoch_s,
        "pairs_per_s": len(enc) / epoch_s,
        "padding_share": 1 - real / slots,
        "tokens_per_s": real / epoch_s,
        "step_s": times,
        "batch": f"{batch_size} x {accum}",
        "peak_mb": _peak_mb(),
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "attn": model.config._attn_implementation,
    }


def real_main(args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _subprocess("export", out, args)
        prep = _subprocess("real-prepare", out, args)
        runs = []
        for run in args.order.split(","):  # side[@hp|@4k]: lidr_jax defaults to hp (as its commands), TRL to 4k
            side, _, pages = run.partition("@")
            pages = pages or ("hp" if side == "jax" else "4k")
            result = _subprocess("real-" + side, out, args, keep_going=True, env=_malloc_environment(pages))
            if result is not None:
                result["pages"] = pages
                runs.append((f"{side}@{pages}", result))
                print(f"{side}@{pages}: {json.dumps(result)}", flush=True)  # each run as it ends
    print(
        f"DPO, one epoch of {prep['pairs']} real-length pairs (llama3_m0: instruction / English answer / French "
        f"translation), SmolLM2-135M-Instruct float32, {REAL_BATCH} pairs per optimizer step on both sides, "
        f"{os.cpu_count()} cores (shared)"
    )
    print(
        f"tokens: prompt median {prep['prompt_median']:.0f}, chosen median {prep['chosen_median']:.0f}, rejected "
        f"median {prep['rejected_median']:.0f}, longest pair {prep['pair_max']}; {prep['answers_capped']} answers "
        f"capped at 1024; lidr_jax packs each step into rows of up to {prep['row_tokens']} tokens"
    )
    print(
        "TRL settings: DPOTrainer, precompute_ref_log_probs (given lidr_jax's), max_length None (no truncation), "
        "sdpa attention; padding_free is disabled in TRL 1.16 (it warns and pads), so the batch size is the knob: "
        "trl:B = B pairs per micro-batch x 4/B accumulation steps (B=1 pads only a pair's chosen against its rejected)"
    )
    print(f"{'run':12s}{'epoch s':>10s}{'pairs/s':>10s}{'padding':>10s}{'tokens/s':>10s}{'peak MB':>10s}  notes")
    for side, r in runs:
        if side.startswith("jax"):
            shapes = ", ".join("x".join(map(str, shape)) for shape in r["step_shapes"])
            note = f"compile {r['compile_s']:.1f} s ({r['compilations']} shapes: {shapes}; not in epoch)"
            note += f", remat {r['remat']}, {r['grad_accum']} micro-batch(es) per step"
            if r["choice_peak_mb"] is not None:
                note += (
                    f" (auto: compiled peak {r['choice_peak_mb']:.0f} MB of a {r['choice_budget_mb']:.0f} MB budget, "
                    f"chosen in {r['choose_s']:.1f} s)"
                )
        else:
            note = f"trl {r['trl']}, batch {r['batch']}, torch threads {r['torch_threads']}, attention {r['attn']}"
        kind, _, pages = side.partition("@")
        name = "lidr_jax" if kind == "jax" else f"TRL {kind[4:]}x{REAL_BATCH // int(kind[4:])}"
        name += f" {pages}"
        note += ", malloc: " + ("huge pages (glibc.malloc.hugetlb=1)" if pages == "hp" else "4 KiB pages")
        print(
            f"{name:12s}{r['epoch_s']:10.1f}{r['pairs_per_s']:10.4f}{r['padding_share']:10.1%}"
            f"{r['tokens_per_s']:10.1f}{r['peak_mb']:10.0f}  {note}"
        )
    med = {side: float(np.median([r["pairs_per_s"] for s, r in runs if s == side])) for side, _ in runs}
    trl_sides = [side for side in med if not side.startswith("jax")]
    for jax_side in [side for side in med if side.startswith("jax")]:
        if not trl_sides:
            break
        best = max(trl_sides, key=med.get)
        batch = best[4:].partition("@")[0]
        print(
            f"TRL's best setting on this data: {best} (per_device_train_batch_size {batch}, "
            f"gradient_accumulation_steps {REAL_BATCH // int(batch)}; {med[best]:.4f} pairs/s, median of its runs)"
        )
        print(f"ratio {jax_side} / TRL's best pairs/s (medians): {med[jax_side] / med[best]:.2f}x")
        with_compile = float(
            np.median(
                [prep["pairs"] / (r["epoch_s"] + r["compile_s"] + r["choose_s"]) for s, r in runs if s == jax_side]
            )
        )
        print(f"{jax_side} with its compilations and auto choice counted in its epoch: {with_compile / med[best]:.2f}x")


def op_labels(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Each instruction of a compiled HLO text -> (phase, what): phase `recompute` (remat's recomputed
    forward, under `rematted_computation`), `backward` (under `transpose(`) or `forward`; what: a dot's
    einsum (inside a fusion: the fused computation's dot), `attention <op>` for block attention's other
    ops, else the op's name (`copy` / `transpose` with no source op: a layout change XLA inserted)."""
    import re

    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)}

    def table(title):  # the module's stack-frame tables: id -> its line's text
        m = re.search(rf"^{title}\n(.*?)\n\n", hlo_text, re.S | re.M)
        return dict(line.split(" ", 1) for line in m.group(1).splitlines()) if m else {}

    files, functions, locations, frames = (
        table(t) for t in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
    )

    def source(frame: str) -> str:  # an op XLA made without an op name: the Python line it came from
        loc = re.search(r"file_location_id=(\d+)", frames.get(frame, ""))
        loc = locations.get(loc.group(1), "") if loc else ""
        ids = dict(re.findall(r"(\w+)=(\d+)", loc))
        if not ids:
            return "?"
        file = files.get(ids.get("file_name_id"), "?").strip('"').rpartition("/")[2]
        return f"{functions.get(ids.get('function_name_id'), '?').strip(chr(34))} {file}:{ids.get('line')}"

    labels = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        text = bodies.get(called.group(1), line) if called else line
        names = re.findall(r'op_name="([^"]+)"', text)
        dots = [n for n in names if n.endswith("dot_general")]
        if not names:
            frame = re.findall(r"stack_frame_id=(\d+)", text)
            kind = "dot " if re.search(r"\bdot\(", text) else ""
            labels[m.group(1)] = ("unnamed", f"{m.group(2)} {kind}at {source(frame[-1]) if frame else '?'}")
            continue
        name = (dots or names)[0]
        phase = "recompute" if "rematted_computation" in name else "backward" if "transpose(" in name else "forward"
        parts = name.split("/")
        what = parts[-2] if dots else parts[-1]
        if not dots and "block_attention" in name:
            what = "attention " + what
        labels[m.group(1)] = (phase, what)
    return labels


def profile_main(args):
    """`--profile N`: the largest step of N real pairs, once compiled, `--profile-runs` - 1 times warm, once
    under jax.profiler; its op times summed by (phase, what) (`op_labels`). Each run's wall, user and kernel
    (sys) seconds and minor page faults are printed: first-touched host memory shows there."""
    import glob
    import gzip
    import resource
    from collections import Counter

    import jax

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.train import autotune
    from lidr_jax.train.pairs import encode_pairs
    from lidr_jax.train.trainer import (
        init_state,
        lr_schedule,
        make_optimizer,
        make_train_step,
        step_batch,
        step_indices,
        steps_per_epoch,
    )

    model = load_pretrained("smollm2-135m-instruct")
    n = args.profile
    enc = encode_pairs(real_pairs(n), model.tokenizer, 1 << 20, 1024)
    cfg = real_dpo_config(args.row_tokens, args.real_remat)
    if autotune.is_auto(cfg):
        cfg, _, _, choice = autotune.choose(model.config, model.params, enc, cfg)
        print(choice.describe(), flush=True)
    steps = [step_indices(k, n, cfg) for k in range(steps_per_epoch(n, cfg))]
    largest = max(range(len(steps)), key=lambda k: int(enc.lengths()[steps[k]].sum()))
    idx = steps[largest if args.profile_step < 0 else args.profile_step]
    zeros = np.zeros(n, np.float32)
    batch = step_batch(enc, {"chosen": zeros, "rejected": zeros}, idx, cfg, 0)
    opt = make_optimizer(cfg, 10)
    state = init_state(model.params, opt)
    t = time.perf_counter()
    compiled = make_train_step(model.config, cfg, opt, lr_schedule(cfg, 10)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    times = []
    runs = max(2, args.profile_runs)
    for k in range(runs):
        traced = k == runs - 1
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        if traced:
            folder = tempfile.mkdtemp()
            jax.profiler.start_trace(folder, create_perfetto_trace=True)
        state, m = compiled(state, batch)
        float(m["loss"])
        if traced:
            jax.profiler.stop_trace()
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"run {k + 1}{' (traced)' if traced else ''}: {times[-1]:.1f} s, "
            f"user {after.ru_utime - before.ru_utime:.1f} s, "
            f"sys {after.ru_stime - before.ru_stime:.1f} s, minor page faults "
            f"{(after.ru_minflt - before.ru_minflt) / 1e6:.2f} M",
            flush=True,
        )
    (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    labels = op_labels(compiled.as_text())
    spent, phases = Counter(), Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in labels:
            phase, what = labels[e["name"]]
            spent[(phase, what)] += e["dur"] / 1e6
            phases[phase] += e["dur"] / 1e6
    total = sum(spent.values())
    tokens = int(batch["attention_mask"].sum())
    print(
        f"step {list(map(int, idx))} of {n} pairs: micro-batches x rows x tokens {batch['tokens'].shape}, "
        f"{tokens} real tokens, "
        f"remat {cfg.compute.remat}; compile {compile_s:.1f} s; step {times[-2]:.1f} s warm, {times[-1]:.1f} s traced; "
        f"{total:.1f} s in XLA ops"
    )
    print("by phase: " + ", ".join(f"{ph} {sec:.1f} s ({sec / total:.0%})" for ph, sec in phases.most_common()))

    def kind(what: str) -> str:
        if "," in what and "->" in what:
            return "head GEMM" if "DV" in what else "attention GEMM" if what.startswith("BM") else "projection GEMM"
        if what.startswith("attention "):
            return "attention, other"
        if what in ("copy", "transpose"):
            return "layout copy/transpose"
        return "other"

    kinds = Counter()
    for (_, what), sec in spent.items():
        kinds[kind(what)] += sec
    print("by kind: " + ", ".join(f"{k} {sec:.1f} s ({sec / total:.0%})" for k, sec in kinds.most_common()))
    print("| phase | op | s | share |")
    print("|---|---|---|---|")
    for (phase, what), sec in spent.most_common(args.profile_top):
        print(f"| {phase} | {what} | {sec:.2f} | {sec / total:.1%} |")


def kernel_side(side: str, T: int, reps: int = 2) -> dict:
    """One forward + backward of the SmolLM2-135M decoder body (random weights, float32, one row of T tokens,
    loss = sum(hidden * fixed noise)) in torch (transformers, sdpa) or JAX: `jax-dense` (xla attention over
    every [T, T] score, remat dots as the old real-length mode ran), `jax-block` (block_attention, no remat).
    Seconds per call after one untimed call (JAX's includes compilation)."""
    shape = dict(SMOLLM2_135M)
    rng = np.random.default_rng(0)
    tokens, noise = rng.integers(0, shape["vocab_size"], (1, T)), rng.standard_normal((1, T, shape["hidden_size"]))
    if side == "torch":
        import torch
        from transformers import LlamaConfig, LlamaModel

        model = LlamaModel(LlamaConfig(**shape, attn_implementation="sdpa")).float().train()
        ids, c = torch.tensor(tokens), torch.tensor(noise, dtype=torch.float32)

        def call():
            (model(ids).last_hidden_state * c).sum().backward()
            model.zero_grad()
    else:
        import jax
        import jax.numpy as jnp

        from lidr_jax.model.config import ModelConfig
        from lidr_jax.model.llama import hidden_states, init_params
        from lidr_jax.train.packing import attention_block, block_attention, block_pairs

        config = ModelConfig(**shape)
        params = init_params(config, jax.random.key(0))
        ids, c = jnp.asarray(tokens, jnp.int32), jnp.asarray(noise, jnp.float32)
        kw = {"remat": "dots"}
        if side == "jax-block":
            seg, mask = np.zeros((1, T), np.int32), np.ones((1, T), bool)
            block = attention_block(T)
            qk = block_pairs(seg[0], mask[0], block)
            tables = {"block_q": qk[None, :, 0], "block_k": qk[None, :, 1], "block_valid": np.ones((1, len(qk)), bool)}
            tables = {k: jnp.asarray(v) for k, v in {**tables, "segments": seg, "attention_mask": mask}.items()}

            def attention(q, k, v):
                return block_attention(q, k, v, tables, block)

            positions = jnp.arange(T)[None]
            kw = {"attention": attention, "segments_BT": tables["segments"], "positions_BT": positions}
        grad = jax.jit(jax.grad(lambda p: jnp.sum(hidden_states(p, ids, config, **kw)[0] * c)))

        def call():
            jax.block_until_ready(grad(params))

    call()
    times = [_timed(call) for _ in range(reps)]
    return {"side": side, "T": T, "times": times, "tokens_per_s": T / float(np.median(times))}


def kernel_main(args):
    for side in ("torch", "jax-dense", "jax-block"):
        r = _subprocess("kernel-" + side, Path(tempfile.gettempdir()), args)
        print(
            f"{side:10s} T={r['T']}: {', '.join(f'{t:.1f}' for t in r['times'])} s per forward+backward, "
            f"{r['tokens_per_s']:.1f} tokens/s",
            flush=True,
        )


def _malloc_environment(pages: str) -> dict[str, str]:
    """The side's environment: `hp` glibc asked for huge pages as lidr_jax's commands do
    (lidr_jax.parallel.huge_pages, where it applies), `4k` without, as a plain `python` runs."""
    from lidr_jax.parallel.huge_pages import TUNABLE, glibc_version, huge_pages_environment, thp_mode

    base = {k: v for k, v in os.environ.items() if not (k == "GLIBC_TUNABLES" and TUNABLE in v)}
    if pages == "4k":
        return base
    return huge_pages_environment(base, thp_mode(), glibc_version()) or base


def _subprocess(side: str, out: Path, args, keep_going: bool = False, env=None) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--work",
        str(out),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--real",
        str(args.real),
        "--row-tokens",
        str(args.row_tokens),
        "--real-remat",
        args.real_remat,
        "--kernel",
        str(args.kernel),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        message = f"{side} side failed (exit code {proc.returncode}; -9: killed, e.g. out of memory)"
        if keep_going:  # a run of the --real alternation: said, and the others go on
            print(message, flush=True)
            return None
        sys.exit(f"{message}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def cpu_main(args):
    import jax

    rate = matmul_rate()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _subprocess("export", out, args)
        j = _subprocess("jax", out, args)
        t = _subprocess("trl", out, args)
    pairs_j, pairs_t = PAIRS / j["step_s"], PAIRS / t["step_s"]
    print(
        f"DPO train step, SmolLM2-135M-Instruct float32, {PAIRS} pairs x {PROMPT + RESPONSE} tokens "
        f"({2 * PAIRS} rows), {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores"
    )
    print(
        f"matmul rate (jitted {2048}^3 float32): {rate / 1e9:.1f} GFLOP/s; model FLOPs/step {j['flops'] / 1e12:.2f} T"
    )
    print(f"{'':10s}{'step s':>10s}{'pairs/s':>10s}{'peak MB':>10s}{'GFLOP/s':>10s}{'of matmul':>10s}")
    for name, r, p in (("lidr_jax", j, pairs_j), (f"TRL {t['trl']}", t, pairs_t)):
        fl = j["flops"] / r["step_s"]
        print(f"{name:10s}{r['step_s']:10.3f}{p:10.2f}{r['peak_mb']:10.0f}{fl / 1e9:10.1f}{fl / rate:10.1%}")
    print(f"speed-up (pairs/s lidr_jax / TRL): {pairs_j / pairs_t:.2f}x; step times jax {j['times']} trl {t['times']}")
    ex = j["executed_flops"]
    print(
        f"model FLOPs count the work of two rows per pair (what TRL runs); lidr_jax packs each pair into one "
        f"row and executes {ex / 1e12:.2f} T ({ex / j['flops']:.0%}): {ex / j['step_s'] / 1e9:.1f} GFLOP/s executed, "
        f"{ex / j['step_s'] / rate:.1%} of the matmul rate"
    )


from model_shapes import LLAMA_3_2_1B, LLAMA_3_8B, SMOLLM2_135M, TINY  # noqa: E402  (scripts/, beside this file)

GPU_CONFIGS = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3-8b": LLAMA_3_8B, "tiny": TINY}  # random weights


def gpu_main(args):
    """MFU of the train step (bf16 compute, float32 master weights and Adam) on random weights."""
    import jax

    from lidr_jax.model.config import ModelConfig
    from lidr_jax.model.llama import init_params
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.train.dpo import DPOConfig

    names = ["tiny"] if args.dry_run else args.models.split(",")
    seq = 64 if args.dry_run else args.seq
    global PROMPT, RESPONSE
    PROMPT = RESPONSE = seq // 2
    for name in names:
        config = ModelConfig(**GPU_CONFIGS[name])
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        enc = synthetic_pairs(config.vocab_size, pairs=args.batch)
        cfg = DPOConfig(
            batch_size=args.batch,
            compute=ScoringConfig(compute_dtype="bfloat16", remat=args.remat, logprob_chunk=512, batch_size=args.batch),
            warmup=0,
        )
        ref = {"chosen": np.full(args.batch, -300.0, np.float32), "rejected": np.full(args.batch, -300.0, np.float32)}
        times, _ = jax_train_steps(
            config, params, enc, cfg, 1 if args.dry_run else args.steps, 1 if args.dry_run else args.warmup, ref=ref
        )
        step = float(np.median(times))
        flops = model_flops(config, 2 * args.batch * seq, seq)
        print(
            f"{name}: {args.batch} pairs x {seq} tokens, remat={args.remat}: {step:.3f} s/step, "
            f"{args.batch / step:.1f} pairs/s, {flops / step / 1e12:.1f} TFLOP/s, "
            f"MFU {flops / step / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops} TFLOP/s "
            f"({jax.devices()[0].device_kind})"
        )
        del params


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--gpu", action="store_true", help="GPU MFU mode (random Llama-3.2-1B and Llama-3-8B configs)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu: a tiny config, one step, any device")
    p.add_argument("--models", default="llama-3.2-1b,llama-3-8b")
    p.add_argument("--batch", type=int, default=8, help="--gpu: pairs per step")
    p.add_argument("--seq", type=int, default=1024, help="--gpu: tokens per row")
    p.add_argument("--remat", default="dots", help="--gpu: remat policy")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="--gpu: dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--real", type=int, default=0, help="real-length mode: N pairs from ../shared/data/llama3_m0")
    p.add_argument("--row-tokens", type=int, default=0, help="--real: lidr_jax row length (0: auto, from memory)")
    p.add_argument(
        "--order",
        default="jax,trl:1,trl:4,jax,trl:4,trl:1",
        help="--real: the runs in order; trl:B = TRL with B pairs per micro-batch x 4/B accumulation steps",
    )
    p.add_argument(
        "--real-remat",
        default="auto",
        help="--real: lidr_jax's remat (auto: chosen from memory, lidr_jax.train.autotune)",
    )
    p.add_argument("--kernel", type=int, default=0, help="T: one forward+backward of the decoder, torch vs JAX")
    p.add_argument("--profile", type=int, default=0, help="N: per-op profile of the largest step of N real pairs")
    p.add_argument("--profile-top", type=int, default=25, help="--profile: rows of the per-op table")
    p.add_argument("--profile-step", type=int, default=-1, help="--profile: this step instead of the largest")
    p.add_argument("--profile-runs", type=int, default=2, help="--profile: runs of the step (the last traced)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        out = Path(args.work)
        result = {
            "export": lambda: side_export(out),
            "jax": lambda: side_jax(out, args.steps, args.warmup),
            "trl": lambda: side_trl(out, args.steps, args.warmup),
            "real-prepare": lambda: real_prepare(out, args.real, args.row_tokens),
            "real-jax": lambda: real_side_jax(out, args.row_tokens, args.real_remat),
        }.get(args.side)
        if args.side.startswith("kernel-"):
            result = lambda: kernel_side(args.side[7:], args.kernel)  # noqa: E731
        elif result is None:
            result = lambda: real_side_trl(out, int(args.side.rpartition(":")[2]))  # noqa: E731
        result = result()
        print("RESULT " + json.dumps(result or {}))
    elif args.profile:
        profile_main(args)
    elif args.kernel:
        kernel_main(args)
    elif args.gpu:
        gpu_main(args)
    elif args.real:
        real_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
