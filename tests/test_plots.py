"""The evaluation plot as a reader meets it: titles in words, labelled axes, checkpoints named, 95% intervals
drawn as error bars, and languages with equal values still visible side by side."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="plots need the optional matplotlib (pip install 'lidr_jax[plots]')")


def _history():
    langs = ("en", "es", "fr")
    out = []
    for k in range(3):
        h = {}
        for lang in langs:  # es and fr have the same values everywhere: both must stay visible
            v = 0.75 if lang == "en" else 0.5
            h.setdefault("held_out/in_language", {})[lang] = v
            h.setdefault("held_out/in_language_low", {})[lang] = v - 0.25
            h.setdefault("held_out/in_language_high", {})[lang] = v + 0.25
            h.setdefault("held_out/n", {})[lang] = 8.0
            h.setdefault("held_out/mean_tokens", {})[lang] = 40.0
            if k:
                h.setdefault("held_out/change", {})[lang] = 0.0
                h.setdefault("held_out/change_low", {})[lang] = -0.125
                h.setdefault("held_out/change_high", {})[lang] = 0.125
        out.append(h)
    return out


def test_evaluation_plot_reads_in_words_with_intervals(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lidr_jax.eval.plots import plot_metrics

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    png = plot_metrics(_history(), tmp_path / "evaluation.png")
    assert png.stat().st_size > 10_000
    (fig,) = figures
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {
        "in-language share of answers\n(held-out prompts)",
        "in-language share: change since the start\n(held-out prompts)",
        "answer length\n(held-out prompts)",
    }  # no raw keys; "n" (a sample size) is not a panel
    share = panels["in-language share of answers\n(held-out prompts)"]
    assert share.get_ylabel() == "share answered in the asked language" and share.get_xlabel() == "checkpoint"
    assert [t.get_text() for t in share.get_xticklabels()] == ["start", "iter 1", "iter 2"]
    assert share.get_ylim() == (-0.05, 1.05)
    change = panels["in-language share: change since the start\n(held-out prompts)"]
    assert [t.get_text() for t in change.get_xticklabels()] == ["iter 1", "iter 2"]  # no empty "start"
    assert change.get_xlim() == (0.5, 2.5)
    # One error bar set per language on each panel with intervals; es and fr drawn at different x.
    bars = [c for c in share.containers if c.has_yerr]
    assert len(bars) == 3
    xs = {c.get_label(): tuple(c.lines[0].get_xdata()) for c in bars}
    assert xs["es"] != xs["fr"] and all(abs(a - b) < 0.2 for a, b in zip(xs["es"], xs["fr"]))
    (low, high) = bars[1].lines[1][:2] if len(bars[1].lines[1]) == 2 else (None, None)
    assert low is not None and list(low.get_ydata()) == [0.25] * 3 and list(high.get_ydata()) == [0.75] * 3
    lengths = panels["answer length\n(held-out prompts)"]
    assert not [c for c in lengths.containers if getattr(c, "has_yerr", False)]  # no interval recorded: none drawn
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["en", "es", "fr"]
    assert "95% bootstrap interval" in " ".join(t.get_text() for t in fig.texts)
