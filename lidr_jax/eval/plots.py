"""Plots for the per-iteration report.

`plot_metrics(history, out_png)`: every evaluation metric per language across iterations, one panel
per metric, one line per language. `history[i]` is what `lidr_jax.eval.evaluate.evaluate_model` returned
after iteration i: {metric: {lang: value}}. matplotlib is an optional dependency (`pip install
lidr_jax[plots]`); it is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


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


def plot_metrics(history: Sequence[Mapping[str, Mapping[str, float]]], out_png: str | Path) -> Path:
    """Plot each metric per language across iterations (x = position in `history`) into `out_png`.

    A metric or language missing from an iteration is a gap in its line, not a zero. Returns the path.
    """
    if not history:
        raise ValueError("plot_metrics: history is empty; pass one {metric: {lang: value}} dict per iteration")
    metrics = sorted({m for h in history for m in h})
    if not metrics:
        raise ValueError("plot_metrics: no metrics in history")
    plt = _pyplot()
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    xs = list(range(len(history)))
    for ax, metric in zip(axes.flat, metrics):
        langs = sorted({lang for h in history for lang in h.get(metric, {})})
        for lang in langs:
            ys = [h.get(metric, {}).get(lang, math.nan) for h in history]
            ax.plot(xs, [math.nan if y is None else float(y) for y in ys], marker="o", label=lang)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        if langs:
            ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
