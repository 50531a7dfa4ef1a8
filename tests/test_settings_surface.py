"""Every setting of the run takes effect or is refused: each leaf of RunConfig set to another valid value
changes what the stages read (RunConfig.resolved), the values the run derives itself are refused with
where they come from, and every setting has its help line."""

from __future__ import annotations

import functools
import json
import re
import types
import typing

import pytest
from conftest import REPO_ROOT

from lidr_jax.pipeline.config import RunConfig, load_run_config
from lidr_jax.settings import SettingsError, describe, leaves
from lidr_jax.train.cli import DPORunConfig

BASE = ["icr.reference_model=ref_model"]  # so that reward=icr loads
ICR = ["reward=icr", *BASE]
# Values a setting's type cannot suggest (a template's placeholders, a URL), and the settings another
# one needs before it can change (a translator model for kind=model).
VALUES = {
    "languages": [("en", "es")],
    "mesh.rules": [("mlp=tensor",)],
    "lidr.prompts.arithmetic_template": ["Answer in {language}: {instruction}"],
    "lidr.translator.endpoint.url": ["http://localhost:8000/v1"],
    "metrics.wandb_mode": ["online"],
}
NEEDS = {
    "lidr.translator.kind": ["lidr.translator.model=m", "lidr.translator.endpoint.url=http://h/v1"],
    "evaluation.mgsm_few_shot_k": ["evaluation.mgsm_few_shot_dir=shots"],
}


def _candidates(leaf) -> list:
    """Other values of the leaf's type, in the order tried (the first one the loader accepts is used)."""
    tp, value = leaf.type, leaf.value
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    optional = type(None) in typing.get_args(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    out = [None] if optional and value is not None else []
    for a in args:
        origin = typing.get_origin(a)
        if a is bool:
            out.append(not value)
        elif origin is typing.Literal:
            out += [c for c in typing.get_args(a) if c != value]
        elif a is int:
            base = value if isinstance(value, int) else 0
            out += [base + 1, base + 16, base - 1, 64]
        elif a is float:
            base = value if isinstance(value, float) else 0.0
            out += [base / 2, base + 0.25, base * 2, 0.5]
        elif a is str:
            out += ["es", "other {language} {text}", "x"]
        elif origin is tuple:
            item = typing.get_args(a)[0]
            choices = typing.get_args(item) if typing.get_origin(item) is typing.Literal else ("en", "es", "</s>")
            out += [tuple(choices[:1]), tuple(choices[1:2]), ()]
    return [c for c in VALUES.get(leaf.key, []) + out if c != value]


@functools.cache
def _resolved(overrides: tuple[str, ...]) -> dict:
    return load_run_config(overrides=list(overrides)).resolved(2)


def _changes(base: list[str], leaf) -> tuple[bool, list[str]]:
    """(whether some other value of the leaf loads and changes the resolved stages, the refusals seen)."""
    refused = []
    for candidate in _candidates(leaf):
        try:
            changed = load_run_config(overrides=base + [f"{leaf.key}={json.dumps(candidate)}"])
        except SettingsError as e:
            refused.append(f"{candidate!r}: {e}")
            continue
        if changed.resolved(2) != _resolved(tuple(base)):
            return True, refused
    return False, refused


@pytest.mark.parametrize("leaf", leaves(load_run_config(overrides=BASE)), ids=lambda leaf: leaf.key)
def test_every_setting_changes_what_the_stages_read(leaf):
    changed, refused = _changes(BASE + NEEDS.get(leaf.key, []), leaf)
    assert changed, f"{leaf.key}: no other value changes what the run reads (refused: {refused})"


@pytest.mark.parametrize(
    "override, source",
    [
        ("generation.seed=1", "each stage's seed is derived from the run's `seed`"),
        ("generation.n=4", "ICR's answers per prompt are icr.samples"),
        ("lidr.pairs.seed=1", "the run's `seed` + the iteration"),
        ("lidr.pairs.dominant=es", "the run's `dominant`"),
        ("dpo.seed=1", "the run's `seed` + the iteration"),
        ("icr.sampling.n=4", "unknown setting 'icr.sampling.n'"),
        ("check.sampling.seed=4", "unknown setting 'check.sampling.seed'"),
    ],
)
def test_values_the_run_derives_are_refused(override, source):
    with pytest.raises(SettingsError, match=re.escape(source)) as e:
        load_run_config(overrides=[override])
    if "unknown" not in source:
        assert f"'{override.split('=')[0]}' is not a setting: " in str(e.value)


def test_derived_values_follow_the_run():
    """The seeds the stages use are the ones the pipeline always derived (so the default run's files stay
    the same), and a stage's decoding is `generation` except its own group."""
    cfg = load_run_config(overrides=["seed=3", "generation.top_k=5", "check.sampling.top_k=7", *ICR])
    seeds = {stage: cfg.sampling(stage, 2).seed for stage in ("generate", "translate", "sample", "check")}
    assert seeds == {"generate": 3, "translate": 3, "sample": 3002, "check": 3}
    assert cfg.sampling("sample", 2).n == 10 and cfg.sampling("generate", 2).n == 1
    assert (cfg.lidr_pairs(2).seed, cfg.lidr_pairs(2).dominant, cfg.dpo_for(2).seed) == (5, "en", 5)
    assert [cfg.sampling(s, 1).top_k for s in ("generate", "translate", "check")] == [5, 5, 7]
    assert cfg.sampling("translate", 1).repetition_penalty == 1.0  # LIDR's translation default kept


def test_a_stage_group_given_in_part_keeps_its_other_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("check:\n  sampling:\n    batch_size: 3\nevaluation:\n  limit: 5\n")
    cfg = load_run_config(config)
    assert cfg.sampling("check", 0).max_new_tokens == 64 and cfg.sampling("check", 0).batch_size == 3
    assert cfg.evaluation.benchmarks == () and cfg.evaluation.limit == 5  # the run's default, as --help shows
    bad = load_run_config  # a stage's range error names the stage's key
    with pytest.raises(SettingsError, match=r"lidr\.translation\.max_new_tokens must be >= 1, got 0"):
        bad(overrides=["lidr.translation.max_new_tokens=0"])


def test_help_documents_every_setting():
    text = describe(RunConfig())
    missing = [leaf.key for cls in (RunConfig, DPORunConfig) for leaf in leaves(cls) if not leaf.doc]
    assert missing == []
    for leaf in leaves(RunConfig):
        line = next(x for x in text.splitlines() if x.strip().startswith(leaf.key + " = "))
        assert "   # " + leaf.doc in line
    assert "generation.seed" not in text and "dpo.seed" not in text and "lidr.pairs.seed" not in text


def test_configuration_doc_is_generated_from_the_classes():
    from scripts.configuration_doc import render

    committed = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/configuration.md is stale: run python -m scripts.configuration_doc"
    assert f"{len(leaves(RunConfig))} settings" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")
