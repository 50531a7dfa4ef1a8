"""alpaca_eval itself judges our X-AlpacaEval files against a local fake judge endpoint: the weighted
annotator (the papers' judging: the preference read from the judge's token log-probabilities) and the
plain one (a verdict line). The fake judge prefers the model's answer with a stated probability per
instruction, so both win rates are known by hand."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lidr_jax.eval.alpaca import judge_output_folder
from lidr_jax.eval.evaluate import alpaca_records

ALPACA_EVAL = Path(sys.executable).parent / "alpaca_eval"
# The judge's probability that the model's answer is the better one, per instruction.
P_MODEL = {"Dis bonjour.": 0.8, "Compte jusqu'à 3.": 0.3}


class FakeJudge:
    """An OpenAI-compatible /chat/completions server answering as a judge: for the weighted annotator
    (logprobs requested) one token, "a" or "b", with top_logprobs giving p(model's side) = P_MODEL;
    for the plain one the verdict line of the likelier side."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                payload = json.dumps(outer.answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body):
        text = body["messages"][-1]["content"]
        instruction = re.search(r"## Instruction\n(.*?)\n\n## Output \(a\)", text, re.DOTALL).group(1)
        output_a = re.search(r"## Output \(a\)\n(.*?)\n\n## Output \(b\)", text, re.DOTALL).group(1)
        p = P_MODEL[instruction]
        p_a = p if output_a.startswith("MODEL") else 1 - p
        logprobs = None
        if body.get("logprobs"):
            top = [
                {"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in (("a", p_a), ("b", 1 - p_a))
            ]
            top.sort(key=lambda x: -x["logprob"])
            content = top[0]["token"]
            logprobs = {"content": [{**top[0], "top_logprobs": top}]}
        else:
            content = "Output (a)" if p_a > 0.5 else "Output (b)"
        return {
            "id": "fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
        }

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge():
    server = FakeJudge()
    yield server
    server.close()


def _write_outputs(root: Path):
    items = [{"instruction": i, "dataset": "oasst"} for i in P_MODEL]
    for name, text in (("model", "MODEL answer {}"), ("reference", "REFERENCE answer {}")):
        path = root / name / "fr" / "model_outputs.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(alpaca_records(items, [text.format(i) for i in range(len(items))], name)))


@pytest.mark.parametrize(
    "annotator, win_rate, discrete",
    # weighted: preferences 1.8 and 1.3: win rate (0.8 + 0.3) / 2 = 55 %; rounded, a win and a loss: 50 %.
    # plain: verdicts give preferences 2 and 1: 50 % both ways.
    [("weighted", 55.0, 50.0), ("plain", 50.0, 50.0)],
)
def test_alpaca_eval_judges_with_our_annotator(tmp_path, judge, annotator, win_rate, discrete):
    if not ALPACA_EVAL.is_file():
        pytest.skip("alpaca_eval is not installed (the `test` extra installs it)")
    _write_outputs(tmp_path)
    commands = judge_output_folder(tmp_path / "model", tmp_path / "reference", ["fr"], "judge-x", annotator=annotator)
    args = shlex.split(commands["fr"])
    assert args[0] == "alpaca_eval"
    env = dict(os.environ, OPENAI_API_KEY="test-key", OPENAI_BASE_URL=judge.url, PYTHONWARNINGS="ignore")
    res = subprocess.run([str(ALPACA_EVAL), *args[1:]], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(args[args.index("--output_path") + 1])
    (board,) = out.rglob("leaderboard.csv")
    (row,) = [r for r in csv.DictReader(board.open()) if r[""] == "model" or r.get("name") == "model"]
    assert float(row["win_rate"]) == pytest.approx(win_rate, abs=1e-9)
    assert float(row["discrete_win_rate"]) == pytest.approx(discrete, abs=1e-9)
    assert len(judge.requests) == 2 and {r["model"] for r in judge.requests} == {"judge-x"}
    for r in judge.requests:
        assert "written in French" in r["messages"][-1]["content"]
        if annotator == "weighted":
            assert (r["logprobs"], r["top_logprobs"], r["max_tokens"]) == (True, 5, 1)
        else:
            assert "logprobs" not in r
