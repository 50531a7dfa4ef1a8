"""Plots for the per-iteration report.

`plot_metrics(history, out_png)`: every evaluation measure per language across checkpoints, one panel
per measure, one marker style per language. `history[k]` is what the run recorded for checkpoint k
(k = 0: the starting model): {metric: {lang: value}}, where `metric_low` / `metric_high` (when present)
are the bounds of its 95% interval, drawn as error bars. Panels have titles in words and labelled axes;
languages whose values coincide stay visible (each is shifted a little sideways and has its own marker).
matplotlib is an optional dependency (`pip install lidr_jax[plots]`); it is imported only here, with the
Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# metric (without a "held_out/" prefix) -> (title, y axis label); others are titled by their key in words
MEASURES = {
    "in_language": ("in-language share of answers", "share answered in the asked language"),
    "change": ("in-language share: change since the start", "change (paired by prompt)"),
    "ref_loglik": ("log-likelihood of reference answers", "mean log-probability per token (nats)"),
    "mean_tokens": ("answer length", "mean tokens per answer"),
    "mgsm_accuracy": ("MGSM accuracy", "share of problems solved"),
    "mgsm_off_target": ("MGSM answers in another language", "share of answers"),
    "alpaca_off_target": ("X-AlpacaEval answers in another language", "share of answers"),
    "alpaca_truncated": ("X-AlpacaEval answers cut at the token limit", "share of answers"),
}
SHARES = ("in_language", "mgsm_accuracy", "mgsm_off_target", "alpaca_off_target", "alpaca_truncated")  # 0..1 axes
NOT_PLOTTED = ("n", "mean_chars", "mgsm_prompt_too_long")  # counts (in the report's table), a second length measure


def _pyplot():
    try:
        import matplotlib  # optional dependency (the 'plots' extra): imported only when plotting
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, which is an optional dependency: pip install 'lidr_jax[plots]' "
            "(or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first

    return plt


def checkpoint_label(k: int) -> str:
    return "start" if k == 0 else f"iter {k}"


def _words(metric: str) -> tuple[str, str]:
    prefix, _, name = metric.rpartition("/")
    title, ylabel = MEASURES.get(name, (name.replace("_", " "), "value"))
    if prefix == "held_out":
        title += "\n(held-out prompts)"
    return title, ylabel


def plot_metrics(history: Sequence[Mapping[str, Mapping[str, float]]], out_png: str | Path) -> Path:
    """Plot each measure per language across checkpoints (x = position in `history`) into `out_png`.

    A measure or language missing from a checkpoint is left out there, not drawn as zero; the x axis
    spans only the checkpoints that have a value. Returns the path.
    """
    if not history:
        raise ValueError("plot_metrics: history is empty; pass one {metric: {lang: value}} dict per checkpoint")
    names = {m for h in history for m in h if not m.endswith(("_low", "_high"))}
    order = list(MEASURES)  # the measures in their reading order, then any others by name
    metrics = sorted(
        (m for m in names if m.rpartition("/")[2] not in NOT_PLOTTED),
        key=lambda m: (
            m.rpartition("/")[0],
            order.index(m.rpartition("/")[2]) if m.rpartition("/")[2] in order else len(order),
            m,
        ),
    )
    if not metrics:
        raise ValueError("plot_metrics: no metrics in history")
    plt = _pyplot()
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.9 * rows), squeeze=False)
    langs = list(dict.fromkeys(lang for h in history for m in metrics for lang in h.get(m, {})))  # as recorded
    step = 0.08 if len(langs) > 1 else 0.0
    intervals = False
    for ax, metric in zip(axes.flat, metrics):
        present = []
        for n, lang in enumerate(langs):
            points = [
                (k, h[metric][lang], h.get(f"{metric}_low", {}).get(lang), h.get(f"{metric}_high", {}).get(lang))
                for k, h in enumerate(history)
                if h.get(metric, {}).get(lang) is not None and not math.isnan(float(h[metric][lang]))
            ]
            if not points:
                continue
            present += [k for k, *_ in points]
            xs = [k + (n - (len(langs) - 1) / 2) * step for k, *_ in points]
            ys = [float(v) for _, v, _, _ in points]
            style = dict(marker=MARKERS[n % len(MARKERS)], color=f"C{n}", label=lang, markersize=5)
            if all(lo is not None and hi is not None for *_, lo, hi in points):
                intervals = True
                err = [
                    [y - float(lo) for y, (*_, lo, _) in zip(ys, points)],
                    [float(hi) - y for y, (*_, hi) in zip(ys, points)],
                ]
                ax.errorbar(xs, ys, yerr=err, capsize=3, linewidth=1, elinewidth=1, **style)
            else:
                ax.plot(xs, ys, linewidth=1, **style)
        if metric.endswith("change"):
            ax.axhline(0.0, color="gray", linewidth=0.8)
        if metric.rpartition("/")[2] in SHARES:
            ax.set_ylim(-0.05, 1.05)  # a share: the whole range, so a small move looks small
        title, ylabel = _words(metric)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("checkpoint", fontsize=9)
        ks = sorted(set(present))
        ax.set_xticks(ks, [checkpoint_label(k) for k in ks])
        if ks:
            ax.set_xlim(ks[0] - 0.5, ks[-1] + 0.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in list(axes.flat)[1 : len(metrics)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    note = "bars: 95% bootstrap interval over prompts; " if intervals else ""
    fig.legend(
        list(seen.values()), list(seen), loc="upper center", ncol=min(len(seen), 8), fontsize=9, title="language"
    )
    fig.text(
        0.5,
        0.005,
        f"{note}languages are shifted sideways a little so that equal values stay visible",
        ha="center",
        fontsize=8,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.92))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
