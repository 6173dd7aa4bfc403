"""Figures written into the run dir. They read the run's own files, so they can be remade."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def probe_means(csv_path: str | Path) -> dict[str, list[float]]:
    """Mean per step of each probe column: {'step': [...], 'policy_chosen_logps': [...], ...}."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in ("step", "example_id"):
                    acc[int(row["step"])][k].append(float(v))
    steps = sorted(acc)
    out: dict[str, list[float]] = {"step": [float(s) for s in steps]}
    for k in acc[steps[0]] if steps else ():
        out[k] = [sum(acc[s][k]) / len(acc[s][k]) for s in steps]
    return out


def finish_figure(
    fig, ax, path: str | Path | None, *, xlabel: str, ylabel: str, title: str, legend_size: int = 8
) -> Path | None:
    """Label, legend, grid, save to ``path`` (creating its folder) and close: every figure's end.

    ``path=None`` finishes one panel of a multi-panel figure without saving it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    if path is None:
        return None
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_probe(csv_path: str | Path, png_path: str | Path) -> Path:
    """Mean chosen and rejected log-probs of the probe set against step, reference levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = probe_means(csv_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
        ax.plot(
            m["step"], m[f"policy_{side}_logps"], color=color, marker=".", label=f"policy, {side}"
        )
        ax.axhline(
            m[f"reference_{side}_logps"][0], color=color, ls="--", lw=1, label=f"reference, {side}"
        )
    return finish_figure(
        fig,
        ax,
        png_path,
        xlabel="training step",
        ylabel="mean log-prob of completion (probe set)",
        title="Preference displacement on the probe set",
    )
