"""The programs a run executes, built from a run config for a device mesh without weights or data.

Each `Program` is a jitted function and the abstract arguments (`jax.ShapeDtypeStruct` with shardings)
that a run of the config would call it with; `lidr_jax.pipeline.plan` compiles them for a TPU topology.
Shapes are the config's limits, as the fit check assumes before any pair exists:

- train: the DPO optimizer step (lidr_jax.train.trainer.make_train_step) on `grad_accum` micro-batches of
  `batch_size` rows: without packing each row a prompt of `max_prompt_len` and two answers of
  `max_response_len`; with `row_tokens`, one pair filling each packed row. The run mesh (`mesh` group).
- reference: the reference log-prob pass over one micro-batch of the same rows.
- prefill:STAGE and decode:STAGE for each generation stage of the method: the engine's largest prefill,
  as many prompts at the stage's prompt limit (context - max_new_tokens unless set) as `batch_size`
  and `prefill_tokens` allow (lidr_jax.sampling.engine.prefill_rows), and one
  decode step of `batch_size` slots over a cache of prompt limit + max_new_tokens slots, on the
  decoding layout of one host (lidr_jax.parallel.sharding.decode_layout).
- icr_score: ICR's scoring forward (`icr.score_batch_size` rows of prompt + answer) on the run mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lidr_jax.formats.gguf import read_gguf_config
from lidr_jax.formats.load import EMBEDDED_MODELS, embedded_model_path
from lidr_jax.model.config import ModelConfig, load_hf_config
from lidr_jax.model.llama import abstract_params, init_cache, param_specs
from lidr_jax.model.scoring import batch_logprobs
from lidr_jax.parallel.sharding import (
    MESH_AXES,
    DecodeLayout,
    batch_sharding,
    batch_split,
    decode_layout,
    make_mesh,
    param_shardings,
    parse_rules,
    rows_for,
    state_shardings,
    tree_nbytes,
    use_mesh,
)
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.sampling.engine import prefill_logits, prefill_rows, step_logits
from lidr_jax.train.packing import packed_logprobs
from lidr_jax.train.pairs import EncodedPairs
from lidr_jax.train.trainer import init_state, lr_schedule, make_optimizer, make_train_step, step_batch


class PlanInputError(ValueError):
    """The config's model cannot be read for its architecture (no config.json, not a .gguf file)."""


@dataclasses.dataclass
class Program:
    name: str
    mesh: Mesh
    rules: dict
    build: Callable[[ModelConfig], tuple[Callable, tuple]]  # (jitted fn, abstract args) for a model config
    kind: str  # train | forward | prefill | decode
    tokens: int = 0  # tokens the program processes (train/forward/prefill), for the model-FLOPs estimate
    note: str = ""
    repeat: int = 1  # the cost estimate is `cost_build`'s program `repeat` times (micro-batches of a step)
    cost_build: Callable[[ModelConfig], tuple[Callable, tuple]] | None = None  # default: `build`
    row_tokens: int = 0  # tokens per row (attention FLOPs of the model-FLOPs estimate)


def model_architecture(spec: str, dtype: str) -> ModelConfig:
    """The architecture of the run's model without its weights: config.json of a directory, or the
    metadata of a .gguf file (an embedded name is its .gguf)."""
    path = embedded_model_path(spec) if spec in EMBEDDED_MODELS else Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanInputError(f"model {spec!r}: the directory has no config.json (plan reads only that file)")
        return load_hf_config(path / "config.json", param_dtype=dtype, dtype=dtype)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf_config(path, param_dtype=dtype, dtype=dtype)
    raise PlanInputError(f"model {spec!r}: not a directory with config.json, a .gguf file or an embedded model name")


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _params(config: ModelConfig, mesh: Mesh, rules):
    return _abstract(abstract_params(config), param_shardings(param_specs(config), mesh, rules))


def _limit_pairs(n: int, prompt: int, answer: int) -> EncodedPairs:
    """`n` pairs of a `prompt`-token prompt and two `answer`-token answers (token ids are irrelevant)."""
    p, a = np.zeros(prompt, np.int32), np.zeros(answer, np.int32)
    return EncodedPairs([p] * n, [a] * n, [a] * n)


def _train_pairs(run: RunConfig) -> EncodedPairs:
    """Pairs at the DPO limits; with packing, each pair shortened to fill one packed row."""
    dpo = run.dpo
    n = dpo.batch_size * dpo.grad_accum
    prompt, answer = dpo.max_prompt_len, dpo.max_response_len
    if dpo.row_tokens:
        copies = 1 if dpo.share_prompt else 2  # the prompt written once per answer without share_prompt
        prompt = min(prompt, dpo.row_tokens // 4)
        answer = min(answer, (dpo.row_tokens - copies * prompt) // 2)
    return _limit_pairs(n, prompt, answer)


def _host_batch(batch: dict, axis: int, mesh: Mesh, rules) -> dict:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(v.shape, axis, mesh, rules))
        for k, v in batch.items()
    }


