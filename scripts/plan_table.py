"""The reports of `python -m lidr_jax.plan --json FILE` as one Markdown table (docs/scaling.md's tables):

    python scripts/plan_table.py plan_lidr.json plan_icr.json > table.md

One row per program and topology: whether it fits, the compiler's peak per chip, the analytic plan's
figure where it differs from the compiler's by more than 10% (train rows), the collectives, the
compiler's estimated time and its MFU or HBM-roofline estimate, and the compile time (or the topology
whose identical program was compiled, for a host's generation).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

GiB = 2**30
SHORT = {
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-reduce": "AR",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


REFUSED = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def refused(compiler: str) -> str:
    """The compiler's refusal, short: "temporaries 30.08 GB > HBM 15.75 GB" (its own line otherwise)."""
    m = REFUSED.search(compiler)
    return f"temporaries {m.group(1)} GB > HBM {m.group(2)} GB" if m else compiler


def row_cells(config: str, topology: dict, row: dict) -> list[str]:
    where = topology.get("slice") or topology["topology"]
    analytic = row.get("analytic_peak")
    if row.get("source") == "analytic":  # a GPU node: the analytic plan only, in the analytic column
        fits = "yes" if row["fits"] else "**no**"
        return (
            [config, where, row["program"], row.get("note", ""), fits, "", f"{row['memory']['peak'] / GiB:.2f}"]
            + [""] * 3
            + ["analytic"]
        )
    if "compiler" in row or "reason" in row:  # refused by the compiler for memory, or no decoding layout
        why = row.get("reason") or refused(row["compiler"])
        shown = f"{analytic / GiB:.2f}" if analytic is not None else ""
        return [config, where, row["program"], row.get("note", ""), "**no**", why, shown, "", "", "", ""]
    peak = row["memory"]["peak"]
    off = analytic is not None and abs(analytic - peak) > 0.1 * peak
    coll = ", ".join(f"{v['count']} {SHORT.get(k, k)}" for k, v in row.get("collectives", {}).items() if v["count"])
    estimate = ""
    if "estimated_mfu" in row:
        estimate = f"MFU {row['estimated_mfu']:.0%}"
    elif "decode" in row:
        estimate = f"{row['decode']['estimated_roofline_fraction']:.0%} of HBM roofline"
    est = _time(row["cost"]["optimal_seconds"]) if "cost" in row else "-"
    compiled = f"as {row['same_as']}" if "same_as" in row else f"{row['compile_seconds']:.0f}"
    return [
        config,
        where,
        row["program"],
        row.get("note", ""),
        "yes" if row["fits"] else "**no**",
        f"{peak / GiB:.2f}",
        f"{analytic / GiB:.2f}" if off else "",
        coll or "none",
        est,
        estimate,
        compiled,
    ]


HEADER = [
    "config",
    "topology",
    "program",
    "shapes",
    "fits",
    "peak GiB/chip",
    "analytic GiB (>10% off)",
    "collectives",
    "est. time",
    "estimate",
    "compile s",
]


def table(reports: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for report in reports:
        config = Path(report["config"]).stem
        for topology in report["topologies"]:
            for row in topology["programs"]:
                lines.append("| " + " | ".join(row_cells(config, topology, row)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="JSON reports of python -m lidr_jax.plan --json")
    args = p.parse_args(argv)
    print(table([json.loads(Path(f).read_text()) for f in args.reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
