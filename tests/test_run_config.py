"""The run configuration: YAML + --set into typed settings, errors naming the key, the paper configs."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT

from lidr_jax.pipeline.config import RunConfig, load_run_config
from lidr_jax.settings import SettingsError, apply_overrides, describe, parse_override
from scripts.model_shapes import LLAMA_3_8B

CONFIGS = REPO_ROOT / "configs"


def test_default_config_is_the_embedded_lidr_run():
    cfg = load_run_config()
    assert cfg.model == "smollm2-135m-instruct" and cfg.reward == "lidr" and cfg.iterations == 2
    assert cfg.languages[0] == cfg.dominant == "en" and len(cfg.targets) >= 4
    assert cfg.prompts.languages == cfg.languages  # the prompt source follows the run's languages
    assert cfg.generation.temperature == 0.0 and cfg.generation.repetition_penalty == 1.1  # paper decoding
    assert cfg.lidr.translation.repetition_penalty == 1.0


def test_overrides_are_typed():
    cfg = load_run_config(
        overrides=[
            "dpo.beta=0.25",
            "languages=[en,fr]",
            "dpo.learning_rate=1e-6",
            "generation.stop=['</s>']",
            "plan.per_iteration=3",
        ]
    )
    assert cfg.dpo.beta == 0.25 and cfg.languages == ("en", "fr") and cfg.dpo.learning_rate == 1e-6
    assert cfg.generation.stop == ("</s>",) and cfg.plan.per_iteration == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.betta=0.1", "unknown setting 'dpo.betta'"),
        ("nonsense=1", "unknown setting 'nonsense'"),
        ("dpo.beta=high", "dpo.beta: expected a number"),
        ("iterations=two", "iterations: expected an integer"),
        ("reward=ppo", "reward must be one of ['lidr', 'icr'], got 'ppo'"),
        ("languages=[en,klingon]", "klingon"),
        ("dominant=zh", "dominant language 'zh'"),
        ("check.enabled=maybe", "check.enabled: expected true or false"),
        ("dpo=3", "dpo: expected a mapping"),
        ("generation.temperature=-1", "temperature"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_run_config(overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=-1", "seed must be >= 0"),
        ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
        ("checkpoint_keep=0", "checkpoint_keep must be >= 1"),
        ("reward=icr", "icr.reference_model is required with reward=icr"),
        ("icr.scorer=everyone", "scorer must be one of ['given', 'policy'], got 'everyone'"),
        ("icr.samples=1", "icr.samples must be >= 2, got 1"),
    ],
)
def test_ranges_are_checked_when_the_config_loads(override, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_run_config(overrides=[override])


def test_norwegian_no_stays_a_language_code(tmp_path):
    """YAML 1.1 reads `no` as false; the loader keeps yes/no/on/off strings unless a boolean is expected."""
    assert load_run_config(overrides=["languages=[en,no]"]).languages == ("en", "no")
    config = tmp_path / "nb.yaml"
    config.write_text("languages: [en, no]\ncheck:\n  enabled: no\n")
    cfg = load_run_config(config)
    assert cfg.languages == ("en", "no") and cfg.prompts.languages == ("en", "no")
    assert cfg.check.enabled is False  # where a boolean is expected, `no` is still false
    assert load_run_config(overrides=["check.enabled=yes"]).check.enabled is True


def test_config_files_that_cannot_be_settings(tmp_path):
    with pytest.raises(SettingsError, match=f"config file {tmp_path} is a folder; pass --config a YAML file"):
        load_run_config(tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(SettingsError, match=f"{empty} is empty; write the settings to change"):
        load_run_config(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("dpo:\n  beta: [0.1\n")
    with pytest.raises(SettingsError, match=f"{broken}:3: not valid YAML"):
        load_run_config(broken)


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    with pytest.raises(SettingsError, match="expected key=value"):
        parse_override("dpo.beta")
    with pytest.raises(SettingsError, match="is not a group"):
        apply_overrides({"dpo": 1}, ["dpo.beta=0.1"])


def test_help_lists_every_group_with_the_runs_defaults():
    text = describe(RunConfig())
    for group in ("prompts:", "plan:", "generation:", "lidr:", "icr:", "dpo:", "check:", "evaluation:", "mesh:"):
        assert group in text
    assert "generation.max_new_tokens = 2400" in text  # the run's (paper) default, not SamplingConfig's


def test_paper_configs_have_the_paper_settings():
    lidr = load_run_config(CONFIGS / "lidr_llama3_8b.yaml")
    assert lidr.reward == "lidr" and lidr.iterations == 2 and set(lidr.targets) == {"es", "ru", "de", "fr"}
    assert (lidr.generation.temperature, lidr.generation.repetition_penalty, lidr.generation.max_new_tokens) == (
        0.0,
        1.1,
        2400,
    )
    assert lidr.lidr.translation.repetition_penalty == 1.0 and lidr.plan.per_iteration == 1000
    assert lidr.lidr.pairs.system_prompt is None  # the authors' pairs most likely have no system turn
    assert lidr.lidr.translation.max_new_tokens == 4096  # the authors' translation limit
    icr = load_run_config(CONFIGS / "icr_llama3_8b.yaml")
    assert icr.reward == "icr" and icr.icr.samples == 10 and icr.plan.per_iteration == 3000
    assert (icr.icr.sampling.temperature, icr.icr.sampling.top_p) == (0.9, 1.0)
    assert icr.icr.selection.condition == "english" and icr.icr.reference == "original"
    assert icr.icr.translation.max_new_tokens == 8192  # the authors' translate-the-answer limit
    for cfg in (lidr, icr):
        d = cfg.dpo
        assert (d.beta, d.nll_weight, d.batch_size * d.grad_accum, d.loss_type) == (0.1, 1.0, 32, "sigmoid")
        assert 1e-7 <= d.learning_rate <= 5e-7


LLAMA3_8B = dict(model_type="llama", rms_norm_eps=1e-5, **LLAMA_3_8B)  # its config.json


def test_paper_config_memory_plan_from_eval_shape():
    """DPO state of Llama-3-8B under the paper configs' settings, from abstract shapes only:
    float32 master weights + AdamW moments + gradients = 16 bytes/param, FSDP-sharded over 8 devices
    fits an 80 GB H100 with room for activations (the per-device budget docs/scaling.md details)."""
    from lidr_jax.model.config import config_from_hf
    from lidr_jax.model.llama import abstract_params
    from lidr_jax.train.trainer import make_optimizer

    cfg = load_run_config(CONFIGS / "lidr_llama3_8b.yaml")
    model_cfg = config_from_hf(LLAMA3_8B)
    params = abstract_params(model_cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == 8_030_261_248
    opt_state = jax.eval_shape(make_optimizer(cfg.dpo, 100).init, params)
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert param_bytes == 4 * n and 8 * n <= opt_bytes <= 8 * n + 1024  # mu and nu in float32
    per_device = (2 * param_bytes + opt_bytes) / 8  # params + grads + AdamW, FSDP over 8 devices
    assert per_device / 2**30 == pytest.approx(14.96, abs=0.01)
    assert per_device < 0.25 * 80e9  # H100: three quarters left for activations (remat=full) and buffers