def planned_dpo(dpo):
    """The DPO settings the plan compiles: `row_tokens: auto` and `compute.remat: auto` are chosen from the
    device's memory when training starts (lidr_jax.train.autotune); the plan compiles the unpacked rows at
    the config's limits with full remat, the choice that needs least memory per pair."""
    if dpo.row_tokens == "auto":
        dpo = dataclasses.replace(dpo, row_tokens=0)
    if dpo.compute.remat == "auto":
        dpo = dataclasses.replace(dpo, compute=dataclasses.replace(dpo.compute, remat="full"))
    return dpo


def train_programs(run: RunConfig, mesh: Mesh, rules) -> list[Program]:
    dpo = planned_dpo(run.dpo)
    run = dataclasses.replace(run, dpo=dpo)
    enc = _train_pairs(run)
    zeros = {"chosen": np.zeros(len(enc), np.float32), "rejected": np.zeros(len(enc), np.float32)}
    batch = step_batch(enc, zeros, np.arange(len(enc)), dpo, pad_id=0, split=batch_split(mesh, rules))
    tokens, row_tokens = int(np.sum(batch["attention_mask"])), int(batch["attention_mask"].shape[-1])
    accum = int(batch["weight"].shape[0])  # micro-batches of the step on this mesh (trainer.micro_batch_rows)

    def train_step(micro_batches: dict, dpo_cfg):
        def build(config: ModelConfig):
            optimizer = make_optimizer(dpo_cfg, 100)
            state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params(config))
            shardings = state_shardings(state, param_specs(config), mesh, rules)
            step = make_train_step(config, dpo_cfg, optimizer, lr_schedule(dpo_cfg, 100), shardings)
            return step, (_abstract(state, shardings), _host_batch(micro_batches, 1, mesh, rules))

        return build

    # The cost estimate: one micro-batch's step, `grad_accum` times (the optimizer update counted each
    # time: an upper bound on the step's cost).
    one = dataclasses.replace(dpo, grad_accum=1)
    first = {k: v[:1] for k, v in batch.items()}
    micro = {k: v[0] for k, v in batch.items() if k not in ("ref_chosen", "ref_rejected")}

    def reference(config: ModelConfig):
        compute = dpo.compute
        scoring_config = compute.model_config(config)
        if dpo.row_tokens:
            impl = compute.attention_impl(shared_prompt=dpo.share_prompt)

            def fn(p, b):
                return packed_logprobs(p, b, scoring_config, chunk=compute.logprob_chunk, attention=impl)[:2]

        else:

            def fn(p, b):
                return batch_logprobs(p, b, scoring_config, compute)[:2]

        return jax.jit(fn), (_params(config, mesh, rules), _host_batch(micro, 0, mesh, rules))

    return [
        Program(
            "train",
            mesh,
            rules,
            train_step(batch, dpo),
            "train",
            tokens,
            f"{accum} x {micro['tokens'].shape[0]} rows of {row_tokens} tokens",
            accum,
            train_step(first, one),
            row_tokens,
        ),
        Program(
            "reference",
            mesh,
            rules,
            reference,
            "forward",
            tokens // accum,
            f"{micro['tokens'].shape[0]} rows of {row_tokens} tokens",
            row_tokens=row_tokens,
        ),
    ]


def icr_score_program(run: RunConfig, mesh: Mesh, rules) -> Program:
    """ICR's scoring forward: `score_batch_size` rows of a prompt at its limit and a whole answer."""
    sampling = run.sampling("sample", 1)
    answer = sampling.max_new_tokens + 1
    rows = rows_for(run.icr.score_batch_size, batch_split(mesh, rules))  # as score_answers rounds them
    compute = dataclasses.replace(planned_dpo(run.dpo).compute, batch_size=rows)
    prompt = max(1, run.dpo.max_prompt_len)
    enc = _limit_pairs(compute.batch_size, prompt, answer)
    zeros = {"chosen": np.zeros(len(enc), np.float32), "rejected": np.zeros(len(enc), np.float32)}
    plain = dataclasses.replace(planned_dpo(run.dpo), row_tokens=0, batch_size=compute.batch_size, grad_accum=1)
    micro = {k: v[0] for k, v in step_batch(enc, zeros, np.arange(len(enc)), plain, 0).items()}
    micro = {k: v for k, v in micro.items() if k not in ("ref_chosen", "ref_rejected")}

    def build(config: ModelConfig):
        def fn(p, b):
            return batch_logprobs(p, b, compute.model_config(config), compute)[:2]

        return jax.jit(fn), (_params(config, mesh, rules), _host_batch(micro, 0, mesh, rules))

    tokens = compute.batch_size * (prompt + 2 * answer)
    return Program("icr_score", mesh, rules, build, "forward", tokens, "chosen and rejected slots both scored")


