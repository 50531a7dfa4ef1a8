"""Live training metrics: one sink the trainer calls every step, fanned out to where users look.

- JSONL: one line per step (`metrics.jsonl`), flushed as written; the record the report is built from.
- TensorBoard: scalars written and flushed every step (tensorboardX), so `tensorboard --logdir` shows a
  run while it trains.
- Weights & Biases: only when asked for (`report_to` lists "wandb") and the `wandb` package is
  installed; offline by default (`wandb_mode`), so nothing needs network; `wandb sync` uploads later.

`report_to` is the list TRL and LLaMA-Factory users know: [tensorboard, wandb], [] for JSONL only.
A stage can also log its own numbers once it finishes (`log` with a prefix and a nested dict: pairs
kept per language, translation failures, in-language shares) under the same step axis (the iteration).

Several sinks in one process share one W&B run (the pipeline's per-iteration training sinks and its
stage sink): a sink given `wandb_prefix` logs its tags as `<prefix>/<tag>` against its own x axis
`<prefix>/step`, since W&B's own step must only grow. Paths may be local or URIs (gs://...) that
etils.epath writes (lidr_jax.files.as_path); TensorBoard event files on an object store are rewritten
whole at every flush, as tensorboardX's own GCS writer does.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lidr_jax.files import append_jsonl, as_path, atomic_write_bytes, atomic_write_jsonl, files_under, is_local
from lidr_jax.settings import check_settings, setting

REPORT_TO = ("tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where live metrics go besides metrics.jsonl."""

    report_to: tuple[Literal[REPORT_TO], ...] = setting(
        ("tensorboard",), "any of tensorboard, wandb (W&B only when the wandb package is installed); [] = JSONL only"
    )
    wandb_project: str = setting("lidr_jax", "the W&B project the runs go to")
    wandb_mode: Literal["offline", "online"] = setting(
        "offline", "offline (no network; `wandb sync` uploads later) | online"
    )

    def __post_init__(self):
        value = self.report_to
        object.__setattr__(self, "report_to", (value,) if isinstance(value, str) else tuple(value))
        check_settings(self)


NO_METRICS = MetricsConfig(report_to=())  # JSONL only (or nothing): processes that do not write


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A nested dict of numbers as flat `a/b/c` tags: {"pairs": {"es": 3}} -> {"pairs/es": 3.0}.
    Non-numbers (strings, lists, None) and booleans are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
        elif hasattr(value, "item") and getattr(value, "size", 0) == 1:  # numpy / jax scalars
            out[tag] = float(value.item())
    return out


