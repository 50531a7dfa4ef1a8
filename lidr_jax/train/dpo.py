"""DPO: settings, the preference losses and their metrics (answer log-probs: lidr_jax.model.scoring).

Everything here is a pure function over arrays; lidr_jax.train.trainer wires it into the optimizer step.
Run `python -m lidr_jax.dpo --help` for the command line (lidr_jax.train.cli).

Notation (per pair): c chosen, r rejected, logπ(y) the summed log-prob of the response tokens under
the policy, logπ_ref(y) under the frozen reference, and the implicit-reward margin
    h = (logπ(c) − logπ_ref(c)) − (logπ(r) − logπ_ref(r)).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.settings import check_settings, setting

LossType = Literal["sigmoid", "robust", "ipo", "hinge"]
LOSS_TYPES = typing.get_args(LossType)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Every DPO training setting (frozen; `python -m lidr_jax.dpo --set key=value` sets any field)."""

    # Keys of earlier versions, refused by the loader with their new name (lidr_jax.settings.from_dict).
    MOVED_SETTINGS = {
        "attention": "compute.attention",
        "remat": "compute.remat",
        "compute_dtype": "compute.compute_dtype",
        "logprob_chunk": "compute.logprob_chunk",
        "reference_batch_size": "compute.batch_size",
    }

    # the loss
    beta: float = setting(0.1, "strength of the KL anchor to the reference (β in every loss)", gt=0)
    loss_type: LossType = setting("sigmoid", "sigmoid (DPO, cDPO with label_smoothing) | robust | ipo | hinge")
    label_smoothing: float = setting(
        0.0, "ε: assumed probability that a pair's label is flipped (sigmoid, robust)", ge=0, lt=0.5
    )
    ipo_average: bool = setting(
        True, "ipo on length-averaged log-probs (TRL, LLaMA-Factory); false: summed (the IPO paper)"
    )
    nll_weight: float = setting(1.0, "λ of the length-averaged NLL on chosen (LLaMA-Factory `pref_ftx`)", ge=0)
    # the optimizer and its schedule
    learning_rate: float = setting(5e-7, "AdamW's peak learning rate, after warmup", ge=0)
    warmup: float = setting(0.1, "< 1: fraction of the optimizer steps; >= 1: a number of steps", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = setting(
        "cosine", "decay after warmup (cosine and linear end at 0)"
    )
    # batching
    epochs: int = setting(1, "passes over the pairs", ge=1)
    batch_size: int = setting(4, "pairs per micro-batch (one packed row per pair)", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)", ge=1)
    # the update
    max_grad_norm: float = setting(1.0, "global-norm clipping; 0 disables it", ge=0)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay", ge=0)
    adam_b1: float = setting(0.9, "AdamW's first-moment decay")
    adam_b2: float = setting(0.999, "AdamW's second-moment decay")
    adam_eps: float = setting(1e-8, "AdamW's epsilon")
    # lengths and rows
    max_prompt_len: int = setting(512, "longer prompts keep their last tokens (counted)", ge=1)
    max_response_len: int = setting(1024, "longer responses keep their first tokens (counted)", ge=1)
    bucket_multiple: int = setting(0, "0: powers of two to 256, then multiples of 128; n: multiples of n", ge=0)
    row_tokens: int | Literal["auto"] = setting(
        0,
        "0: one row per pair, bucketed; n: several pairs per row of n tokens (lidr_jax.train.packing), batch_size "
        "still counting pairs per micro-batch; auto: rows and micro-batches from the compiled train step's memory "
        "(lidr_jax.train.autotune)",
        ge=16,
        also=(0, "auto"),
    )
    memory_margin_gib: float = setting(2.0, "row_tokens / compute.remat auto: memory left free of the budget", ge=0)
    share_prompt: bool = setting(True, "packed rows run a pair's prompt once for both answers; false: once per answer")
    pack_shapes: Literal["run", "step"] = setting(
        "run",
        "packed shapes: run (one for every step, one compilation) | step (each step's rows as long as its "
        "longest, rounded up to bucket_multiple or 512: less padding, a compilation per distinct shape)",
    )
    seed: int = setting(0, "seeds the data order", ge=0)
    compute: ScoringConfig = setting(
        ScoringConfig(),
        "how the train step and the reference pass compute: attention, remat, compute_dtype, logprob_chunk, "
        "batch_size (pairs per forward of the reference pass; lidr_jax.model.scoring.ScoringConfig)",
    )

    def __post_init__(self):
        check_settings(self)

    def replace(self, **changes) -> DPOConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------- losses


def preference_losses(logp_c, logp_r, ref_c, ref_r, cfg: DPOConfig, count_c=None, count_r=None):
    """Per-pair preference loss [B] (without the NLL term) from summed response log-probs (and, for
    averaged IPO, the answers' token counts).

    With h the margin of the module docstring and ε = label_smoothing:
    - sigmoid, DPO (Rafailov et al. 2023, arXiv 2305.18290), with conservative label smoothing
      (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"):
          −(1 − ε)·log σ(βh) − ε·log σ(−βh)
    - robust, unbiased under label noise ε (Chowdhury et al. 2024, arXiv 2403.00409, eq. for rDPO):
          [−(1 − ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)
    - ipo (Azar et al. 2023, arXiv 2310.12036, eq. 17; regression of h onto 1/(2β)):
          (h − 1/(2β))²
      with `ipo_average` (default) on length-averaged log-probs, as TRL and LLaMA-Factory compute it:
          h = (logπ(c) − logπ_ref(c))/|c| − (logπ(r) − logπ_ref(r))/|r|;
      `ipo_average: false` keeps the paper's summed log-probs.
    - hinge, SLiC-HF calibration loss (Zhao et al. 2023, arXiv 2305.10425) with margin 1/β:
          max(0, 1 − βh)
    """
    h = (logp_c - ref_c) - (logp_r - ref_r)
    b, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(b * h) - eps * jax.nn.log_sigmoid(-b * h)
    if cfg.loss_type == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(b * h) + eps * jax.nn.log_sigmoid(-b * h)) / (1 - 2 * eps)
    if cfg.loss_type == "ipo":
        if cfg.ipo_average:
            if count_c is None or count_r is None:
                raise ValueError("loss_type ipo with ipo_average needs the token counts of both answers")
            h = (logp_c - ref_c) / jnp.maximum(count_c, 1.0) - (logp_r - ref_r) / jnp.maximum(count_r, 1.0)
        return (h - 1 / (2 * b)) ** 2
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1 - b * h)
    raise ValueError(f"loss_type={cfg.loss_type!r}; choose one of {LOSS_TYPES}")


