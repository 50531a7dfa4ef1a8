"""The scoring room (lidr_jax.model.scoring): rows of one answer score it as rows of a pair score their
first answer; the DPO compute settings' old keys are refused with their new names."""

import numpy as np
import pytest
from dpo_helpers import PAIRS, tiny_model

from lidr_jax.model.scoring import AnswerRows, ScoringConfig, answer_batch, score_answers
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.settings import SettingsError
from lidr_jax.train.pairs import PreferencePair, encode_pairs


def test_one_answer_rows_score_as_the_first_answer_of_a_pair():
    config, params, tok = tiny_model()
    enc = encode_pairs([PreferencePair(*p) for p in PAIRS[:5]], tok, max_prompt_len=64, max_response_len=64)
    pairs = AnswerRows(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids)
    singles = AnswerRows(enc.prompt_ids, enc.rejected_ids)
    cfg = ScoringConfig(batch_size=2, logprob_chunk=8)
    chosen, rejected = score_answers(params, config, pairs, cfg)
    alone, nothing = score_answers(params, config, singles, cfg)
    np.testing.assert_allclose(alone, rejected, rtol=0, atol=1e-5 * np.abs(rejected).max())
    assert nothing.tolist() == [0.0] * 5 and (chosen < 0).all() and (alone < 0).all()
    # the layout: prompt | answer, each answer token predicted by the position before it
    b = answer_batch(singles, [1], pad_id=0, batch_size=2)
    P, A = len(enc.prompt_ids[1]), len(enc.rejected_ids[1])
    assert b["segments"][0, : P + A].tolist() == [0] * P + [1] * A and not b["attention_mask"][0, P + A :].any()
    assert b["logit_index"][0, :A].tolist() == list(range(P - 1, P + A - 1))
    assert b["chosen_mask"][0].sum() == A and not b["rejected_mask"].any()


@pytest.mark.parametrize(
    "old, new",
    [
        ("attention", "compute.attention"),
        ("remat", "compute.remat"),
        ("compute_dtype", "compute.compute_dtype"),
        ("logprob_chunk", "compute.logprob_chunk"),
        ("reference_batch_size", "compute.batch_size"),
    ],
)
def test_moved_dpo_compute_keys_are_refused_with_their_new_name(old, new):
    with pytest.raises(SettingsError, match=rf"^'dpo\.{old}' is now 'dpo\.{new}'$"):
        load_run_config(overrides=[f"dpo.{old}=1"])