def generation_stages(run: RunConfig) -> list[str]:
    stages = ["generate", "translate"] if run.reward == "lidr" else ["sample"]
    if run.reward == "icr" and run.icr.selection.condition == "translate_answer":
        stages.append("translate_answers")
    if run.check.enabled:
        stages.append("check")
    return stages


def decode_mesh(run: RunConfig, config: ModelConfig, devices: list, device_bytes: int | None):
    """One host's devices in the decoding layout (lidr_jax.parallel.sharding.decode_layout)."""
    host = [d for d in devices if d.process_index == devices[0].process_index]
    weights = tree_nbytes(abstract_params(config))
    layout = decode_layout(weights, device_bytes, len(host), (config.num_attention_heads, config.num_key_value_heads))
    return Mesh(np.asarray(host).reshape(layout.shape), MESH_AXES), layout


def generation_programs(run: RunConfig, config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
    programs = []
    for stage in generation_stages(run):
        s = run.sampling(stage, 1)
        B = s.batch_size
        context = config.max_position_embeddings
        prompt = s.max_prompt_tokens or max(1, context - s.max_new_tokens)
        S = min(context, prompt + s.max_new_tokens)

        P = min(B, prefill_rows(prompt, s.prefill_tokens))  # the most prompts one refill prefills

        def prefill(cfg: ModelConfig, P=P, prompt=prompt, new=s.max_new_tokens):
            def fn(p, tokens, mask):
                return prefill_logits(p, None, tokens, mask, cfg, new)

            rows = batch_sharding((P, prompt), 0, mesh, rules)
            tokens = jax.ShapeDtypeStruct((P, prompt), jnp.int32, sharding=rows)
            mask = jax.ShapeDtypeStruct((P, prompt), jnp.bool_, sharding=rows)
            return jax.jit(fn), (_params(cfg, mesh, rules), tokens, mask)

        def decode(cfg: ModelConfig, B=B, S=S):
            with use_mesh(mesh, rules):
                cache = jax.jit(lambda: init_cache(cfg, B, S)).lower().compile().output_shardings
            cache = _cache_spec(cfg, B, S, cache, mesh, rules)

            def fn(p, tokens, cache):
                return step_logits(p, None, tokens, cache, cfg)

            tokens = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch_sharding((B,), 0, mesh, rules))
            return jax.jit(fn, donate_argnums=2), (_params(cfg, mesh, rules), tokens, cache)

        note = f"{P} prompts of {prompt} tokens" if prompt else ""
        programs.append(Program(f"prefill:{stage}", mesh, rules, prefill, "prefill", P * prompt, note))
        programs.append(Program(f"decode:{stage}", mesh, rules, decode, "decode", B, f"{B} slots of {S} cache slots"))
    return programs


def _cache_spec(config: ModelConfig, B: int, S: int, shardings, mesh: Mesh, rules):
    """The abstract cache a decode step receives: the fresh cache's buffers with their shardings and a
    filled length per row (a cache in use, not a fresh one)."""
    shapes = jax.eval_shape(lambda: init_cache(config, B, S))
    leaves = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings, is_leaf=_is_array_like
    )
    end = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch_sharding((B,), 0, mesh, rules))
    return leaves.with_lengths(end)  # a cache in use: the decode step reads and extends its rows


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def run_programs(run: RunConfig, config: ModelConfig, devices: list, device_bytes: int | None, host=None):
    """Every program of a run of `run` on `devices` (module docstring), and the decoding layout (with
    `data` 0 and the reason in `why` when a host cannot hold the weights to decode: then no generation
    programs).
    `host`: the devices to compile a host's generation on (lidr_jax.parallel.topology.host_devices;
    default: the first host's of `devices`)."""
    rules = parse_rules(run.mesh.rules)
    mesh = make_mesh(run.mesh, devices)
    programs = train_programs(run, mesh, rules)
    try:
        gen_mesh, layout = decode_mesh(run, config, host or devices, device_bytes)
        programs += generation_programs(run, config, gen_mesh, rules)
    except ValueError as e:  # a host cannot hold the weights to decode: no generation programs, the reason kept
        layout = DecodeLayout(0, 0, str(e))
    if run.reward == "icr":
        programs.append(icr_score_program(run, mesh, rules))
    return programs, layout, mesh
