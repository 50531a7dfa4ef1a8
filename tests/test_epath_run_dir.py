"""Run directories on an object store, through etils.epath: the same calls write `gs://bucket/run` as a
local folder, and local paths keep pathlib's fsync + rename.

No network: etils.epath has no in-memory gs:// backend of its own (`epath.testing.mock_epath` only
wraps the local filesystem), so `fake_gcs` registers one: fsspec's in-memory filesystem answering for
gs://, put where epath looks up the gs:// backend. Everything the run directory writes lands in that
memory store; a stray pathlib or `open()` call on a gs:// path would write the local relative folder
`gs:/...` instead, which every test checks is absent. Orbax itself cannot be exercised on it (it asks
google.cloud.storage about the bucket), so the checkpoint test checks the path Orbax is handed.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from lidr_jax.endpoint import ChatClient, EndpointConfig
from lidr_jax.files import (
    absolute_path,
    append_jsonl,
    as_path,
    atomic_write_json,
    files_under,
    is_local,
    read_jsonl,
    remove_tree,
    tree_bytes,
    upload_tree,
)
from lidr_jax.parallel.multihost import distributed_args
from lidr_jax.pipeline import resumable
from lidr_jax.pipeline.run_dir import RunConfigMismatchError, RunDir
from lidr_jax.settings import SettingsError
from lidr_jax.train import checkpoint, trainer
from lidr_jax.train.metrics import MetricsConfig, MetricsSink, read_tensorboard_scalars


class _MemoryGCS(MemoryFileSystem):
    """fsspec's in-memory filesystem under the gs:// protocol (its own store, not the shared one)."""

    protocol = ("gs",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return MemoryFileSystem._strip_protocol(path[len("gs://") :] if path.startswith("gs://") else path)


class _Backend(backend._FileSystemSpecBackend):  # epath's fsspec backend, on the store above
    def __init__(self, fs):
        self._fs = fs

    def fs(self, path):
        return self._fs


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    store = _MemoryGCS(skip_instance_cache=True)
    store.store, store.pseudo_dirs = {}, [""]
    monkeypatch.chdir(tmp_path)  # a mangled gs:// path would become tmp_path/"gs:"
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": _Backend(store)}):
        yield store
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written to the local disk"


def test_paths_local_stay_pathlib_uris_become_epath(tmp_path):
    assert is_local(tmp_path / "x") and is_local("runs/x") and not is_local("gs://b/x")
    assert type(as_path("runs/x")) is type(Path("runs/x"))
    assert type(as_path(epath.Path(tmp_path) / "x")) is type(tmp_path)  # a local epath comes back pathlib
    remote = as_path("gs://bucket/run")
    assert isinstance(remote, epath.Path) and str(remote / "iter_1") == "gs://bucket/run/iter_1"
    assert str(Path("gs://bucket/run")) == "gs:/bucket/run"  # what pathlib alone would have made of it
    assert absolute_path("runs/x") == Path.cwd() / "runs" / "x"
    assert str(absolute_path("gs://bucket/run")) == "gs://bucket/run"


def test_files_on_the_object_store(fake_gcs):
    atomic_write_json("gs://bucket/a/b.json", {"x": "ü"})
    assert json.loads(fake_gcs.cat("gs://bucket/a/b.json")) == {"x": "ü"}
    append_jsonl("gs://bucket/a/rows.jsonl", [{"i": 1}])
    append_jsonl("gs://bucket/a/rows.jsonl", [{"i": 2}, {"i": 3}])  # no append on a store: rewritten whole
    assert read_jsonl("gs://bucket/a/rows.jsonl") == [{"i": 1}, {"i": 2}, {"i": 3}]
    fake_gcs.pipe("gs://bucket/a/bad.jsonl", b'{"i": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"^gs://bucket/a/bad.jsonl:2: malformed JSON"):
        read_jsonl("gs://bucket/a/bad.jsonl")
    assert [str(f) for f in files_under("gs://bucket/a")] == [
        "gs://bucket/a/b.json",
        "gs://bucket/a/bad.jsonl",
        "gs://bucket/a/rows.jsonl",
    ]
    assert tree_bytes("gs://bucket/a") == sum(len(fake_gcs.cat(str(f))) for f in files_under("gs://bucket/a"))
    remove_tree("gs://bucket/a")
    remove_tree("gs://bucket/a")  # a missing tree is no error
    assert files_under("gs://bucket/a") == [] and tree_bytes("gs://bucket/a") == 0


def test_upload_tree_copies_a_local_folder(fake_gcs, tmp_path):
    (tmp_path / "hf" / "sub").mkdir(parents=True)
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "sub" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    upload_tree(tmp_path / "hf", "gs://bucket/run/export/hf")
    assert fake_gcs.cat("gs://bucket/run/export/hf/sub/w.bin") == b"\x00\x01" * 1000
    assert fake_gcs.cat("gs://bucket/run/export/hf/config.json") == b"{}"


def test_local_atomic_write_keeps_fsync_and_rename(tmp_path, monkeypatch):
    calls = []
    real_replace = __import__("os").replace
    monkeypatch.setattr("lidr_jax.files.os.replace", lambda a, b: calls.append(Path(b).name) or real_replace(a, b))
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert calls == ["m.json"] and json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left


def test_run_dir_on_the_object_store(fake_gcs):
    run = RunDir("gs://bucket/runs/r1", config={"lr": 1, "run_dir": "gs://bucket/runs/r1"}, seed=0)
    assert str(run.path) == "gs://bucket/runs/r1" and json.loads(fake_gcs.cat("gs://bucket/runs/r1/manifest.json"))
    d = run.stage_dir(1, "pairs")
    assert str(d) == "gs://bucket/runs/r1/iter_1/pairs"
    run.write_jsonl(d / "pairs.jsonl", [{"prompt": "p"}])
    run.write_text(d / "note.txt", "hi")
    run.mark_done(1, "pairs", {"pairs": str(d / "pairs.jsonl"), "model": "gs://other/m", "n": 3})
    recorded = json.loads(fake_gcs.cat("gs://bucket/runs/r1/manifest.json"))["iterations"]["1"]["stages"]["pairs"]
    # paths inside the run are stored relative to it (a copied bucket folder is the same run)
    assert recorded["outputs"] == {"pairs": "./iter_1/pairs/pairs.jsonl", "model": "gs://other/m", "n": 3}

    again = RunDir("gs://bucket/runs/r1")  # opened to read, as export does
    assert again.outputs(1, "pairs")["pairs"] == "gs://bucket/runs/r1/iter_1/pairs/pairs.jsonl"
    assert again.missing_outputs(1, "pairs") == []
    fake_gcs.rm("gs://bucket/runs/r1/iter_1/pairs/pairs.jsonl")
    assert again.missing_outputs(1, "pairs") == ["gs://bucket/runs/r1/iter_1/pairs/pairs.jsonl"]
    with pytest.raises(RunConfigMismatchError, match="lr: 1 -> 2"):
        RunDir("gs://bucket/runs/r1", config={"lr": 2, "run_dir": "gs://bucket/runs/r1"}, seed=0)
    run.redo([(1, "pairs")])
    assert not fake_gcs.exists("gs://bucket/runs/r1/iter_1/pairs/note.txt") and not run.is_done(1, "pairs")


def test_evaluation_benchmarks_on_the_object_store(fake_gcs):
    """The check stage's benchmarks (evaluation.benchmarks) read their data from and write their outputs
    to the bucket: MGSM scores, X-AlpacaEval outputs with alpaca_eval's files, metrics.json."""
    from types import SimpleNamespace

    from lidr_jax.eval.evaluate import EvalConfig, evaluate_model

    fake_gcs.pipe("gs://bucket/data/mgsm/mgsm_es.tsv", b"Mitad de 10?\t5\n")
    fake_gcs.pipe("gs://bucket/data/xa/es.json", json.dumps([{"instruction": "Di hola."}]).encode())
    ref = [{"instruction": "Di hola.", "output": "Hola.", "generator": "ref", "dataset": "x"}]
    fake_gcs.pipe("gs://bucket/data/ref/es/model_outputs.json", json.dumps(ref).encode())

    def answer(model, chats, sampling):
        return [SimpleNamespace(text="La respuesta es 5.", finish_reason="stop", token_ids=[]) for _ in chats]

    cfg = EvalConfig(
        benchmarks=("mgsm", "alpaca"),
        mgsm_dir="gs://bucket/data/mgsm",
        mgsm_languages=("es",),
        alpaca_dir="gs://bucket/data/xa",
        alpaca_languages=("es",),
        alpaca_reference="gs://bucket/data/ref",
        progress=False,
    )
    run = RunDir("gs://bucket/runs/r1", config={"run_dir": "gs://bucket/runs/r1"}, seed=0)
    out = run.stage_dir(1, "check") / "evaluation"
    metrics = evaluate_model(SimpleNamespace(source="m"), cfg, out, generate_fn=answer, write=run.write_json)
    assert metrics["mgsm_accuracy"] == {"es": 1.0} and metrics["alpaca_off_target"] == {"es": 0.0}
    base = "gs://bucket/runs/r1/iter_1/check/evaluation"
    assert json.loads(fake_gcs.cat(f"{base}/metrics.json")) == metrics
    assert json.loads(fake_gcs.cat(f"{base}/mgsm/es.json"))["accuracy"] == 1.0
    assert json.loads(fake_gcs.cat(f"{base}/alpaca/es/model_outputs.json"))[0]["output"] == "La respuesta es 5."
    assert json.loads(fake_gcs.cat(f"{base}/alpaca/es/reference_outputs.json"))[0]["output"] == "Hola."
    assert (
        f"--model_outputs {base}/alpaca/es/model_outputs.json"
        in fake_gcs.cat(f"{base}/alpaca/es/alpaca_eval_command.txt").decode()
    )


def test_generation_partial_file_on_the_object_store(fake_gcs):
    partial = as_path("gs://bucket/run/iter_1/generate/generations.partial.jsonl")
    append_jsonl(partial, [{"chunk": 0, "rows": [{"key": "en/1"}]}])
    assert resumable._read_partial(partial) == [{"chunk": 0, "rows": [{"key": "en/1"}]}]
    fake_gcs.pipe(str(partial), fake_gcs.cat(str(partial)) + b'{"chunk": 1, "ro')  # a torn last line
    assert [c["chunk"] for c in resumable._read_partial(partial)] == [0]
    assert resumable._read_partial(partial.with_name("absent.jsonl")) == []


def test_reference_logprobs_on_the_object_store(fake_gcs):
    enc = type("Enc", (), {"fingerprint": lambda self: "abc", "__len__": lambda self: 2})()
    ref = {"chosen": np.array([-1.0, -2.0]), "rejected": np.array([-3.0, -4.5])}
    trainer.save_reference("gs://bucket/run/iter_1/reference/reference_logprobs.npz", ref, enc)
    back = trainer.load_reference("gs://bucket/run/iter_1/reference/reference_logprobs.npz", enc)
    assert back["chosen"].tolist() == [-1.0, -2.0] and back["rejected"].tolist() == [-3.0, -4.5]


def test_endpoint_answers_cached_on_the_object_store(fake_gcs, monkeypatch):
    client = ChatClient(EndpointConfig(url="http://127.0.0.1:9/v1", model="m"), "gs://bucket/run/translate/cache")
    monkeypatch.setattr(client, "_post", lambda body: "hola")
    assert client.complete([{"role": "user", "content": "hi"}]) == "hola"
    monkeypatch.setattr(client, "_post", lambda body: pytest.fail("asked again although cached"))
    assert client.complete([{"role": "user", "content": "hi"}]) == "hola"
    assert [f.parent.name for f in files_under("gs://bucket/run/translate/cache")] == ["cache"]


def test_metrics_on_the_object_store(fake_gcs):
    with MetricsSink(MetricsConfig(), jsonl_path="gs://bucket/run/m.jsonl", tensorboard_dir="gs://bucket/run/tb") as s:
        s.log({"loss": 0.5}, step=1)
        # readable at once: each flush uploads the event file again
        assert read_tensorboard_scalars("gs://bucket/run/tb") == {"loss": [(1, 0.5)]}
        s.log({"loss": 0.25}, step=2)
    assert read_tensorboard_scalars("gs://bucket/run/tb") == {"loss": [(1, 0.5), (2, 0.25)]}
    assert read_jsonl("gs://bucket/run/m.jsonl") == [{"loss": 0.5, "step": 1}, {"loss": 0.25, "step": 2}]


def test_stage_numbers_reach_tensorboard_on_the_object_store(fake_gcs):
    run = RunDir("gs://bucket/run", config={"a": 1}, metrics=MetricsConfig())
    run.mark_done(1, "translate", {"stats": {"failed": {"en->es": 2}}})
    run.close()
    assert read_tensorboard_scalars("gs://bucket/run/tensorboard/stages") == {
        "translate/stats/failed/en->es": [(1, 2.0)]
    }


def test_checkpoints_get_the_uri_unchanged(tmp_path, monkeypatch):
    seen = []

    class Manager:
        def __init__(self, directory, options):
            seen.append(directory)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    remote = checkpoint.TrainCheckpointer("gs://bucket/run/iter_1/train/checkpoints", every=1)
    local = checkpoint.TrainCheckpointer(Path("rel") / "checkpoints", every=1)
    assert isinstance(seen[0], epath.Path) and str(seen[0]) == "gs://bucket/run/iter_1/train/checkpoints"
    assert remote.directory == seen[0]
    assert isinstance(seen[1], Path) and seen[1] == Path.cwd() / "rel" / "checkpoints"  # Orbax wants absolute
    assert local.directory == seen[1]


def test_params_checkpoint_through_a_local_epath(tmp_path):
    """A local epath.Path (what Orbax and etils hand around) is a local path: saved and read as before."""
    from test_checkpoint import tiny_config

    cfg = tiny_config()
    out = checkpoint.save_params(epath.Path(tmp_path) / "policy", {"w": np.ones((2, 3), np.float32)}, cfg)
    assert isinstance(out, Path) and out == tmp_path / "policy" and (out / "model_config").exists()
    assert checkpoint.load_params_config(epath.Path(tmp_path) / "policy") == cfg


def test_distributed_env_parsing():
    assert distributed_args({}) is None
    assert distributed_args({"LIDR_DISTRIBUTED": "1"}) == {}
    assert distributed_args({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {}
    assert distributed_args({"TPU_WORKER_HOSTNAMES": "h0"}) is None  # one host: one process
    lidr = {"LIDR_COORDINATOR": "10.0.0.1:1234", "LIDR_NUM_PROCESSES": "4", "LIDR_PROCESS_ID": "3"}
    assert distributed_args(lidr) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed_args(jax_env) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 2, "process_id": 0}
    # the address alone: JAX takes the process count and id from the cluster it detects (SLURM, Open MPI, ...)
    assert distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476"}) == {"coordinator_address": "10.0.0.2:8476"}
    assert distributed_args({**jax_env, **lidr})["coordinator_address"] == "10.0.0.1:1234"  # ours first
    with pytest.raises(SettingsError, match=r"^JAX_COORDINATOR_ADDRESS is set but \['JAX_PROCESS_ID'\] are not"):
        distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(
        SettingsError, match=r"^LIDR_COORDINATOR is set but \['LIDR_NUM_PROCESSES', 'LIDR_PROCESS_ID'\]"
    ):
        distributed_args({"LIDR_COORDINATOR": "h:1"})
    with pytest.raises(SettingsError, match=r"^JAX_NUM_PROCESSES='two' is not a whole number$"):
        distributed_args({**jax_env, "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(SettingsError, match=r"^JAX_PROCESS_ID=2 is out of range for JAX_NUM_PROCESSES=2 \(process ids"):
        distributed_args({**jax_env, "JAX_PROCESS_ID": "2"})
