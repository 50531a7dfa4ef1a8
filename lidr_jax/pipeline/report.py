"""The run report: `RUN_DIR/report.md` with PNG plots, and the summary table printed at the end.

Everything is read back from the run directory's recorded stage outputs, so the report can be rebuilt
at any time (`python -c "from lidr_jax.pipeline.report import ..."`) and always matches the artifacts.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

from lidr_jax.eval.heldout import measure_table
from lidr_jax.eval.plots import MARKERS, _pyplot, plot_metrics
from lidr_jax.files import AnyPath, as_path, atomic_write_bytes, atomic_write_text, read_jsonl
from lidr_jax.formats.export import refresh_card
from lidr_jax.methods.filters import format_table
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.export_run import card_info
from lidr_jax.pipeline.run_dir import RunDir


def _out(run: RunDir, k: int, stage: str) -> dict:
    return run.outputs(k, stage) if run.is_done(k, stage) else {}


def _translation_failures(cfg: RunConfig, run: RunDir, k: int, lang: str) -> tuple[int, int]:
    """(failed, total) self-translations of iteration k between the dominant language and `lang`."""
    stats = _out(run, k, "translate").get("stats", {})
    directions = (f"{cfg.dominant}->{lang}", f"{lang}->{cfg.dominant}")
    failed = sum(stats.get("failed", {}).get(d, 0) for d in directions)
    return failed, sum(stats.get("total", {}).get(d, 0) for d in directions)


def _held_out_history(cfg: RunConfig, run: RunDir) -> list[dict]:
    """[{metric: {lang: value}}] for iteration 0 (before) .. last finished check."""
    history = []
    for k in range(0, cfg.iterations + 1):
        check = _out(run, k, "check")
        if not check:
            break
        entry = {f"held_out/{m}": v for m, v in check.get("held_out", {}).items()}
        entry.update(check.get("evaluation", {}))
        history.append(entry)
    return history


def _metrics_rows(run: RunDir, k: int) -> list[dict]:
    path = _out(run, k, "train").get("metrics")
    if not path or not as_path(path).exists():
        return []
    return read_jsonl(path)


def _save_figure(plt, fig, png: AnyPath, dpi: int) -> AnyPath:
    """Save a figure atomically through lidr_jax.files (a local run or an object store alike)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(png, buffer.getvalue())


TRAINING_PANELS = (  # metrics.jsonl key, title, y axis label
    ("loss", "training loss (DPO + NLL)", "loss"),
    ("rewards/accuracies", "reward accuracy", "share of pairs with chosen > rejected"),
    ("rewards/margins", "reward margin", "chosen - rejected implicit reward"),
    ("nll_loss", "NLL of the chosen answers", "nats per token"),
)


