"""The run directory: where every stage's artifacts live, and the manifest that says what is done.

Layout (docs/run_directory.md has the full picture):

    RUN_DIR/
      manifest.json            config, seed, per-iteration start model, finished stages and outputs
      iter_K/<stage>/...       everything stage <stage> of iteration K wrote

Every file a stage writes goes through lidr_jax.files' atomic writers (temp file in the same
directory, fsync, `os.replace`), so a process killed mid-write leaves either the old file or the new
one, never half of one. A stage counts as done only once `RunDir.mark_done` has recorded it in the
manifest (itself written atomically), so rerunning the same command resumes at the first stage that
is not marked done. `missing_outputs` finds a done stage's recorded files that are gone (`forget`
then lets it run again); `redo` forgets stages and deletes their directories (iterate's `--redo`).
Opening a run for writing checks first that the directory can be written and that its manifest is one
(`RunDirError` otherwise, naming the path and the fix); `ignore` names config keys not compared on
resume (`run_dir`: a moved run is the same run).

Where Orbax writes, a run can live: `RunDir("gs://bucket/runs/mine")` keeps every path as an
`etils.epath.Path` (lidr_jax.files.as_path; a local path stays a `pathlib.Path`), so stages write the
bucket through the same calls (docs/run_directory.md).

Each stage's numbers go to the run's metrics sink when it is marked done (`metrics`, a
lidr_jax.train.metrics.MetricsConfig: TensorBoard under `RUN_DIR/tensorboard/stages`, W&B when asked
for): every number of the outputs the stage returned, tagged `<stage>/<key>/...`, at step K.

One writer: a `RunDir` keeps the manifest in memory and rewrites it whole, so use one instance per
run for writing (other instances may read). Several processes share one run through `Processes`
(lidr_jax.parallel.multihost.Processes, `run_processes`): only the writer (process 0) writes, stages
write through `RunDir.write_*` / `on_writer`, which do nothing on the other processes, and read back
what the writer alone wrote through `from_writer`. Every process keeps the same in-memory manifest (`mark_done`
records the writer's outputs everywhere) and `mark_done` is a barrier, so a stage's files exist
before any process goes on to the next stage.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lidr_jax.files import (
    AnyPath,
    absolute_path,
    append_jsonl,
    as_path,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    is_local,
    plain,
    remove_tree,
)
from lidr_jax.parallel.multihost import Processes
from lidr_jax.train.metrics import MetricsConfig, MetricsSink

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LONE_PROCESS = Processes()  # one process: it writes, and nobody to wait for


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message names the path, the cause and the fix."""


class RunConfigMismatchError(RunDirError):
    """The run directory was created with a different configuration than the one given now."""


class NotARunDirError(RunDirError, FileNotFoundError):
    """The directory has no manifest, so it is not a run directory (opening one to read it)."""


class StageNotDoneError(LookupError):
    """A stage's outputs were asked for before the stage was marked done."""


# ------------------------------------------------------------------------------------------ config


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ, as readable lines (`key: old -> new`, missing shown as <absent>)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(
                f"{key}: {json.dumps(va) if va != '<absent>' else va} -> {json.dumps(vb) if vb != '<absent>' else vb}"
            )
    return lines


# --------------------------------------------------------------------------------------------- run


