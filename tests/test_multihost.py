"""Multi-host pipeline: two processes on localhost leave the run directory one process leaves, and a
run directory that is not the writer writes nothing.

The two-process run is `python -m lidr_jax.iterate` twice (LIDR_COORDINATOR / LIDR_NUM_PROCESSES /
LIDR_PROCESS_ID on localhost, one CPU device each, gloo collectives); the one-process run is the same
command alone. Every process runs under tests/audit_writes.py, which lists the run-directory paths it
wrote. Child processes inherit this process's CPU affinity (run pytest under `taskset` to pin them).
Tolerances (float32): training metrics 1e-5 (one device against a 2-device fsdp mesh); summed
reference log-probs 1e-4, as in tests/test_sharding.py; generated texts identical.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO_ROOT
from test_iterate import base_args, prompt_dir, scripted_model_dir  # noqa: F401 (fixtures)

from lidr_jax.pipeline.run_dir import Processes, RunDir

# Smaller than test_iterate's run. Batch size 1 makes chunks of 4 jobs, so generation and translation
# have 2 chunks each and both processes generate; the check then reuses the generation executables.
FAST = [
    "generation.batch_size=1",
    "lidr.translation.batch_size=1",
    "check.sampling.batch_size=1",
    "dpo.epochs=1",
    "dpo.grad_accum=1",  # 4 pairs pass the filters: two steps of 2
    "checkpoint_every=2",
]
TEXTS = (
    "generate/generations.jsonl",
    "translate/raw_translations.jsonl",
    "translate/translations.jsonl",
    "pairs/pairs.jsonl",
    "pairs/stats.json",
    "check/held_out.jsonl",
)
TIMINGS = ("step_time_s", "tokens_per_s", "pairs_per_s")
ORBAX = ("train/checkpoints", "train/policy")  # written by every process together (Orbax coordinates)
AUDIT = Path(__file__).resolve().parent / "audit_writes.py"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIDR_", "XLA_FLAGS"))}
    # Unoptimised XLA CPU code compiles ~3x faster; both runs use the same flags.
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return {**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iterate(args: list[str], processes: int, run: Path) -> list[tuple[int, str, str]]:
    """Run the CLI as `processes` cooperating processes; (returncode, stdout, stderr) of each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    envs = [
        _env()
        if processes == 1
        else _env(LIDR_COORDINATOR=coordinator, LIDR_NUM_PROCESSES=str(processes), LIDR_PROCESS_ID=str(i))
        for i in range(processes)
    ]
    command = [sys.executable, str(AUDIT), str(run), "lidr_jax.iterate", "--run-dir", str(run), *args]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for env in envs
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _writes(stdout: str) -> list[str]:
    """What tests/audit_writes.py saw the process write under the run directory, Orbax's parts aside."""
    line = next(line for line in stdout.splitlines() if line.startswith("WRITES "))
    return [p for p in json.loads(line[len("WRITES ") :]) if not any(part in p for part in ORBAX)]


def _files(run: Path) -> set[str]:
    """Every file of a run, relative; Orbax's directories and TensorBoard's host-named files by folder."""
    out = set()
    for f in run.rglob("*"):
        rel = f.relative_to(run).as_posix()
        if f.is_file() and not any(part in rel for part in ORBAX):
            out.add(str(Path(rel).parent / "<events>") if ".tfevents." in rel else rel)
    return out


def _assert_close(a, b, tol: float, where: str = "") -> None:
    """JSON values equal, numbers within `tol` (absolute and relative)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _metrics(run: Path) -> list[dict]:
    rows = (run / "iter_1" / "train" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMINGS} for r in rows]


def _stages(run: Path) -> dict:
    """Every stage's recorded outputs, but the export's disk use: TensorBoard names its event files by
    host and process, and Orbax's metadata differs by process count, so those byte counts differ."""
    iterations = json.loads((run / "manifest.json").read_text())["iterations"]
    return {
        k: {s: {o: v for o, v in e["outputs"].items() if (s, o) != ("export", "disk")} for s, e in it["stages"].items()}
        | {"start": it["start_model"]}
        for k, it in iterations.items()
    }