def _plot_training(cfg: RunConfig, run: RunDir, png: AnyPath) -> AnyPath | None:
    """One panel per training measure, one marker style per iteration, x = optimizer step of the iteration.
    A step that held fewer pairs than the iteration's full steps (the last, partial batch) is drawn
    hollow and labelled with its pair count: its value rests on fewer pairs."""
    from matplotlib.ticker import MaxNLocator  # optional dependency (the 'plots' extra), as eval/plots.py

    series = {k: _metrics_rows(run, k) for k in range(1, cfg.iterations + 1)}
    series = {k: rows for k, rows in series.items() if rows}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4.3 * len(TRAINING_PANELS), 3.6))
    partial = False
    for ax, (key, title, ylabel) in zip(axes, TRAINING_PANELS):
        for n, (k, rows) in enumerate(series.items()):
            full = max(r.get("pairs", 0) for r in rows)
            steps = [r["step"] for r in rows]
            values = [r.get(key, math.nan) for r in rows]
            color, marker = f"C{n}", MARKERS[n % len(MARKERS)]
            small = [r.get("pairs", full) < full for r in rows]
            ax.plot(  # the full steps joined; a partial step stands apart (a line to it would read as a trend)
                [s for s, m in zip(steps, small) if not m],
                [v for v, m in zip(values, small) if not m],
                linewidth=1,
                marker=marker,
                color=color,
                label=f"iteration {k}",
            )
            for s, v, r, m in zip(steps, values, rows, small):
                if m:
                    partial = True
                    ax.plot([s], [v], linestyle="none", marker=marker, markerfacecolor="white", color=color)
                    ax.annotate(
                        f"{r['pairs']} pair{'s' if r['pairs'] != 1 else ''}",
                        (s, v),
                        fontsize=7,
                        xytext=(4, 4),
                        textcoords="offset points",
                        color=color,
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step of the iteration", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.1, y=0.15)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
    if partial:
        fig.text(
            0.5,
            0.01,
            "hollow markers: steps with fewer pairs than the iteration's other steps (values rest on fewer pairs)",
            ha="center",
            fontsize=8,
            color="dimgray",
        )
    fig.tight_layout(rect=(0, 0.04, 1, 0.9))
    return _save_figure(plt, fig, png, dpi=110)


def _plot_pairs(cfg: RunConfig, run: RunDir, png: AnyPath) -> AnyPath | None:
    """Pairs kept per language and failed self-translations per language, per iteration; every bar is
    labelled with its value, and "n/a" marks what does not apply (the dominant language is not translated)."""
    from matplotlib.ticker import MaxNLocator  # optional dependency (the 'plots' extra), as eval/plots.py

    per_iter = {k: _out(run, k, "pairs").get("stats", {}) for k in range(1, cfg.iterations + 1)}
    per_iter = {k: s for k, s in per_iter.items() if s}
    if not per_iter:
        return None
    translated = any(_out(run, k, "translate") for k in per_iter)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if translated else 1, figsize=(11 if translated else 6, 3.8), squeeze=False)
    axes = axes[0]
    langs = list(cfg.languages)
    width = 0.8 / len(per_iter)
    for n, (k, stats) in enumerate(per_iter.items()):
        xs = [i + (n - (len(per_iter) - 1) / 2) * width for i in range(len(langs))]
        counts = [stats.get("pairs_per_language", {}).get(lang, 0) for lang in langs]
        bars = axes[0].bar(xs, counts, width, label=f"iteration {k}", color=f"C{n}")
        axes[0].bar_label(bars, fontsize=7)
        if not translated:
            continue
        rates, labels = [], []
        for lang in langs:
            f, t = _translation_failures(cfg, run, k, lang)
            rates.append(f / t if t else 0.0)
            labels.append(f"{f}/{t}" if t else "n/a")
        bars = axes[1].bar(xs, rates, width, label=f"iteration {k}", color=f"C{n}")
        axes[1].bar_label(bars, labels, fontsize=7)
    titles = [("preference pairs kept", "pairs")]
    if translated:
        titles.append(("self-translations that failed (both directions)", "share failed (labels: failed/total)"))
    for ax, (title, ylabel) in zip(axes, titles):
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlabel("language", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    if translated:
        axes[1].set_ylim(0, 1.1)
    fig.tight_layout()
    return _save_figure(plt, fig, png, dpi=110)


def summary_rows(cfg: RunConfig, run: RunDir) -> list[list[str]]:
    """One row per language: pairs and translation failures per iteration, held-out in-language rate."""
    history = _held_out_history(cfg, run)
    header = ["lang"]
    for k in range(1, cfg.iterations + 1):
        header += [f"pairs@{k}", f"tr.fail@{k}"]
    header += [f"in-lang@{k}" for k in range(len(history))]
    rows = [header]
    for lang in cfg.languages:
        row = [lang]
        for k in range(1, cfg.iterations + 1):
            pairs = _out(run, k, "pairs").get("stats", {}).get("pairs_per_language", {}).get(lang, 0)
            f, t = _translation_failures(cfg, run, k, lang)
            row += [str(pairs), f"{f}/{t}" if t else "-"]
        for h in history:
            v = h.get("held_out/in_language", {}).get(lang)
            row.append("-" if v is None or v != v else f"{v:.2f}")
        rows.append(row)
    return rows


def pair_table_lines(cfg: RunConfig, run: RunDir) -> list[str]:
    """Per iteration, the pair table of the pairs stage: candidates, kept and dropped by reason per
    language (lidr_jax.methods.filters; for LIDR the dominant language's row counts the English pairs)."""
    lines = []
    for k in range(1, cfg.iterations + 1):
        table = _out(run, k, "pairs").get("stats", {}).get("table")
        if table:
            lines += [f"Iteration {k}:", "", *format_table(table), ""]
    return lines


def _measure_lines(cfg: RunConfig, history: list[dict]) -> list[str]:
    """The held-out measurement with intervals (lidr_jax.eval.heldout), when the checks recorded one."""
    if not any("held_out/in_language_low" in h for h in history):
        return []
    return [
        "",
        "## Held-out measurement",
        "",
        "On the held-out prompts (never trained on, never used to choose settings), per language: the share "
        "of answers in the asked language, its change since k = 0 (paired by prompt), the mean per-token "
        "log-likelihood of fixed reference answers in the asked language (no judge needed; it falls when the "
        "model drifts to another language or to degenerate text), each with its 95% bootstrap interval over "
        "prompts; and the mean answer length in tokens (lidr_jax/eval/heldout.py).",
        "",
        _table_md(measure_table(history, cfg.languages, prefix="held_out/")),
    ]


def _table_md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _sig(value, digits: int = 4) -> str:
    """A number with `digits` significant digits ("-" when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def training_lines(cfg: RunConfig, run: RunDir) -> list[str]:
    """The Training section's table: per iteration, steps and pairs trained, and each measure at the first
    and the last step (4 significant digits)."""
    rows = [["iteration", "steps", "pairs trained", *(f"{title}: first -> last" for _, title, _ in TRAINING_PANELS)]]
    for k in range(1, cfg.iterations + 1):
        stats = _out(run, k, "train").get("stats")
        if not stats:
            continue
        first, last = stats.get("first") or {}, stats.get("last") or {}
        steps = _metrics_rows(run, k)
        trained = sum(r.get("pairs", 0) for r in steps) or None
        row = [str(k), str(steps[-1]["step"]) if steps else "-", "-" if trained is None else str(trained)]
        row += [f"{_sig(first.get(key))} -> {_sig(last.get(key))}" for key, _, _ in TRAINING_PANELS]
        rows.append(row)
    if len(rows) == 1:
        return []
    return [
        "Per iteration: optimizer steps, pairs trained (over all epochs), and each measure of training.png at the "
        "first and the last step (the loss is DPO's plus the weighted NLL of the chosen answers).",
        "",
        _table_md(rows),
        "",
    ]


def refresh_cards(cfg: RunConfig, run: RunDir) -> None:
    """Each iteration's export is written before its held-out check; once the check is done, its model
    card is written again with the check's numbers, so it says what a later `python -m lidr_jax.export`
    of the same checkpoint says."""
    for k in range(1, cfg.iterations + 1):
        hf = _out(run, k, "export").get("hf")
        if hf and run.is_done(k, "check"):
            refresh_card(hf, card_info(run, k))


def write_report(cfg: RunConfig, run: RunDir) -> AnyPath:
    """Write RUN_DIR/report.md and its plots (and refresh the exports' model cards); returns the report's path."""
    refresh_cards(cfg, run)
    plots = []
    for name, fn in (("training.png", _plot_training), ("pairs.png", _plot_pairs)):
        try:
            if fn(cfg, run, run.path / name):
                plots.append(name)
        except ImportError as e:
            print(f"  (no plots: {e})")
            break
    history = _held_out_history(cfg, run)
    if history:
        try:
            with tempfile.TemporaryDirectory() as tmp:  # plot_metrics writes a local file; the run may not be local
                png = plot_metrics(history, Path(tmp) / "evaluation.png")
                atomic_write_bytes(run.path / "evaluation.png", png.read_bytes())
            plots.append("evaluation.png")
        except ImportError:
            pass
    lines = [
        f"# lidr_jax run: {cfg.reward.upper()} on {cfg.model}",
        "",
        f"Run directory `{run.path}`, seed {cfg.seed}, {cfg.iterations} iteration(s), languages "
        f"{', '.join(cfg.languages)} (dominant {cfg.dominant}).",
        "",
        "## Per language",
        "",
        "pairs@k: preference pairs built in iteration k; tr.fail@k: failed self-translations (both directions) "
        "in iteration k; in-lang@k: fraction of held-out prompts answered in the asked language by the model "
        "after iteration k (k = 0: the starting model).",
        "",
        _table_md(summary_rows(cfg, run)),
        *_measure_lines(cfg, history),
        "",
        "## Pairs kept and dropped",
        "",
        "candidates: pairs the method proposed; kept: pairs trained on; the other columns: pairs dropped, by "
        "reason (translation_failed: a needed translation failed; language: the chosen answer is not in the "
        "pair's language; empty, identical, length_cut, repetition, no_pair, upper_bound: "
        "lidr_jax/methods/filters.py).",
        "",
        *pair_table_lines(cfg, run),
        "## Training",
        "",
    ]
    lines += training_lines(cfg, run)
    for k in range(1, cfg.iterations + 1):
        disk = _out(run, k, "export").get("disk")
        if disk:
            lines.append(
                f"- iteration {k} disk: {disk['iteration_bytes'] / 1e9:.2f} GB in iter_{k}/ after the export "
                f"(training checkpoints deleted: {disk['deleted_checkpoint_bytes'] / 1e9:.2f} GB)"
            )
    evaluated = sorted({m for h in history for m in h if not m.startswith("held_out/")})
    if evaluated:
        lines += ["", "## Evaluation (k = 0: the starting model)", ""]
        rows = [["metric", "lang"] + [f"k={k}" for k in range(len(history))]]
        for metric in evaluated:
            for lang in sorted({lang for h in history for lang in h.get(metric, {})}):
                vals = [h.get(metric, {}).get(lang) for h in history]
                rows.append([metric, lang] + ["-" if v is None else f"{v:.3f}" for v in vals])
        lines.append(_table_md(rows))
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return atomic_write_text(run.path / "report.md", "\n".join(lines) + "\n")


def print_summary(cfg: RunConfig, run: RunDir) -> None:
    rows = summary_rows(cfg, run)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for n, r in enumerate(rows):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    tables = pair_table_lines(cfg, run)
    if tables:
        print("\npairs kept and dropped, by language and reason:")
        print("\n".join(tables).rstrip())
