"""Rows and recomputation chosen from the compiled train step's memory (lidr_jax.train.autotune), on the
tiny model: the choice is deterministic and follows the budget, a budget too small refuses before
training with the numbers, a pair longer than any row that fits is dropped and counted, and gradients do
not depend on the choice (nor on the `names` remat policy against `none`), within 1e-5."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.train import autotune
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.memory import DoesNotFitError, size
from lidr_jax.train.pairs import EncodedPairs
from lidr_jax.train.trainer import accumulated_grads, step_batch, train
from tests.dpo_helpers import numpy_init, tiny_config

LENGTHS = [(5, 7, 3), (9, 2, 11), (3, 4, 4), (12, 6, 8), (4, 10, 1), (7, 3, 5), (2, 8, 6), (6, 5, 9)]
AUTO = DPOConfig(
    batch_size=2,
    row_tokens="auto",
    pack_shapes="step",
    bucket_multiple=16,
    compute=ScoringConfig(remat="auto", attention="xla", logprob_chunk=0),
)
FULL1 = AUTO.replace(batch_size=1, compute=AUTO.compute.replace(remat="full"))  # one candidate packing
SHORT = autotune.concrete(FULL1, 128, 1, "full")


def _pairs(lengths=LENGTHS, seed=0) -> EncodedPairs:
    rng = np.random.default_rng(seed)
    draw = [[rng.integers(4, 128, n).astype(np.int32) for n in sizes] for sizes in lengths]
    return EncodedPairs(*(list(x) for x in zip(*draw, strict=True)))


def _ref(n, seed=3):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(-40, 5, n).astype(np.float32) for k in ("chosen", "rejected")}


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    params = jax.tree.map(lambda a: a * 3.0 if a.ndim > 1 else a, numpy_init(config, seed=1))
    return config, params


def test_choice_is_deterministic_and_follows_the_budget(model):
    config, params = model
    enc = _pairs()
    roomy = autotune.choose(config, params, enc, AUTO, budget=(2**40, "test"))[3]
    first = roomy.tried[0]
    assert roomy.chosen == first and first.peak is not None  # room for the cheapest: compiled once, taken
    assert [c.cost for c in roomy.tried] == sorted(c.cost for c in roomy.tried)
    assert {(c.row_tokens, c.grad_accum) for c in roomy.tried} == {(128, 1), (128, 2)}  # longest pair 26
    assert {c.remat for c in roomy.tried} == set(autotune.POLICIES)
    tight = (first.peak - 1, "test")  # the cheapest no longer fits
    cfg, kept, _, choice = autotune.choose(config, params, enc, AUTO, budget=tight)
    again = autotune.choose(config, params, enc, AUTO, budget=tight)[3]
    assert choice == again and kept is enc and choice.dropped == 0
    compiled = [c for c in choice.tried if c.peak is not None]
    assert compiled[-1] == choice.chosen and choice.chosen != first
    assert choice.chosen.peak <= tight[0] < min(c.peak for c in compiled[:-1])
    assert (cfg.row_tokens, cfg.grad_accum, cfg.batch_size * cfg.grad_accum, cfg.compute.remat) == (
        choice.chosen.row_tokens,
        choice.chosen.grad_accum,
        2,
        choice.chosen.remat,
    )
    assert "auto packing and remat: rows of 128 tokens" in choice.describe()


def test_too_small_a_budget_refuses_before_training(model, monkeypatch, tmp_path):
    config, params = model
    enc = _pairs(LENGTHS[:3])
    with pytest.raises(DoesNotFitError) as e:  # below the train state itself: refused from shapes alone
        autotune.choose(config, params, enc, AUTO, budget=(1000, "a test budget"))
    floor = autotune.state_bytes(params, AUTO)
    assert str(e.value) == (
        f"DPO training does not fit: the weights and AdamW state alone take {size(floor)}, more than the budget "
        "0.00 MiB (a test budget); free memory, lower dpo.memory_margin_gib or use a smaller model"
    )
    budget = (floor + 1, "a test budget")  # above the state, below any compiled step
    with pytest.raises(DoesNotFitError) as e:
        autotune.choose(config, params, enc, FULL1, budget=budget)
    peak = autotune._Program(config, params, SHORT, autotune._largest_batch(enc, SHORT, 0)[0]).peak()
    assert peak > floor + 1
    assert str(e.value).startswith(
        f"DPO training does not fit: the least memory of 1 packings and remat policies compiled is {size(peak)} "
        "(rows of 128 tokens (1 x 32 per micro-batch at the largest step), 1 micro-batch(es) per step, remat full"
    )
    assert f"more than the budget {size(floor + 1)} (a test budget)" in str(e.value)
    monkeypatch.setattr(autotune, "memory_budget", lambda cfg: budget)
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(DoesNotFitError, match="least memory of 1 packings"):  # before training starts
        autotune.choose_if_auto(config, params, enc, FULL1, ref=_ref(len(enc)))
    with pytest.raises(ValueError, match=r"auto are chosen before training: lidr_jax.train.autotune.choose_if_auto"):
        train(params, config, enc, _ref(len(enc)), FULL1, metrics_path=path, progress=False)
    assert not path.exists()  # no step ran


def test_no_memory_figure_asks_for_explicit_values(monkeypatch):
    monkeypatch.setattr(autotune, "device_memory", lambda device: None)
    monkeypatch.setattr(autotune, "mem_available", lambda: None)
    with pytest.raises(ValueError) as e:
        autotune.memory_budget(AUTO)
    assert str(e.value) == (
        "dpo.row_tokens / dpo.compute.remat auto choose from the device's memory, but this device reports none "
        "and no RAM figure was found: set dpo.row_tokens (e.g. 4096) and dpo.compute.remat explicitly"
    )
    monkeypatch.setattr(autotune, "mem_available", lambda: 5 * 2**30)
    assert autotune.memory_budget(AUTO.replace(memory_margin_gib=1.5)) == (
        int(3.5 * 2**30),
        "RAM available now 5.00 GiB less a 1.50 GiB margin",
    )


def test_a_pair_longer_than_any_row_that_fits_is_dropped_and_counted(model, capsys, tmp_path, monkeypatch):
    config, params = model
    enc = _pairs(LENGTHS[:3] + [(100, 90, 80)])  # 270 tokens: rows of 384; the others fit rows of 128
    small = _pairs(LENGTHS[:3])
    budget = (autotune._Program(config, params, SHORT, autotune._largest_batch(small, SHORT, 0)[0]).peak(), "test")
    new, kept, ref, choice = autotune.choose(config, params, enc, FULL1, ref=_ref(4), budget=budget)
    assert choice.dropped == 1 and len(kept) == 3 and kept.lengths().max() < 128
    np.testing.assert_array_equal(ref["chosen"], _ref(4)["chosen"][:3])
    assert (new.row_tokens, new.grad_accum, new.compute.remat) == (128, 1, "full")
    assert [(c.row_tokens, c.peak > budget[0]) for c in choice.tried[:2]] == [(384, True), (256, False)]
    # as the trainer's callers do: the same drop, said once; the run's metrics hold the choice on the first step
    monkeypatch.setattr(autotune, "memory_budget", lambda c: budget)
    path = tmp_path / "metrics.jsonl"
    cfg, kept, ref, choice = autotune.choose_if_auto(config, params, enc, FULL1.replace(warmup=0), ref=_ref(4))
    train(params, config, kept, ref, cfg, metrics_path=path, progress=False, choice=choice)
    assert capsys.readouterr().out.count("auto packing and remat:") == 1
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["autotune/dropped_pairs"] == 1 and lines[0]["autotune/row_tokens"] == 128
    assert lines[0]["autotune/remat"] == "full" and "autotune/remat" not in lines[1]


def test_gradients_do_not_depend_on_the_choice(model):
    """One step's gradients and metrics under three choices (one row and remat none; two micro-batches
    and the `names` policy; rows of 32 in two micro-batches and dots) are equal within 1e-5."""
    config, params = model
    enc = _pairs()
    ref = _ref(len(enc))
    base = AUTO.replace(batch_size=8)
    idx = np.arange(len(enc))
    results = []
    for row, accum, remat in ((256, 1, "none"), (128, 2, "names"), (32, 2, "dots")):
        cfg = autotune.concrete(base, row, accum, remat)
        batch = step_batch(enc, ref, idx, cfg, 0)
        results.append((batch["tokens"].shape, accumulated_grads(params, batch, config, cfg)))
    assert len({shape for shape, _ in results}) == 3  # three different packings
    (_, (grads, metrics)), others = results[0], results[1:]
    for _, (g, m) in others:
        for name in metrics:
            np.testing.assert_allclose(m[name], metrics[name], atol=1e-5, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3