def dpo_terms(logp_c, logp_r, count_c, ref_c, ref_r, cfg: DPOConfig, count_r=None):
    """Per-pair total loss [B] and the per-pair quantities the metrics average. `count_c` / `count_r`:
    the answers' token counts (`count_r` is needed by averaged IPO only).

    The NLL term is LLaMA-Factory's `pref_ftx` (the objective of both LIDR and ICR): the chosen
    response's mean token NLL, −logπ(c)/|c|, times `nll_weight`, added to each pair's loss.
    """
    pref = preference_losses(logp_c, logp_r, ref_c, ref_r, cfg, count_c, count_r)
    nll = -logp_c / jnp.maximum(count_c, 1.0)
    reward_c = cfg.beta * jax.lax.stop_gradient(logp_c - ref_c)
    reward_r = cfg.beta * jax.lax.stop_gradient(logp_r - ref_r)
    per_pair = {
        "loss": pref + cfg.nll_weight * nll,
        "dpo_loss": pref,
        "nll_loss": nll,
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/margins": reward_c - reward_r,
        "rewards/accuracies": (reward_c > reward_r).astype(jnp.float32),
        "logps/chosen": logp_c,
        "logps/rejected": logp_r,
    }
    return per_pair["loss"], {k: jax.lax.stop_gradient(v) for k, v in per_pair.items()}