class MetricsSink:
    """`log(values, step)` to every configured destination; `close()` at the end (or use `with`).

    `jsonl_path`: append one JSON line per call (None: no JSONL). `tensorboard_dir`: event files there
    when "tensorboard" is in `config.report_to`. `run_name` names the W&B run. Opening never fails for
    a missing optional package: the sink says once what it skips and goes on with the others.
    `purge_step`: a resumed run's first step; TensorBoard then hides what an earlier, killed attempt
    logged from that step on (it is logged again). `wandb_prefix`: share the process's W&B run with
    other sinks (module docstring); None: W&B's own step is this sink's step.
    """

    def __init__(
        self,
        config: MetricsConfig = MetricsConfig(),
        *,
        jsonl_path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        purge_step: int | None = None,
        wandb_prefix: str | None = None,
    ):
        self.config = config
        self._jsonl = as_path(jsonl_path) if jsonl_path is not None else None
        self._tb = None
        self._wandb = None
        self._owns_wandb = False
        self._wandb_prefix = wandb_prefix
        if "tensorboard" in config.report_to and tensorboard_dir is not None:
            self._tb = _TensorBoard.open(tensorboard_dir, purge_step)
        if "wandb" in config.report_to:
            try:
                import wandb  # optional dependency: used only when installed and asked for
            except ImportError:
                print("metrics: report_to lists wandb but the wandb package is not installed; skipping W&B")
            else:
                self._open_wandb(wandb, run_name, run_config, tensorboard_dir or jsonl_path)

    def _open_wandb(self, wandb, run_name, run_config, near) -> None:
        """The process's W&B run, started here unless another sink has one open (then shared)."""
        self._wandb = getattr(wandb, "run", None)
        if self._wandb is None:
            # W&B keeps its files on local disk (it syncs them itself): beside ours when ours are local
            local = near is not None and is_local(near)
            if local:
                Path(near).parent.mkdir(parents=True, exist_ok=True)  # W&B warns of a dir that does not exist
            self._wandb = wandb.init(
                project=self.config.wandb_project,
                name=run_name,
                mode=self.config.wandb_mode,
                dir=str(Path(near).parent) if local else None,
                config=dict(run_config or {}),
                # W&B's own lines (sync hints, run pages) only when the command was given --verbose
                settings=wandb.Settings(silent=os.environ.get("LIDR_JAX_VERBOSE") != "1"),
            )
            self._owns_wandb = True
        if self._wandb_prefix is not None:
            self._wandb.define_metric(f"{self._wandb_prefix}/*", step_metric=f"{self._wandb_prefix}/step")

    @property
    def destinations(self) -> list[str]:
        """Where this sink writes: a subset of jsonl, tensorboard, wandb."""
        return [name for name, d in (("jsonl", self._jsonl), ("tensorboard", self._tb), ("wandb", self._wandb)) if d]

    def log(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Write `values` (numbers, possibly nested) at `step`: the JSONL line holds `values` as given
        plus `step`; TensorBoard and W&B get the flat numeric tags (`scalars`). Flushed before returning,
        so a reader sees the step at once and a kill loses nothing written."""
        if self._jsonl is not None:
            append_jsonl(self._jsonl, [{**values, "step": step}])
        tags = {k: v for k, v in scalars(values, prefix).items() if k != "step" and math.isfinite(v)}
        if self._tb is not None:
            self._tb.write(tags, step)
        if self._wandb is not None and self._wandb_prefix is None:
            self._wandb.log(tags, step=step)
        elif self._wandb is not None:
            p = self._wandb_prefix
            self._wandb.log({**{f"{p}/{t}": v for t, v in tags.items()}, f"{p}/step": step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None and self._owns_wandb:
            self._wandb.finish()
        self._wandb = None

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorBoard:
    """Scalars to a TensorBoard event file, written and flushed in the caller's thread. (tensorboardX's
    SummaryWriter queues events for a background thread that flushes every `flush_secs`, so its
    `flush()` does not put the last step on disk.) Only tensorboardX's protobufs and record writer
    are used."""

    def __init__(self, writer, event_pb2, summary_pb2):
        self._writer, self._event_pb2, self._summary_pb2 = writer, event_pb2, summary_pb2

    @classmethod
    def open(cls, logdir: str | os.PathLike, purge_step: int | None) -> _TensorBoard | None:
        try:
            from tensorboardX.event_file_writer import EventsWriter  # optional dependency (TensorBoard files)
            from tensorboardX.proto import event_pb2, summary_pb2  # optional dependency, as above
        except ImportError:
            print("metrics: tensorboardX is not installed; no TensorBoard events (pip install tensorboardX)")
            return None
        logdir = as_path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        if not is_local(logdir):  # tensorboardX opens files by scheme: ours writes any store epath writes
            from tensorboardX import record_writer  # optional dependency, as above

            record_writer.register_writer_factory(os.fspath(logdir).split("://")[0], _RewrittenFile)
        tb = cls(EventsWriter(str(logdir / "events")), event_pb2, summary_pb2)
        if purge_step is not None:  # TensorBoard hides earlier events at steps >= purge_step
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            tb._writer.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=start))
        return tb

    def write(self, tags: Mapping[str, float], step: int) -> None:
        values = [self._summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in tags.items()]
        summary = self._summary_pb2.Summary(value=values)
        self._writer.write_event(self._event_pb2.Event(step=step, wall_time=time.time(), summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _RewrittenFile:
    """An event file on an object store, for tensorboardX's record writer: objects cannot be appended
    to, so every flush uploads the whole file again (through lidr_jax.files, so through epath). Also
    its factory: `open(path)` and `directory_check(path)`, as tensorboardX's registry calls them."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    @classmethod
    def open(cls, path: str) -> _RewrittenFile:
        return cls(path)

    @staticmethod
    def directory_check(path: str) -> None:  # objects need no directory made first
        return None

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        atomic_write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the metric lines of steps <= `step` (a resumed run logs the later ones again) and drop a
    last line cut by a kill; returns the number of lines kept. A damaged line that is not the last
    raises ValueError naming the file and line."""
    path = as_path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not JSON, and not a last line cut by a kill; fix or delete it") from None
    kept = [row for row in rows if row.get("step", 0) <= step]
    atomic_write_jsonl(path, kept)
    return len(kept)


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar event under `logdir`, read with tensorboardX's
    protobufs from the TFRecord framing (length: 8 bytes, its CRC: 4, payload, payload CRC: 4)."""
    try:
        from tensorboardX.proto import event_pb2  # optional dependency, as for writing
    except ImportError:
        print("metrics: tensorboardX is not installed; cannot read event files", file=sys.stderr)
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for path in [f for f in files_under(logdir) if f.name.startswith("events.out.tfevents.")]:
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
