"""Table and figure for ``experiment=online_vs_offline`` from its run dirs alone.

    python -m dpo_lab.train -m experiment=online_vs_offline
    python scripts/online_vs_offline.py multirun/<date>/<time> --out docs/online_vs_offline.png

Per algorithm (offline / online), mean ± std over seeds of the true reward of policy samples,
KL(π‖π_ref), completion length and the probe's reward accuracy, with the number of preference
pairs each run trained on (offline: steps × batch size; online: the pairs it formed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

from dpo_lab.plots import finish_figure

COLUMNS = {
    "eval/reward/policy": "true reward π",
    "eval/reward/reference": "true reward π_ref",
    "eval/kl": "KL(π‖π_ref)",
    "eval/length/policy": "length π",
    "probe/rewards/accuracies": "probe acc",
    "pairs": "pairs trained on",
    "wall_time_s": "wall s",
}


def load_runs(sweep: Path) -> list[dict]:
    runs = []
    for summary in sorted(sweep.glob("*/summary.json")):
        d = summary.parent
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        s = json.loads(summary.read_text())
        if cfg["algo"]["name"] == "online":
            with open(d / "metrics.csv") as f:  # a running total: its last logged value
                totals = [
                    float(r["online/pairs_total"])
                    for r in csv.DictReader(f)
                    if r.get("online/pairs_total")
                ]
            pairs = s.get("online/pairs_total", totals[-1] if totals else float("nan"))
        else:
            pairs = s["steps"] * cfg["dataset"]["batch_size"]
        runs.append({"algo": cfg["algo"]["name"], "seed": cfg["seed"], "pairs": pairs, **s})
    return runs


def table(runs: list[dict]) -> str:
    lines = [
        "| algo | runs | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for algo in ("offline", "online"):
        group = [r for r in runs if r["algo"] == algo]
        if not group:
            continue
        cells = []
        for key in COLUMNS:
            xs = [r[key] for r in group if key in r]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.fmean(xs):.3f} ± {sd:.3f}" if xs else "—")
        lines.append(f"| {algo} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for algo, color in (("offline", "tab:blue"), ("online", "tab:orange")):
        group = [r for r in runs if r["algo"] == algo]
        ax.scatter(
            [r["eval/kl"] for r in group],
            [r["eval/reward/policy"] for r in group],
            color=color,
            label=f"{algo} DPO (one dot per seed)",
        )
    ref = [r["eval/reward/reference"] for r in runs]
    ax.axhline(statistics.fmean(ref), color="gray", ls="--", lw=1, label="reference (SFT)")
    ax.set_xscale("symlog")
    finish_figure(
        fig,
        ax,
        out,
        xlabel="KL(π‖π_ref), nats (symlog)",
        ylabel="true reward of samples",
        title="Online vs offline DPO on the embedded sentiment task",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="the multirun dir of experiment=online_vs_offline")
    ap.add_argument("--out", type=Path, default=None, help="figure path (default: <sweep>/...)")
    args = ap.parse_args()
    runs = load_runs(args.sweep)
    if not runs:
        print(f"online_vs_offline: error: no */summary.json under {args.sweep}", file=sys.stderr)
        return 2
    print(table(runs))
    out = args.out or args.sweep / "online_vs_offline.png"
    figure(runs, out)
    print(f"\nfigure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