def test_two_processes_match_one_process(scripted_model_dir, prompt_dir, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    args = base_args(scripted_model_dir, prompt_dir, tmp_path)[2:]  # without its --run-dir
    args += [a for s in FAST for a in ("--set", s)]
    ((rc, _, err),) = _iterate(args, 1, one)
    assert rc == 0, err[-3000:]
    runs = _iterate(args, 2, two)
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    assert "pairs@1" in runs[0][1] and "pairs@1" not in runs[1][1]  # the summary table: the writer's
    assert "manifest.json" in _writes(runs[0][1]) and _writes(runs[1][1]) == []  # one writer

    assert _files(two) == _files(one)  # one copy of every file; no temporary or partial files left
    assert not [f for f in _files(two) if ".tmp" in f or ".partial." in f]
    for k, rel in [(1, r) for r in TEXTS] + [(0, "check/held_out.jsonl")]:
        a, b = one / f"iter_{k}" / rel, two / f"iter_{k}" / rel
        assert a.read_text() == b.read_text(), rel
    _assert_close(_metrics(two), _metrics(one), 1e-5, "metrics")
    assert len(_metrics(one)) >= 2
    with (
        np.load(one / "iter_1" / "reference" / "reference_logprobs.npz") as x,
        np.load(two / "iter_1" / "reference" / "reference_logprobs.npz") as y,
    ):
        np.testing.assert_allclose(x["chosen"], y["chosen"], atol=1e-4)
        np.testing.assert_allclose(x["rejected"], y["rejected"], atol=1e-4)
        assert str(x["fingerprint"]) == str(y["fingerprint"])
    _assert_close(_stages(two), _stages(one), 1e-5, "manifest")


OUT_OF_STEP = """
import sys
import jax
from lidr_jax.parallel import multihost
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
print("min", multihost.agree_min(10 + jax.process_index()), flush=True)
try:
    if jax.process_index() == 1:
        multihost.broadcast("one more")  # a path process 0 does not take
    multihost.broadcast("next")
except multihost.OutOfStepError as e:
    print("ERROR", e, flush=True)
"""


def test_processes_out_of_step_fail_at_the_next_collective():
    """A process that takes a broadcast the other does not is caught there, on both sides, with where each
    process is (not paired with the wrong call); `agree_min` gives every process the least host figure."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OUT_OF_STEP, coordinator, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outs:
        assert "min 10\n" in out
        assert (
            "ERROR the processes are out of step: process 0 at <string>:10 <module>; process 1 at <string>:9 "
            "<module>; one process took a path the others did not\n"
        ) in out


def test_non_writer_run_dir_writes_nothing(tmp_path):
    """A process that is not the writer keeps the manifest in memory, records the writer's outputs
    (`broadcast`) and waits at every stage boundary, but never touches the disk."""
    barriers = []
    writer_outputs = {"rows": 3, "path": "./iter_1/generate/out.jsonl"}
    processes = Processes(writer=False, barrier=barriers.append, broadcast=lambda obj: writer_outputs)
    run = RunDir(tmp_path / "run", {"model": "m"}, seed=1, processes=processes)
    d = run.stage_dir(1, "generate")
    run.set_iteration_start_model(1, "m")
    assert run.write_json(d / "a.json", {"x": 1}) == d / "a.json"
    run.write_jsonl(d / "b.jsonl", [{"x": 1}])
    run.write_text(d / "c.txt", "c")
    run.append_jsonl(d / "d.partial.jsonl", [{"chunk": 0}])
    assert run.on_writer(lambda: 1 / 0) is None  # not even called
    assert run.from_writer(lambda: 1 / 0) == writer_outputs  # the writer's value
    run.mark_done(1, "generate", {"rows": 2, "path": d / "out.jsonl"})
    assert list(tmp_path.iterdir()) == []
    assert run.is_done(1, "generate") and run.outputs(1, "generate")["rows"] == 3
    assert run.outputs(1, "generate")["path"] == str(run.path / "iter_1/generate/out.jsonl")
    assert barriers == ["run directory read", "iteration 1 generate done"]
    assert run.iteration_start_model(1) == "m"


def test_writer_run_dir_records_what_json_gives_back(tmp_path):
    """Outputs are kept as the manifest holds them, so a fresh and a resumed run see the same values."""
    run = RunDir(tmp_path / "run", {"model": "m"}, seed=1)
    run.mark_done(1, "pairs", {"counts": (1, 2), "per_lang": {"es": 1}})
    assert (
        run.outputs(1, "pairs")
        == RunDir(tmp_path / "run").outputs(1, "pairs")
        == {"counts": [1, 2], "per_lang": {"es": 1}}
    )
