"""`python -m lidr_jax.dpo` on a tiny HF model directory and a 4-pair file, in both pair formats."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from dpo_helpers import PAIRS, write_tiny_hf_dir

from lidr_jax.train.cli import main

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    "--set",
    "batch_size=2",
    "--set",
    "learning_rate=1e-3",
    "--set",
    "warmup=0",
    "--set",
    "compute.logprob_chunk=16",
    "--set",
    "max_response_len=32",
    "--quiet",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trl_run(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("trl")
    pairs = d / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r, "id": i}) + "\n"
            for i, (p, c, r) in enumerate(PAIRS[:4])
        )
    )
    rc = main(["--model", str(model_dir), "--pairs", str(pairs), "--out", str(d / "out"), *SETTINGS])
    return rc, d / "out"


def test_trl_file_trains_and_writes_model_and_metrics(trl_run, model_dir):
    from lidr_jax.formats.load import load_pretrained

    rc, out = trl_run
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # 4 pairs, batch 2, 1 epoch
    assert {"loss", "rewards/accuracies", "logps/chosen", "nll_loss", "grad_norm", "learning_rate"} <= set(rows[0])
    assert rows[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)  # reference = starting model
    trained, start = load_pretrained(out / "model"), load_pretrained(model_dir)
    delta = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(start.params))
    )
    assert 1e-4 < delta < 0.1  # two Adam steps of lr 1e-3
    assert trained.tokenizer.hf.chat_template == start.tokenizer.hf.chat_template
    assert json.loads((out / "dpo_config.json").read_text())["dpo"]["batch_size"] == 2
    assert _safetensors_dtypes(out / "model") == {"BF16"}  # bfloat16 export unless float32 is asked for
    assert (out / "tensorboard").is_dir() and (out / "checkpoints" / "2").is_dir()


def _safetensors_dtypes(model_dir: Path) -> set[str]:
    """The dtypes in the safetensors headers (8-byte little-endian length, then JSON)."""
    dtypes = set()
    for f in model_dir.glob("*.safetensors"):
        data = f.read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def test_alpaca_file_gives_the_same_pairs(trl_run, model_dir, tmp_path):
    _, trl_out = trl_run
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": p, "input": "", "output": [c, r]} for p, c, r in PAIRS[:4]]))
    # reuse the TRL run's reference log-probs: they are accepted only if the tokens are identical
    out = tmp_path / "out"
    out.mkdir()
    (out / "reference_logps.npz").write_bytes((trl_out / "reference_logps.npz").read_bytes())
    (out / "dpo_config.json").write_bytes((trl_out / "dpo_config.json").read_bytes())  # a folder of this command's
    assert main(["--model", str(model_dir), "--pairs", str(pairs), "--out", str(out), *SETTINGS]) == 0
    a = [json.loads(x) for x in (trl_out / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)


def test_malformed_pair_file_names_file_and_line(model_dir, tmp_path, capsys):
    pairs = tmp_path / "broken.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert main(["--model", str(model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "o")]) == 2
    assert "broken.jsonl:2: record is neither TRL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "item,msg",
    [
        ("betta=0.2", "unknown setting 'betta'"),
        ("beta=abc", "beta: expected a number"),
        ("loss_type=kto", "dpo.loss_type must be one of ['sigmoid', 'robust', 'ipo', 'hinge'], got 'kto'"),
    ],
)
def test_bad_settings_fail_naming_the_key(model_dir, tmp_path, capsys, item, msg):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert main(["--model", str(model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "o"), "--set", item]) == 2
    assert msg in capsys.readouterr().err


def test_help_lists_the_settings():
    out = subprocess.run(
        [sys.executable, "-m", "lidr_jax.dpo", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for name in ("beta = 0.1", "loss_type = 'sigmoid'", "nll_weight = 1.0", "grad_accum", "remat", "compute_dtype"):
        assert name in out.stdout
