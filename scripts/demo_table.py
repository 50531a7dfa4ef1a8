"""The demonstration's table (docs/results.md): every checkpoint of `configs/demo.yaml`'s two runs on
the same held-out prompts, with paired 95% intervals.

The runs' own reports give each checkpoint's in-language share and reference log-likelihood with
unpaired intervals, and the paired change of the in-language share. This script adds what the
goal is tested with:

- the paired change of the reference log-likelihood since M0 (each checkpoint scores the same fixed
  references, so the per-prompt difference is far less noisy than the two levels);
- both changes pooled over the target languages (the mean of the 4 x 48 per-prompt differences,
  bootstrapped by prompt id so a prompt's four languages move together), which is what "rises on
  average by more than its interval" means.

It reads the answers the runs saved (iter_K/check/held_out.jsonl) and scores the references again
with each checkpoint's exported model (a few minutes on a 2-core CPU):

    python scripts/demo_table.py --lidr runs/demo --icr runs/demo_icr --plot docs/results_demo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lidr_jax.eval.heldout import bootstrap_mean, in_language_by_id, paired_change, reference_logliks
from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import load_pretrained
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.pipeline.runner import plan_prompts


def checkpoints(lidr: Path, icr: Path | None) -> list[tuple[str, str, Path]]:
    """(label, model path or name, its answers) for M0, each LIDR iteration and the ICR iteration."""
    cfg = json.loads((lidr / "manifest.json").read_text())["config"]
    out = [("M0", cfg["model"], lidr / "iter_0/check/held_out.jsonl")]
    k = 1
    while (lidr / f"iter_{k}/check/held_out.jsonl").exists():
        out.append((f"LIDR {k}", str(lidr / f"iter_{k}/export/hf"), lidr / f"iter_{k}/check/held_out.jsonl"))
        k += 1
    if icr is not None and (icr / "iter_1/check/held_out.jsonl").exists():
        out.append(("ICR 1", str(icr / "iter_1/export/hf"), icr / "iter_1/check/held_out.jsonl"))
    return out


def pooled_change(before: dict, after: dict, langs, seed: int = 0) -> tuple[float, float, float]:
    """Mean per-prompt change over `langs`, bootstrapped over prompt ids (all languages of an id together):
    every id has one value per language, so this is the bootstrap of each id's mean change."""
    ids = sorted(set.intersection(*(set(before[lang]) & set(after[lang]) for lang in langs)))
    diff = np.array([[after[lang][i] - before[lang][i] for lang in langs] for i in ids])  # [ids, langs]
    e = bootstrap_mean(diff.mean(axis=1), seed=seed)
    return e.value, e.low, e.high


def fmt(v, low, high, digits=2) -> str:
    f = f"{{:+.{digits}f}}"
    return f"{f.format(v)} [{f.format(low)}, {f.format(high)}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lidr", type=Path, default=Path("runs/demo"))
    ap.add_argument("--icr", type=Path, default=Path("runs/demo_icr"))
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--plot", type=Path, default=None, help="write the two pooled changes per checkpoint here")
    args = ap.parse_args()

    cfg = load_run_config(args.config)
    _, held = plan_prompts(cfg)
    langs = list(cfg.languages)
    targets = [lang for lang in langs if lang != cfg.dominant]
    skip = held.translation_task
    shares, logliks, labels = [], [], []
    for label, model_path, answers in checkpoints(args.lidr, args.icr):
        rows = list(read_jsonl(answers))
        shares.append({lang: in_language_by_id(rows, lang, skip_ids=skip) for lang in langs})
        model = load_pretrained(model_path)
        logliks.append(reference_logliks(model, held, scoring=cfg.dpo.compute, bucket_multiple=cfg.dpo.bucket_multiple))
        labels.append(label)
        print(f"scored {label} ({model_path})", flush=True)

    print("\n| checkpoint | lang | in-language share | change since M0 | ref. log-lik / token | change since M0 |")
    print("|---|---|---|---|---|---|")
    for c, label in enumerate(labels):
        for lang in langs:
            s = np.array(list(shares[c][lang].values()))
            ll = np.array(list(logliks[c][lang].values()))
            if c == 0:
                ds = dl = "-"
            else:
                ids = sorted(shares[0][lang])
                e = paired_change([shares[0][lang][i] for i in ids], [shares[c][lang][i] for i in ids])
                ds = fmt(e.value, e.low, e.high)
                ids = sorted(logliks[0][lang])
                e = paired_change([logliks[0][lang][i] for i in ids], [logliks[c][lang][i] for i in ids])
                dl = fmt(e.value, e.low, e.high, 3)
            print(f"| {label} | {lang} | {s.mean():.2f} | {ds} | {ll.mean():.3f} | {dl} |")
    print("\nPooled over the target languages", ", ".join(targets), "(bootstrap over prompt ids):")
    print("| checkpoint | in-language change since M0 | ref. log-lik change since M0 | English log-lik change |")
    print("|---|---|---|---|")
    pooled = []
    for c, label in enumerate(labels[1:], start=1):
        s = pooled_change(shares[0], shares[c], targets)
        ll = pooled_change(logliks[0], logliks[c], targets)
        en = pooled_change(logliks[0], logliks[c], [cfg.dominant])
        pooled.append((s, ll))
        print(f"| {label} | {fmt(*s)} | {fmt(*ll, digits=3)} | {fmt(*en, digits=3)} |")
    if args.plot:
        plot(args.plot, labels, pooled)


def plot(path: Path, labels, pooled) -> None:
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = np.arange(1, len(labels))
    for ax, j, title in ((axes[0], 0, "in-language share"), (axes[1], 1, "reference log-lik / token")):
        v = np.array([p[j][0] for p in pooled])
        err = np.array([[p[j][0] - p[j][1] for p in pooled], [p[j][2] - p[j][0] for p in pooled]])
        ax.errorbar(x, v, yerr=err, fmt="o", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, labels[1:])
        ax.set_title(f"{title}: change since M0\n(target languages pooled, 95% interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