class RunDir:
    """A run directory and its manifest.

    `RunDir(path)` opens an existing run (read-only use, e.g. export). `RunDir(path, config, seed=...)`
    creates the run if it has no manifest yet, or resumes it; resuming with a config or seed that
    differs from the recorded one raises `RunConfigMismatchError` naming every differing key, unless
    `allow_config_change=True`, which adopts the new config and records the change in the manifest;
    top-level keys in `ignore` are not compared. `processes` (default: one process) says whether this
    process is the writer (module docstring). A damaged manifest, or (when writing) a path that is a
    file or cannot be written, raises `RunDirError` before anything is written. `metrics` (None: none)
    says where each finished stage's numbers go (module docstring). `path` may be a local path or a
    URI that etils.epath writes (gs://bucket/run).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Any = None,
        *,
        seed: int | None = None,
        allow_config_change: bool = False,
        processes: Processes = LONE_PROCESS,
        ignore: Sequence[str] = (),
        metrics: MetricsConfig | None = None,
    ):
        if not os.fspath(path).strip():
            raise RunDirError(
                "the run directory path is empty (run_dir: '' or --run-dir=), which would write the run into the "
                "current folder; give a folder, e.g. --run-dir runs/mine"
            )
        self.path = absolute_path(path)  # stage paths stay valid if the caller changes directory
        self.manifest_path = self.path / MANIFEST
        self.processes = processes
        self.ignore = tuple(ignore)
        self.metrics = metrics
        self._sink: MetricsSink | None = None
        self.created = False  # whether this instance wrote the manifest first (`discard_unused`)
        self._made_folder = not self.path.exists()
        if config is not None and processes.writer:
            _check_writable(self.path)
            if not self.manifest_path.exists():
                _check_not_foreign(self.path)
        existing = _read_manifest(self.manifest_path) if self.manifest_path.exists() else None
        processes.barrier("run directory read")  # every process has read it before the writer changes it
        if existing is not None:
            self._manifest = existing
            if config is not None or seed is not None:
                self._check_resume(config, seed, allow_config_change)
        elif config is not None:
            self._manifest = {
                "version": MANIFEST_VERSION,
                "created": _now(),
                "config": plain(config),
                "seed": seed,
                "iterations": {},
                "config_changes": [],
            }
            self._write()
            self.created = True
        else:
            raise NotARunDirError(
                f"{self.manifest_path} does not exist: {self.path} is not a lidr_jax run directory "
                "(one is created by `python -m lidr_jax.iterate`; pass a config to create one)"
            )

    # -- manifest ---------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A copy of the manifest as last written."""
        return json.loads(json.dumps(self._manifest))

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def seed(self) -> int | None:
        return self._manifest.get("seed")

    def _write(self) -> None:
        self._manifest["updated"] = _now()
        self.write_json(self.manifest_path, self._manifest)

    # -- writing (the writer process only) --------------------------------------------------------

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (module docstring)."""
        return self.processes.writer

    def on_writer(self, fn: Callable, *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` on the writer (its result); None on the other processes."""
        return fn(*args, **kwargs) if self.writer else None

    def from_writer(self, fn: Callable, *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` on the writer, its JSON result handed to every process: for reading
        what only the writer is sure to see complete (a file it is still appending to)."""
        return self.processes.broadcast(self.on_writer(fn, *args, **kwargs))

    def write_json(self, path: str | os.PathLike, obj: Any) -> AnyPath:
        self.on_writer(atomic_write_json, path, obj)
        return as_path(path)

    def write_jsonl(self, path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> AnyPath:
        self.on_writer(atomic_write_jsonl, path, rows)
        return as_path(path)

    def write_text(self, path: str | os.PathLike, text: str) -> AnyPath:
        self.on_writer(atomic_write_text, path, text)
        return as_path(path)

    def append_jsonl(self, path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows to `path` and fsync (not atomic: a reader must drop a last line cut by a kill)."""
        self.on_writer(append_jsonl, path, rows)

    def log_stage(self, k: int, stage: str, outputs: Mapping[str, Any]) -> None:
        """Every number in a finished stage's `outputs` (pairs kept and dropped per language, translation
        failures per direction, in-language shares, ...) to the run's metrics sink, tagged
        `<stage>/...` at step `k`; nothing without `metrics` or on a process that does not write."""
        if self.metrics is None or not self.writer:
            return
        if self._sink is None:
            self._sink = MetricsSink(
                self.metrics,
                tensorboard_dir=self.path / "tensorboard" / "stages",
                run_name=str(self.path),
                run_config=self._manifest["config"],
                wandb_prefix="stages",  # W&B: against the iteration, beside the training sinks' own steps
            )
        self._sink.log(dict(outputs), step=k, prefix=stage)

    def close(self) -> None:
        """Close the run's metrics sink (it is reopened by the next `log_stage`)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def discard_unused(self) -> bool:
        """Undo the creation of a run that did nothing: when this instance created the run and no stage is
        done, delete what it wrote (the folder too if it made it), so that the corrected command starts
        afresh instead of being refused as a configuration change. True when something was deleted."""
        if not self.created or not self.writer or any(self._iteration(k)["stages"] for k in self.iterations()):
            return False
        self.close()
        if self._made_folder:
            remove_tree(self.path)
        else:  # the folder was empty before this run: everything in it is the run's
            for entry in self.path.iterdir():
                if entry.is_dir():
                    remove_tree(entry)
                else:
                    entry.unlink()
        self.created = False
        return True

    def _check_resume(self, config: Any, seed: int | None, allow_change: bool) -> None:
        diffs = []
        if config is not None:
            diffs += config_differences(self._compared(self._manifest["config"]), self._compared(config))
        if seed is not None and seed != self._manifest.get("seed"):
            diffs.append(f"seed: {self._manifest.get('seed')} -> {seed}")
        if not diffs:
            return
        if not allow_change:
            raise RunConfigMismatchError(
                f"{self.path} was created with a different configuration; differing keys:\n  "
                + "\n  ".join(diffs)
                + "\nResuming would mix artifacts of two configurations. Use a new run directory (--run-dir), or "
                "rerun with --allow-config-change (Python: allow_config_change=True) to go on with the new values "
                "(stages already done are kept)."
            )
        self._manifest["config_changes"].append({"at": _now(), "changes": diffs})
        if config is not None:
            self._manifest["config"] = plain(config)
        if seed is not None:
            self._manifest["seed"] = seed
        self._write()

    def _compared(self, config: Any) -> dict:
        """The config as compared on resume: without the keys in `ignore` (where the run lives)."""
        return {key: v for key, v in plain(config).items() if key not in self.ignore}

    def _iteration(self, k: int, create: bool = False) -> dict:
        iterations = self._manifest["iterations"]
        key = str(_check_k(k))
        if key not in iterations and create:
            iterations[key] = {"start_model": None, "stages": {}}
        return iterations.get(key, {"start_model": None, "stages": {}})

    # -- layout -----------------------------------------------------------------------------------

    def iter_dir(self, k: int) -> AnyPath:
        return self.path / f"iter_{_check_k(k)}"

    def stage_dir(self, k: int, name: str, *, create: bool = True) -> AnyPath:
        """`RUN_DIR/iter_K/<name>/` (created by the writer unless `create=False`)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"stage name {name!r} must be a plain directory name")
        d = self.iter_dir(k) / name
        if create:
            self.on_writer(d.mkdir, parents=True, exist_ok=True)
        return d

    # -- iterations and stages ----------------------------------------------------------------------

    def set_iteration_start_model(self, k: int, model: str) -> None:
        """Record the model iteration `k` starts from (a path, a .gguf, or an embedded name).

        Paths inside the run directory are stored relative to it, so a moved run still resolves.
        """
        self._iteration(k, create=True)["start_model"] = self._rel(model)
        self._write()

    def iteration_start_model(self, k: int) -> str | None:
        """The model iteration `k` started from (absolute path if inside the run), or None if unrecorded."""
        model = self._iteration(k)["start_model"]
        return None if model is None else self._abs(model)

    def iterations(self) -> list[int]:
        return sorted(int(k) for k in self._manifest["iterations"])

    def is_done(self, k: int, stage: str) -> bool:
        return stage in self._iteration(k)["stages"]

    def mark_done(self, k: int, stage: str, outputs: Mapping[str, Any] | None = None) -> None:
        """Record that `stage` of iteration `k` finished, with its outputs (paths inside the run are
        stored relative to it; other JSON values as they are, kept as JSON gives them back). Call it
        only after every output file is in place: the manifest entry is what makes the stage count as
        done. Every process calls it; each records the writer's outputs, then waits for the others."""
        outputs = {key: self._rel_value(v) for key, v in (outputs or {}).items()}
        outputs = self.processes.broadcast(json.loads(json.dumps(outputs, ensure_ascii=False)))
        self._iteration(k, create=True)["stages"][stage] = {"done_at": _now(), "outputs": outputs}
        self._write()
        self.log_stage(k, stage, outputs)
        self.processes.barrier(f"iteration {k} {stage} done")

    def missing_outputs(self, k: int, stage: str) -> list[str]:
        """The recorded output paths of a finished stage that no longer exist (inside the run only)."""
        stages = self._iteration(k)["stages"]
        values = stages[stage]["outputs"].values() if stage in stages else ()
        paths = [self._abs(v) for v in values if isinstance(v, str) and v.startswith("./")]
        return [p for p in paths if not as_path(p).exists()]

    def forget(self, k: int, stage: str) -> None:
        """Count `stage` of iteration `k` as not done (its files stay; the stage rewrites them)."""
        self._iteration(k)["stages"].pop(stage, None)
        self._write()

    def redo(self, stages: Sequence[tuple[int, str]]) -> None:
        """Forget every (iteration, stage) of `stages` and delete its directory (and a training stage's
        TensorBoard events), so the next run does it again from the start; the manifest records what was
        redone under "redone". Every process calls it."""
        for k, name in stages:
            self.on_writer(remove_tree, self.stage_dir(k, name, create=False))
            if name == "train":
                self.on_writer(remove_tree, self.path / "tensorboard" / f"iter_{k}")
            self._iteration(k)["stages"].pop(name, None)
        self._manifest.setdefault("redone", []).append({"at": _now(), "stages": [f"iter_{k}/{n}" for k, n in stages]})
        self._write()
        self.processes.barrier("redo")

    def outputs(self, k: int, stage: str) -> dict[str, Any]:
        """The outputs a finished stage recorded (paths made absolute)."""
        stages = self._iteration(k)["stages"]
        if stage not in stages:
            raise StageNotDoneError(
                f"stage {stage!r} of iteration {k} is not done in {self.path} "
                f"(done: {sorted(stages) or 'none'}); run the iteration to complete it first"
            )
        return {key: self._abs_value(v) for key, v in stages[stage]["outputs"].items()}

    def done_stages(self, k: int) -> list[str]:
        return list(self._iteration(k)["stages"])

    def last_iteration_with(self, stage: str) -> int | None:
        """The highest iteration whose `stage` is done (None if none)."""
        done = [k for k in self.iterations() if self.is_done(k, stage)]
        return max(done) if done else None

    # -- path helpers -------------------------------------------------------------------------------

    def _rel(self, value: str | os.PathLike) -> str:
        # A Path is a path; a str is a path only if absolute (a relative str may be a hub name).
        if not is_local(value) or not isinstance(self.path, Path):  # a URI: inside the run if under its root
            root, text = str(self.path).rstrip("/") + "/", os.fspath(value)
            return "./" + text[len(root) :] if text.startswith(root) else text
        p = Path(value).absolute() if isinstance(value, os.PathLike) else Path(value)
        if p.is_absolute():
            try:
                return "./" + p.resolve().relative_to(self.path.resolve()).as_posix()
            except ValueError:
                return str(p)
        return str(value)

    def _abs(self, value: str) -> str:
        # Only values we stored as "./..." are run-relative; anything else (a hub name, an embedded
        # model name, an absolute path) is returned unchanged.
        return str(self.path / value[2:]) if value.startswith("./") else value

    def _rel_value(self, v: Any) -> Any:
        path = isinstance(v, os.PathLike) or (isinstance(v, str) and (os.path.isabs(v) or not is_local(v)))
        return self._rel(v) if path else v

    def _abs_value(self, v: Any) -> Any:
        return self._abs(v) if isinstance(v, str) else v


def _read_manifest(path: AnyPath) -> dict:
    """The manifest, checked to be one; a damaged file raises `RunDirError` naming it."""
    fix = (
        "it records which stages are done; restore it from a backup, or start over in a new run directory "
        "(--run-dir), keeping this one for its files"
    )
    if path.is_dir():
        raise RunDirError(f"{path} is a folder, not a run manifest; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunDirError(f"{path}: the run manifest cannot be read ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: the run manifest is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}:{e.lineno}: the run manifest is not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("iterations"), dict) or "config" not in data:
        raise RunDirError(f"{path}: not a lidr_jax run manifest (no config or iterations); {fix}")
    return data


def _check_writable(path: AnyPath) -> None:
    """A run directory must be a directory this process can write (or creatable in one)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory; pass --run-dir a new folder or an earlier run's")
    if not isinstance(path, Path):  # an object store: a real write, as below
        probe = path / ".write-check"
        try:
            probe.write_text("")
            probe.unlink(missing_ok=True)
        except Exception as e:  # each store's client raises its own errors (permission, no bucket)
            raise RunDirError(
                f"{path} cannot be written ({type(e).__name__}: {e}); check the bucket name and your credentials, "
                "or pass --run-dir a folder you can write"
            ) from None
        return
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{path} cannot be created: {existing} is a file; pass --run-dir a path under a folder")
    try:  # a real write: os.access says yes to root and knows nothing of read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
    except OSError as e:
        raise RunDirError(
            f"{existing} is not writable ({e.strerror}), so the run directory {path} cannot be written; "
            f"make it writable (chmod u+w {existing}) or pass --run-dir a folder you can write"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _check_not_foreign(path: AnyPath) -> None:
    """A new run goes into a new or empty folder: a folder that holds anything but no manifest is someone
    else's (a run is recognised by its manifest), and nothing of theirs is overwritten or mixed in."""
    if not path.is_dir():
        return
    ours = (".write-check", f".{MANIFEST}.")  # a write probe, a manifest a kill cut before its rename
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(ours))
    if entries:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise RunDirError(
            f"{path} is not a lidr_jax run (no {MANIFEST}) and is not empty: it holds {entries[0]}{more}; "
            "nothing was written: pass --run-dir a new or empty folder, or an earlier run's"
        )


def _check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"iteration number must be a non-negative int, got {k!r}")
    return k


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
