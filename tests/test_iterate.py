"""The main job end to end on tiny models: LIDR and ICR iterations, resume after kills, bad inputs.

A random tiny model almost never writes the closing translation tag, so LIDR would build no pairs.
`scripted_model_dir` turns a tiny random model into a bigram automaton: four residual dimensions
that no layer writes carry a one-hot code of the current token (set in the embedding), the final
norm keeps only them, and the untied head maps each code to one next token:
    "<translation>" -> "†" -> "</translation>" -> end-of-turn;  any other token -> "◊".
So answers are "◊◊◊…" and every self-translation (pre-filled with "<translation>") parses as "†".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, build_tiny_hf_model, build_tiny_hf_tokenizer

GLYPH, TRANSLATED, CLOSE, OPEN = "◊", "†", "</translation>", "<translation>"
LANGS = ("en", "es", "fr")
PROMPTS = {
    "en": ["Say hi.", "Add 2 and 3.", "Name a fruit.", "Name a color.", "Count to 3."],
    "es": ["Di hola.", "Suma 2 y 3.", "Nombra una fruta.", "Nombra un color.", "Cuenta hasta 3."],
    "fr": ["Dis bonjour.", "Ajoute 2 et 3.", "Nomme un fruit.", "Nomme une couleur.", "Compte jusqu'à 3."],
}


@pytest.fixture(scope="module")
def scripted_model_dir(tmp_path_factory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("scripted")
    tok = build_tiny_hf_tokenizer()
    tok.add_tokens([OPEN, CLOSE, GLYPH, TRANSLATED])
    vocab = tok.get_vocab()
    model = build_tiny_hf_model(
        "llama", seed=3, vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False
    )
    eot = tok.eos_token_id
    script = {None: GLYPH, OPEN: TRANSLATED, TRANSLATED: CLOSE, CLOSE: eot}  # current token -> next token
    dims = range(len(script))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, list(dims)] = 0.0
        emb[:, 0] = 1.0  # every token not in the script: code 0
        for d, current in zip(dims, script):
            if current is not None:
                emb[vocab[current], :] = 0.0
                emb[vocab[current], d] = 1.0
        for layer in model.model.layers:  # no layer writes the code dimensions
            layer.self_attn.o_proj.weight[list(dims), :] = 0.0
            layer.mlp.down_proj.weight[list(dims), :] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[list(dims)] = 1.0
        model.lm_head.weight.zero_()
        for d, nxt in zip(dims, script.values()):
            model.lm_head.weight[nxt if isinstance(nxt, int) else vocab[nxt], d] = 30.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prompts")
    for lang, texts in PROMPTS.items():
        rows = [{"id": f"q{i}", "instruction": t} for i, t in enumerate(texts)]
        rows[1]["translation_task"] = True  # q1 is a translation task (the LIDR special case)
        (out / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def base_args(model_dir: Path, prompt_dir: Path, run_dir: Path, reward: str = "lidr") -> list[str]:
    sets = [
        f"model={model_dir}",
        f"reward={reward}",
        "iterations=1",
        "languages=[en,es,fr]",
        f"prompts.path={prompt_dir}",
        "plan.per_iteration=2",
        "plan.held_out=1",
        "generation.max_new_tokens=6",
        "generation.batch_size=4",
        "generation.progress=false",
        "lidr.translation.max_new_tokens=4",
        "lidr.translation.batch_size=4",
        "check.sampling.max_new_tokens=4",
        "dpo.batch_size=2",
        "dpo.max_prompt_len=512",
        "dpo.max_response_len=16",
        "dpo.learning_rate=1e-3",
        "dpo.epochs=2",
        "checkpoint_every=1",
        "export_dtype=float32",
        "icr.samples=3",
        "icr.sampling.max_new_tokens=5",
        "icr.sampling.batch_size=6",
    ]
    args = ["--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def run_cli(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    env.pop("LIDR_JAX_CRASH_AT", None)
    if crash_at:
        env["LIDR_JAX_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "lidr_jax.iterate", *args], env=env, capture_output=True, text=True, timeout=600
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def policy_params(run_dir: Path, k: int = 1):
    from lidr_jax.train.checkpoint import restore_params

    params, _ = restore_params(run_dir / f"iter_{k}" / "train" / "policy")
    return params


def evaluation_args(tmp_path: Path) -> list[str]:
    """A two-question MGSM in en and es, evaluated on the starting model and after each iteration."""
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("Tom has 2 apples and buys 3. How many?\t5\nHalf of 10?\t5\n")
    (mgsm / "mgsm_es.tsv").write_text("Tom tiene 2 manzanas y compra 3. ¿Cuántas?\t5\n¿La mitad de 10?\t5\n")
    sets = [
        "evaluation.benchmarks=[mgsm]",
        f"evaluation.mgsm_dir={mgsm}",
        "evaluation.mgsm_languages=[en,es]",
        "evaluation.limit=2",
        "evaluation.mgsm_max_new_tokens=4",
        "evaluation.progress=false",
    ]
    return [a for s in sets for a in ("--set", s)]


def test_lidr_iteration_produces_every_artifact(scripted_model_dir, prompt_dir, tmp_path):
    run_dir = tmp_path / "run"
    evaluation = evaluation_args(tmp_path)
    res = run_cli(base_args(scripted_model_dir, prompt_dir, run_dir) + evaluation)
    assert res.returncode == 0, res.stderr[-3000:]
    it = run_dir / "iter_1"
    for rel in (
        "generate/generations.jsonl",
        "translate/translations.jsonl",
        "pairs/pairs.jsonl",
        "pairs/stats.json",
        "reference/reference_logprobs.npz",
        "train/metrics.jsonl",
        "train/policy",
        "export/hf/config.json",
        "check/held_out.jsonl",
        "check/evaluation/metrics.json",
    ):
        assert (it / rel).exists(), rel
    assert (run_dir / "iter_0" / "check" / "held_out.jsonl").exists()
    assert (run_dir / "report.md").exists() and (run_dir / "training.png").exists()
    assert (run_dir / "evaluation.png").exists() and "mgsm_accuracy" in (run_dir / "report.md").read_text()
    metrics = json.loads((it / "check" / "evaluation" / "metrics.json").read_text())
    assert set(metrics["mgsm_accuracy"]) == {"en", "es"} and metrics["mgsm_accuracy"]["en"] == 0.0  # "◊◊◊◊"
    assert list((run_dir / "tensorboard" / "iter_1").glob("events.out.tfevents.*"))

    translations = read_jsonl(it / "translate" / "translations.jsonl")
    assert translations and all(t["translation"] == TRANSLATED for t in translations)
    pairs = read_jsonl(it / "pairs" / "pairs.jsonl")
    by_kind = {}
    for p in pairs:
        by_kind.setdefault((p["kind"], p["language"]), []).append(p)
    # Two prompts x two targets: 4 target pairs, less q1's: a translation task, whose target pairs the
    # default config drops (`pair_filters.translation_tasks: false`, counted as translation_task).
    # English pairs: one sampled X per prompt -> 2.
    assert {k: len(v) for k, v in by_kind.items()} == {("target", "es"): 1, ("target", "fr"): 1, ("dominant", "en"): 2}
    table = json.loads((it / "pairs" / "stats.json").read_text())["table"]
    assert all(table[lang]["dropped"]["translation_task"] == 1 and table[lang]["kept"] == 1 for lang in ("es", "fr"))
    answer = GLYPH * 6
    for p in by_kind[("target", "es")]:
        assert p["rejected"][0]["content"] == answer and p["rejected_from"] == "generation:es"
        assert p["chosen"][0]["content"] == TRANSLATED and p["chosen_from"] == "translation:en->es"
    for p in by_kind[("dominant", "en")]:
        assert p["chosen"][0]["content"] == answer and p["rejected"][0]["content"] == TRANSLATED
    metrics = read_jsonl(it / "train" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["iterations"]["1"]["stages"]) >= {
        "generate",
        "translate",
        "pairs",
        "reference",
        "train",
        "export",
        "check",
    }

    # The exported directory loads in transformers and gives lidr_jax's logits.
    import torch
    from transformers import AutoModelForCausalLM

    from lidr_jax.model.llama import forward

    hf = AutoModelForCausalLM.from_pretrained(it / "export" / "hf", dtype=torch.float32).eval()
    tokens = np.array([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    from lidr_jax.train.checkpoint import load_params_config

    ours = np.asarray(forward(policy_params(run_dir), tokens, load_params_config(it / "train" / "policy")))
    assert np.abs(ours - ref).max() <= 1e-4

    # A second iteration starts from the first one's trained policy.
    res = run_cli(
        base_args(scripted_model_dir, prompt_dir, run_dir)
        + evaluation
        + ["--set", "iterations=2", "--allow-config-change"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    start = manifest["iterations"]["2"]["start_model"]
    assert Path(start).resolve() == (it / "train" / "policy").resolve() or start.endswith("iter_1/train/policy")
    assert (run_dir / "iter_2" / "export" / "hf" / "config.json").exists()


def test_icr_iteration_produces_every_artifact(make_hf_model, tiny_llama_dir, tmp_path):
    prompt_dir = tmp_path / "prompts"
    prompt_dir.mkdir()
    for lang, texts in PROMPTS.items():
        rows = [{"instruction_id": f"h{i}", "instruction": t} for i, t in enumerate(texts)]  # the ICR layout
        (prompt_dir / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    reference = make_hf_model("llama", seed=7, tie_word_embeddings=True)
    run_dir = tmp_path / "run"
    args = base_args(tiny_llama_dir, prompt_dir, run_dir, reward="icr")
    args += ["--set", f"icr.reference_model={reference}", "--set", "icr.sampling.temperature=1.0"]
    args += ["--set", "pair_filters.language=false"]  # a random model writes in no language
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    it = run_dir / "iter_1"
    samples = read_jsonl(it / "sample" / "samples.jsonl")
    assert len(samples) == 2 * 3 and all(len(s["outputs"]) == 3 for s in samples)
    scores = read_jsonl(it / "score" / "scores.jsonl")
    for s in scores:
        np.testing.assert_allclose(s["rewards"], np.subtract(s["logp_dpo"], s["logp_ref"]), atol=1e-9)
    pairs = read_jsonl(it / "pairs" / "pairs.jsonl")
    assert pairs and all(p["kind"] == "icr" for p in pairs)
    for p in pairs:  # chosen has the top length-controlled reward of its prompt's answers
        row = next(s for s in scores if s["id"] == p["id"] and s["lang"] == p["language"])
        assert p["chosen"][0]["content"] in row["answers"] and p["rejected"][0]["content"] in row["answers"]
    assert (it / "export" / "hf" / "config.json").exists() and (it / "train" / "policy").exists()


def test_kill_and_resume_matches_uninterrupted_run(scripted_model_dir, prompt_dir, tmp_path):
    clean = tmp_path / "clean"
    assert run_cli(base_args(scripted_model_dir, prompt_dir, clean)).returncode == 0
    killed = tmp_path / "killed"
    for crash in ("generate:1", "train:2"):  # during generation (after its first chunk), during training
        res = run_cli(base_args(scripted_model_dir, prompt_dir, killed), crash_at=crash)
        assert res.returncode == -9, (crash, res.returncode, res.stderr[-2000:])
    assert (killed / "iter_1" / "train" / "checkpoints").exists()
    res = run_cli(base_args(scripted_model_dir, prompt_dir, killed))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in res.stderr
    for rel in ("pairs/pairs.jsonl", "generate/generations.jsonl", "translate/translations.jsonl"):
        assert (clean / "iter_1" / rel).read_text() == (killed / "iter_1" / rel).read_text(), rel
    a, b = policy_params(clean), policy_params(killed)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = [m["step"] for m in read_jsonl(killed / "iter_1" / "train" / "metrics.jsonl")]
    assert steps == sorted(set(steps))  # no duplicated metric lines after the resume


@pytest.mark.parametrize(
    "setting, message",
    [
        ("languages=[en,es,xx]", "xx"),
        ("languages=[en,es,de]", "de"),  # no de.jsonl in the prompt folder
        ("dpo.bogus=1", "dpo.bogus"),
        ("generation.temperature=hot", "generation.temperature"),
        ("plan.per_iteration=100", "prompts"),
    ],
)
def test_bad_inputs_fail_before_any_model_work(prompt_dir, tmp_path, setting, message):
    args = base_args(tmp_path / "no-such-model", prompt_dir, tmp_path / "run") + ["--set", setting]
    res = run_cli(args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "loading" not in res.stderr


def test_misaligned_and_malformed_prompt_files(prompt_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for lang in LANGS:
        (bad / f"{lang}.jsonl").write_text((prompt_dir / f"{lang}.jsonl").read_text())
    (bad / "fr.jsonl").write_text((prompt_dir / "fr.jsonl").read_text().replace('"q4"', '"q9"'))
    res = run_cli(base_args(tmp_path / "m", bad, tmp_path / "r1"))
    assert res.returncode == 2 and "q4" in res.stderr
    (bad / "fr.jsonl").write_text((prompt_dir / "fr.jsonl").read_text() + "{not json\n")
    res = run_cli(base_args(tmp_path / "m", bad, tmp_path / "r2"))
    assert res.returncode == 2 and "fr.jsonl" in res.stderr and "6" in res.stderr
    (bad / "fr.jsonl").write_text("")
    res = run_cli(base_args(tmp_path / "m", bad, tmp_path / "r3"))
    assert res.returncode == 2 and "fr.jsonl" in res.stderr


def test_lidr_with_another_model_as_translator(scripted_model_dir, prompt_dir, tiny_llama_dir, tmp_path):
    """lidr.translator.kind=model: the policy (a random tiny model) is released while the scripted model
    translates; every translation is the scripted one, and the pairs and stats name the translator."""
    run_dir = tmp_path / "run"
    args = base_args(tiny_llama_dir, prompt_dir, run_dir)
    args += ["--set", "lidr.translator.kind=model", "--set", f"lidr.translator.model={scripted_model_dir}"]
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    it = run_dir / "iter_1"
    assert f"loading the translator {scripted_model_dir}" in res.stderr
    translations = read_jsonl(it / "translate" / "translations.jsonl")
    assert translations and all(t["translation"] == TRANSLATED for t in translations)
    name = f"model:{scripted_model_dir}"
    assert json.loads((it / "translate" / "stats.json").read_text())["translator"] == name
    targets = [p for p in read_jsonl(it / "pairs" / "pairs.jsonl") if p["kind"] == "target" and p["id"] != "q1"]
    assert targets and all(p["chosen"][0]["content"] == TRANSLATED for p in targets)
    assert all(p["meta"]["translator"] == name and p["meta"]["chosen_detected"] == "" for p in targets)
    table = json.loads((it / "pairs" / "stats.json").read_text())["table"]
    assert set(table) == {"es", "fr", "en"} and all(
        row["candidates"] == 2 for lang, row in table.items() if lang != "en"
    )
    assert (it / "train" / "policy").exists()  # the policy was loaded again after the translator


def test_missing_outputs_rerun_and_redo_a_stage(scripted_model_dir, prompt_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = base_args(scripted_model_dir, prompt_dir, run_dir)
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    it = run_dir / "iter_1"
    pairs = (it / "pairs" / "pairs.jsonl").read_text()
    before = policy_params(run_dir)

    # A finished stage's file deleted by hand is noticed, and that stage alone runs again.
    (it / "pairs" / "pairs.jsonl").unlink()
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"[iteration 1] pairs: recorded as done but {it / 'pairs' / 'pairs.jsonl'} is gone" in res.stderr
    assert (it / "pairs" / "pairs.jsonl").read_text() == pairs
    assert "[iteration 1] train\n" not in res.stderr and "[iteration 1] generate\n" not in res.stderr

    # --redo: the stage and the ones after it run again, from scratch, and nothing else is recorded.
    res = run_cli(args + ["--redo", "iter_1/train"])
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("train", "export", "check"):
        assert f"[iteration 1] {stage}\n" in res.stderr
    assert "[iteration 1] pairs\n" not in res.stderr and "resuming from the checkpoint" not in res.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_changes"] == []
    assert [r["stages"] for r in manifest["redone"]] == [["iter_1/train", "iter_1/export", "iter_1/check"]]
    assert set(manifest["iterations"]["1"]["stages"]) >= {"pairs", "train", "export", "check"}
    import jax

    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(policy_params(run_dir))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lidr_with_an_endpoint_as_translator(scripted_model_dir, prompt_dir, tmp_path, monkeypatch):
    """lidr.translator.kind=endpoint: an OpenAI-compatible server on 127.0.0.1 translates (no prefill is
    sent; the reply is parsed from its first opening tag); every answer is cached in the stage directory,
    so running the stage again sends nothing."""
    from chat_server import serve

    servers = serve()
    make = next(servers)
    sentences = {
        "Spanish": "Los colores primarios son el rojo, el azul y el amarillo.",
        "French": "Les couleurs primaires sont le rouge, le bleu et le jaune.",
        "English": "The primary colours are red, blue and yellow.",
    }

    def reply(content):
        language = next(name for name in sentences if f"into {name}" in content)
        return f"Here you go: <translation>{sentences[language]}</translation>"

    srv = make(reply=reply)
    try:
        run_dir = tmp_path / "run"
        args = base_args(scripted_model_dir, prompt_dir, run_dir)
        args += ["--set", "lidr.translator.kind=endpoint", "--set", f"lidr.translator.endpoint.url={srv.url}"]
        args += ["--set", "lidr.translator.endpoint.model=mt", "--set", "lidr.translator.endpoint.api_key_env=MT_KEY"]
        monkeypatch.setenv("MT_KEY", "sk-test-key")
        res = run_cli(args)
        monkeypatch.delenv("MT_KEY")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "sk-test-key" not in res.stdout + res.stderr
        it = run_dir / "iter_1"
        translations = read_jsonl(it / "translate" / "translations.jsonl")
        # 2 prompts: en->es and en->fr skip the translation task q1; es->en and fr->en take both. The four
        # X->en requests are equal (every answer is "◊◊◊◊◊◊"): sent once. So 3 requests for 6 translations.
        assert len(translations) == 6 and len(srv.requests) == 3
        assert all(
            t["translation"] == sentences[{"es": "Spanish", "fr": "French", "en": "English"}[t["target"]]]
            for t in translations
        )
        assert all(r["headers"]["Authorization"] == "Bearer sk-test-key" for r in srv.requests)
        assert all(r["body"]["model"] == "mt" and len(r["body"]["messages"]) == 1 for r in srv.requests)
        assert len(list((it / "translate" / "endpoint_cache").glob("*.json"))) == 3
        name = f"endpoint:mt@{srv.url}/chat/completions"
        targets = [p for p in read_jsonl(it / "pairs" / "pairs.jsonl") if p["kind"] == "target"]
        assert targets and all(p["meta"]["translator"] == name for p in targets)
        # the translate stage again (its output deleted), without the key: answered from the cache, nothing sent
        (it / "translate" / "translations.jsonl").unlink()
        res = run_cli(args)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "translate" in res.stderr and (it / "translate" / "translations.jsonl").exists()
        assert len(srv.requests) == 3
    finally:
        next(servers, None)
