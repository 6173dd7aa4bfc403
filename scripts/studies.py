"""The studies: run their sweeps, then make each table and figure from the run dirs alone.

    python scripts/studies.py all                    # run every sweep, then `report --readme`
    python scripts/studies.py run [--only S ...]     # the sweeps: multirun/studies/<study>/
    python scripts/studies.py report [--readme README.md]   # tables (stdout), docs/<study>.png
    python scripts/studies.py label_noise            # one study's table and figure

Every study sweeps five or more training seeds. A table cell is the mean over seeds ± the
half-width of its 95% confidence interval (Student t on the seed means, ``ci95``), with the
number of seeds where fewer than all contributed. Methods are compared at matched KL: each seed's
(KL, metric) points over β are a frontier; the metric is read off it at common KL levels by
linear interpolation in log KL (``at_kl``), never extrapolated, and the interval is over seeds.
Every table shows the share of evaluation samples that hit the sampling cap unfinished.

Some studies share runs: beta_frontier's DPO and SimPO runs are also the unbiased arm of
length_bias and the DPO arm of kto_binary and online_vs_offline (the same configs), so a study
reads the run dirs of every study under ``--root``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lab.plots import finish_figure
from dpo_lab.report import collect

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

# Student t, 0.975 quantile, by degrees of freedom 1 … 30
# fmt: off
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
# fmt: on


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (tabled to 30; beyond, the
    normal's 1.960 with Cornish-Fisher's first correction, within 0.003 of the exact value)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def ci95(xs: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% confidence interval of the mean, n) over finite ``xs``:
    mean ± t₀.₉₇₅(n−1)·s/√n. The half-width is NaN with fewer than two values."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan"), 1
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)), len(xs)


def fmt(xs: list[float], digits: int = 3, expect: int | None = None, signed: bool = False) -> str:
    """``mean ± half-width`` of ``ci95``; ``(n=k)`` when fewer than ``expect`` values counted."""
    m, h, n = ci95(xs)
    if n == 0:
        return "—"
    sign = "+" if signed else ""
    cell = f"{m:{sign}.{digits}f}" + ("" if n == 1 else f" ± {h:.{digits}f}")
    return cell + (f" (n={n})" if expect is not None and n < expect else "")


KL_FLOOR = 1e-3  # a KL estimate at or below 0 (a policy at its reference, up to Monte Carlo noise)


def fmt_kl(xs: list[float], expect: int | None = None) -> str:
    """KL over seeds as a geometric mean ×/÷ its 95% factor (a t-interval of log KL): KL is
    positive and heavy-tailed, so an additive interval would reach below 0. Estimates ≤ 0 count
    as ``KL_FLOOR``."""
    logs = [math.log(max(x, KL_FLOOR)) for x in xs if x is not None and math.isfinite(x)]
    m, h, n = ci95(logs)
    if n == 0:
        return "—"
    cell = f"{math.exp(m):.3g}" + ("" if n == 1 else f" ×/÷ {math.exp(h):.2f}")
    return cell + (f" (n={n})" if expect is not None and n < expect else "")


def at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """The metric at ``kl`` on one frontier: ``points`` are (KL, metric) over β; linear
    interpolation in log KL between the two points around ``kl`` (sorted by KL), None outside
    their range (no extrapolation). KL estimates ≤ 0 count as ``KL_FLOOR``."""
    pts = sorted((max(k, KL_FLOOR), v) for k, v in points if math.isfinite(k) and math.isfinite(v))
    if not pts or not pts[0][0] <= kl <= pts[-1][0]:
        return None
    for (k0, v0), (k1, v1) in zip(pts, pts[1:], strict=False):
        if k0 <= kl <= k1:
            if k1 == k0:
                return (v0 + v1) / 2
            w = (math.log(kl) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return v0 + w * (v1 - v0)
    return pts[0][1]  # a single point, at exactly kl


def levels_in(intervals: list[tuple[float, float]], n: int = 3) -> list[float]:
    """``n`` KL levels spread evenly (in log KL) over the union of ``intervals``, each inside one
    of them (at the middles of n equal shares of the union's log length, so never at an edge and
    never in a gap between intervals), rounded to 2 significant digits (more where needed to
    stay inside); [] for an empty union."""
    spans = sorted((math.log(max(a, KL_FLOOR)), math.log(b)) for a, b in intervals if a < b)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = sum(b - a for a, b in merged)
    if not merged or total <= 0:
        return []
    out = []
    for i in range(n):
        pos = total * (i + 0.5) / n
        for a, b in merged:
            if pos <= b - a:
                out.append(_round_within(math.exp(a + pos), math.exp(a), math.exp(b)))
                break
            pos -= b - a
    return out


def _round_within(x: float, lo: float, hi: float) -> float:
    """``x`` with the fewest significant digits (2 to 4) that stays inside [lo, hi]."""
    for d in (2, 3, 4):
        unit = 10 ** (math.floor(math.log10(x)) - d + 1)
        for r in (round(x / unit), math.floor(x / unit), math.ceil(x / unit)):
            if lo <= (v := float(f"{r * unit:.{d}g}")) <= hi:
                return v
    return x


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished job: its resolved config (dotted lookups with ``get``), overrides, summary."""

    path: Path
    study: str
    config: dict[str, Any]
    overrides: list[str]
    summary: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def arm(self) -> str | None:
        for o in self.overrides:
            m = re.match(r"\+?arm/[\w]+=(\w+)", o)
            if m:
                return m.group(1)
        return None

    def __getitem__(self, key: str) -> float:
        return float(self.summary.get(key, float("nan")))


def load_runs(root: Path, studies: list[str]) -> dict[str, list[Run]]:
    """Finished runs of each study's sweep dir under ``root`` (missing sweeps: empty lists)."""
    out: dict[str, list[Run]] = {}
    for study in studies:
        runs = []
        sweep = root / study
        for job in collect(sweep) if sweep.is_dir() else []:
            if job.status != "done":
                continue
            cfg_file = job.path / "config.yaml"
            config = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
            overrides = yaml.safe_load((job.path / ".hydra" / "overrides.yaml").read_text()) or []
            runs.append(Run(job.path, study, config, overrides, job.summary))
        out[study] = runs
    return out


def by(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    """Group runs by config values (dotted keys; ``arm`` for the study arm), in first-seen order."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(r.arm if k == "arm" else r.get(k) for k in keys)].append(r)
    return dict(groups)


def seed_frontiers(runs: list[Run], metric: str) -> dict[int, list[tuple[float, float]]]:
    """Per seed, the (eval/kl, metric) points of its runs over β (non-finite points left out)."""
    out: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        if math.isfinite(r["eval/kl"]) and math.isfinite(r[metric]):
            out[r.get("seed")].append((r["eval/kl"], r[metric]))
    return dict(out)


CAPPED_LIMIT = 0.01  # runs with a larger share of capped samples stay out of the frontiers


def usable(runs: list[Run]) -> list[Run]:
    """The runs whose evaluation is not censored: at most ``CAPPED_LIMIT`` of the policy's
    samples hit the cap unfinished (their reward, length and KL would be those of prefixes)."""
    return [r for r in runs if not r["eval/capped_frac/policy"] > CAPPED_LIMIT]


def kl_range(runs: list[Run], metric: str) -> tuple[float, float] | None:
    """The KL range a group's frontier covers: between its smallest and largest per-β median KL
    over seeds (usable runs; a median, so one runaway seed does not stretch it). A seed whose own
    frontier misses a level inside it is left out of that cell (which then says ``n=``); paired
    differences use the seeds both groups have there."""
    medians = sorted(
        statistics.median(r["eval/kl"] for r in g)
        for g in by(usable(runs), "beta").values()
        if all(math.isfinite(r["eval/kl"]) and math.isfinite(r[metric]) for r in g)
    )
    if len(medians) > 1 and max(medians[0], KL_FLOOR) < medians[-1]:
        return max(medians[0], KL_FLOOR), medians[-1]
    return None


def matched(runs: list[Run], metric: str, kl: float) -> dict[int, float]:
    """``metric`` at ``kl`` on each seed's own frontier (usable runs; seeds whose frontier misses
    ``kl`` are left out), by seed."""
    out = {}
    for seed, pts in seed_frontiers(usable(runs), metric).items():
        v = at_kl(pts, kl)
        if v is not None:
            out[seed] = v
    return out


def n_seeds(runs: list[Run]) -> int:
    return len({r.get("seed") for r in runs})


# ---------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2), dpi=120, squeeze=False)
    return plt, fig, list(axes[0])


def _capped(runs: list[Run]) -> str:
    """Largest share of capped policy samples over the runs (0: no sample was censored)."""
    xs = [r["eval/capped_frac/policy"] for r in runs]
    xs = [x for x in xs if math.isfinite(x)]
    return f"{max(xs):.3f}" if xs else "—"


def _left_out(runs: list[Run]) -> str:
    return str(len(runs) - len(usable(runs)))


def _errorbar_frontier(
    ax, runs: list[Run], metric: str, label: str, keep=usable, annotate: bool = False, **kw
) -> None:
    """One point per β (the runs ``keep`` keeps: by default the usable ones): the geometric-mean
    KL ×/÷ its 95% factor and the mean metric ± its 95% CI over seeds; ``annotate`` writes each
    point's β beside it."""
    pts = []
    for (beta,), g in by(keep(runs), "beta").items():
        logs = [math.log(max(r["eval/kl"], KL_FLOOR)) for r in g]
        lm, lh, _ = ci95(logs)
        mx, mh, _ = ci95([r[metric] for r in g])
        lh, mh = (0.0 if math.isnan(lh) else lh), (0.0 if math.isnan(mh) else mh)
        k = math.exp(lm)
        pts.append((k, mx, k - math.exp(lm - lh), math.exp(lm + lh) - k, mh, beta))
    pts.sort()
    ax.errorbar(
        [p[0] for p in pts],
        [p[1] for p in pts],
        xerr=[[p[2] for p in pts], [p[3] for p in pts]],
        yerr=[p[4] for p in pts],
        capsize=3,
        label=label,
        **{"marker": "o", **kw},
    )
    for p in pts if annotate else []:
        ax.annotate(f"β={p[5]:g}", p[:2], fontsize=7, xytext=(4, -10), textcoords="offset points")


def _reference_line(ax, runs: list[Run], label: str = "reference (SFT)") -> None:
    ref = [r["eval/reward/reference"] for r in runs]
    if ref:
        ax.axhline(statistics.fmean(ref), color="gray", ls="--", lw=1, label=label)


def _reward_figure(groups: dict[str, list[Run]], reference: list[Run], out: Path, title: str):
    """True reward against KL (log scale), one frontier over β per group, the reference's
    reward dashed: the figure of every study that compares methods on reward."""
    plt, fig, (ax,) = _figure(1)
    for name, g in groups.items():
        _errorbar_frontier(ax, g, "eval/reward/policy", name)
    _reference_line(ax, reference)
    ax.set_xscale("log")
    finish_figure(
        fig,
        ax,
        out,
        xlabel="KL(π‖π_ref), nats (log scale)",
        ylabel="true reward of policy samples",
        title=title,
    )


def _levels(groups: dict[str, list[Run]], n: int = 3, metric: str = "eval/reward/policy"):
    """``n`` matched KL levels inside the KL ranges where two or more groups overlap
    (``kl_range`` of each, pairwise intersections, ``levels_in``): where a comparison exists."""
    ranges = [r for g in groups.values() if g and (r := kl_range(g, metric))]
    overlaps = [
        (max(a[0], b[0]), min(a[1], b[1]))
        for i, a in enumerate(ranges)
        for b in ranges[i + 1 :]
        if max(a[0], b[0]) < min(a[1], b[1])
    ]
    return levels_in(overlaps, n)


def _covers(runs: list[Run], metric: str, kl: float) -> bool:
    rng = kl_range(runs, metric) if runs else None
    return rng is not None and rng[0] <= kl <= rng[1]


def _cell(runs: list[Run], metric: str, kl: float, digits: int = 3) -> str:
    """``metric`` at ``kl`` over the group's seeds, or "—" where its frontier does not reach."""
    if not _covers(runs, metric, kl):
        return "—"
    return fmt(list(matched(runs, metric, kl).values()), digits, n_seeds(usable(runs)))


def _paired_cell(a: list[Run], b: list[Run], metric: str, kl: float, digits: int = 3) -> str:
    """a − b at ``kl``, seed by seed (runs of one seed share the data order and the evaluation's
    RNG state, so the difference is paired), mean ± 95% CI over the seeds both have."""
    if not (_covers(a, metric, kl) and _covers(b, metric, kl)):
        return "—"
    va, vb = matched(a, metric, kl), matched(b, metric, kl)
    diffs = [va[s] - vb[s] for s in va.keys() & vb.keys()]
    expect = len({r.get("seed") for r in usable(a)} & {r.get("seed") for r in usable(b)})
    return fmt(diffs, digits, expect, signed=True)


def _matched_tables(
    groups: dict[str, list[Run]],
    metric: str,
    levels: list[float],
    against: dict[str, str] | None = None,
    first: str = "arm",
    digits: int = 3,
) -> str:
    """The metric at each matched KL level per group, then (``against``: group → baseline
    group) the paired differences."""
    header = [first, *(f"KL = {kl:g}" for kl in levels), "capped", "left out", "seeds"]
    rows = [
        [
            name,
            *(_cell(g, metric, kl, digits) for kl in levels),
            _capped(usable(g)),
            _left_out(g),
            str(n_seeds(g)),
        ]
        for name, g in groups.items()
    ]
    out = table(header, rows)
    if against:
        diff_rows = [
            [
                f"{a} − {b}",
                *(_paired_cell(groups[a], groups[b], metric, kl, digits) for kl in levels),
            ]
            for a, b in against.items()
            if a in groups and b in groups
        ]
        out += "\n\nPaired differences (same seeds):\n\n" + table(
            ["difference", *(f"KL = {kl:g}" for kl in levels)], diff_rows
        )
    return out


def _per_beta_rows(groups: dict[str, list[Run]]) -> list[list[str]]:
    rows = []
    for name, runs in groups.items():
        for (beta,), g in sorted(by(runs, "beta").items()):
            n = len(g)
            rows.append(
                [
                    name,
                    f"{beta:g}",
                    fmt([r["eval/reward/policy"] for r in g], 3, n),
                    fmt_kl([r["eval/kl"] for r in g], n),
                    fmt([r["eval/length/policy"] for r in g], 1, n),
                    _capped(g),
                    str(n),
                ]
            )
    return rows


PER_BETA = ["arm", "β", "true reward π", "KL(π‖π_ref)", "length π", "capped", "seeds"]
CAPTION = (
    "Cells: mean ± 95% CI over seeds; KL as geometric mean ×/÷ its 95% factor. Matched-KL "
    "tables: each arm's KL range runs between its smallest and largest per-β median KL over "
    f"the runs kept; left out: runs above {CAPPED_LIMIT:.0%} of samples capped, kept out of the "
    "frontiers; capped: the largest capped share among the runs kept (the per-β tables show "
    "every run's)."
)


def beta_frontier(runs: dict[str, list[Run]], out: Path) -> str:
    groups = {loss: g for (loss,), g in by(runs["beta_frontier"], "loss.name").items()}
    _reward_figure(groups, runs["beta_frontier"], out, "Reward against KL over β (mean ± 95% CI)")
    levels = _levels(groups, 4)
    against = {k: "dpo" for k in groups if k != "dpo"}
    return "\n\n".join(
        [
            "True reward at matched KL:",
            _matched_tables(groups, "eval/reward/policy", levels, against, first="loss"),
            CAPTION,
            "<details><summary>Every loss and β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


def _probe_curves(run: Run) -> dict[str, dict[int, float]]:
    """probe/* columns of metrics.csv against step."""
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    with open(run.path / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("probe/") and v not in ("", None):
                    curves[k][int(row["step"])] = float(v)
    return curves


def _logratio_panels(fig, axes, series: dict[str, tuple], out: Path, title: str) -> None:
    """Two panels, chosen then rejected: each series' mean probe log-ratio to the reference
    against step over its runs (``series``: label → (runs, plot keywords, whether to shade the
    95% CI)); the figure is saved to ``out`` with the second."""
    for ax, side in zip(axes, ("chosen", "rejected"), strict=True):
        for label, (g, kw, band) in series.items():
            curves = [_probe_curves(r)[f"probe/logratios/{side}"] for r in g]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [ci95([c[s] for c in curves]) for s in steps]
            m = [x[0] for x in stats]
            ax.plot(steps, m, label=label, **kw)
            if band:
                h = [0 if math.isnan(x[1]) else x[1] for x in stats]
                ax.fill_between(
                    steps,
                    [a - b for a, b in zip(m, h, strict=True)],
                    [a + b for a, b in zip(m, h, strict=True)],
                    color=kw["color"],
                    alpha=0.2,
                )
        ax.axhline(0, color="gray", ls="--", lw=1)
        finish_figure(
            fig,
            ax,
            out if side == "rejected" else None,
            xlabel="training step",
            ylabel=f"mean log π/π_ref of {side} (probe set)",
            title=f"{side.capitalize()} {title}",
        )


def displacement(runs: dict[str, list[Run]], out: Path) -> str:
    groups = {loss: g for (loss,), g in by(runs["displacement"], "loss.name").items()}
    plt, fig, axes = _figure(2)
    colors = dict(zip(groups, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    series = {name: (g, {"color": colors[name]}, True) for name, g in groups.items()}
    _logratio_panels(fig, axes, series, out, "completions (mean ± 95% CI)")
    rows = []
    for name, g in groups.items():
        rows.append(
            [
                name,
                f"{g[0].get('beta'):g}",
                fmt([r["probe/logratios/chosen"] for r in g], 2),
                fmt([r["probe/logratios/rejected"] for r in g], 2),
                fmt([r["probe/frac_chosen_below_ref"] for r in g]),
                fmt([r["eval/reward/policy"] for r in g]),
                fmt_kl([r["eval/kl"] for r in g]),
                _capped(g),
                str(len(g)),
            ]
        )
    header = ["loss", "β", "Δ log π(y_c)", "Δ log π(y_r)", "chosen below ref"]
    out = table([*header, "true reward π", "KL", "capped", "seeds"], rows)
    # each run against DPO at its own KL: DPO's frontier over β (beta_frontier), same seed
    dpo = [r for r in runs.get("beta_frontier", []) if r.get("loss.name") == "dpo"]
    metrics = [
        ("probe/logratios/chosen", 2),
        ("probe/logratios/rejected", 2),
        ("probe/frac_chosen_below_ref", 3),
        ("eval/reward/policy", 3),
    ]
    diff_rows = []
    for name, g in groups.items():
        if name == "dpo" or not dpo:
            continue
        cells = []
        for metric, digits in metrics:
            fronts = seed_frontiers(usable(dpo), metric)
            diffs = []
            for r in usable(g):
                ref = at_kl(fronts.get(r.get("seed"), []), max(r["eval/kl"], KL_FLOOR))
                if ref is not None:
                    diffs.append(r[metric] - ref)
            cells.append(fmt(diffs, digits, len(g), signed=True) if diffs else "—")
        diff_rows.append([f"{name} − DPO at its KL", *cells])
    if diff_rows:
        out += (
            "\n\nAgainst DPO at the same KL (DPO's frontier over β from beta_frontier, read at "
            "each run's own KL, same seed; — where DPO's β grid does not reach that KL):\n\n"
            + table(["difference", *(h for h in header[2:]), "true reward π"], diff_rows)
        )
    return out + "\n\n" + CAPTION


LABEL_NOISE_ARMS = ("dpo", "cdpo", "robust_dpo", "ipo")


def label_noise(runs: dict[str, list[Run]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by(runs["label_noise"], "arm", "dataset.label_noise")
    arms = [a for a in LABEL_NOISE_ARMS if any(k[0] == a for k in grouped)]
    noises = sorted({k[1] for k in grouped})
    fig, axes = plt.subplots(
        2, len(noises), figsize=(4.6 * len(noises), 7.6), dpi=120, squeeze=False
    )
    rows, diffs = [], []
    for col, noise in enumerate(noises):
        arm_runs = {a: grouped.get((a, noise), []) for a in arms}
        levels = _levels(arm_runs, 3, "probe/true_accuracies")
        for kl in levels:
            acc = [_cell(arm_runs[a], "probe/true_accuracies", kl) for a in arms]
            rew = [_cell(arm_runs[a], "eval/reward/policy", kl) for a in arms]
            rows.append([f"{noise:g}", f"{kl:g}", *acc, *rew])
            diffs.append(
                [
                    f"{noise:g}",
                    f"{kl:g}",
                    *(
                        _paired_cell(arm_runs[a], arm_runs["dpo"], "probe/true_accuracies", kl)
                        for a in arms
                        if a != "dpo"
                    ),
                ]
            )
        for row, (metric, label) in enumerate(
            (
                ("probe/true_accuracies", "held-out accuracy vs the true reward"),
                ("eval/reward/policy", "true reward of policy samples"),
            )
        ):
            ax = axes[row][col]
            for arm in arms:
                if arm_runs[arm]:
                    _errorbar_frontier(ax, arm_runs[arm], metric, arm)
            ax.set_xscale("log")
            last = row == 1 and col == len(noises) - 1
            finish_figure(
                fig,
                ax,
                out if last else None,
                xlabel="KL(π‖π_ref), nats (log scale)",
                ylabel=label,
                title=f"{noise:g} of labels flipped (mean ± 95% CI)",
            )
    header = ["flipped", "KL", *(f"{a} acc" for a in arms), *(f"{a} reward" for a in arms)]
    per_beta = []
    for arm in arms:
        for noise in noises:
            for (beta,), g in sorted(by(grouped.get((arm, noise), []), "beta").items()):
                per_beta.append(
                    [
                        arm,
                        f"{noise:g}",
                        f"{beta:g}",
                        fmt([r["probe/true_accuracies"] for r in g], 3, len(g)),
                        fmt([r["eval/reward/policy"] for r in g], 3, len(g)),
                        fmt_kl([r["eval/kl"] for r in g], len(g)),
                        _capped(g),
                    ]
                )
    others = [a for a in arms if a != "dpo"]
    # one KL every arm reaches at every noise level: what noise costs at equal KL
    ranges = [r for g in grouped.values() if (r := kl_range(g, "probe/true_accuracies"))]
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    common = ""
    if ranges and lo < hi:
        (kl,) = levels_in([(lo, hi)], 1)
        common_rows = [
            [
                arm,
                *(_cell(grouped.get((arm, n), []), "probe/true_accuracies", kl) for n in noises),
                *(_cell(grouped.get((arm, n), []), "eval/reward/policy", kl) for n in noises),
            ]
            for arm in arms
        ]
        common = (
            f"\n\nAt one KL that every arm reaches at every noise level (KL = {kl:g}):\n\n"
            + table(
                [
                    "arm",
                    *(f"acc, {n:g} flipped" for n in noises),
                    *(f"reward, {n:g} flipped" for n in noises),
                ],
                common_rows,
            )
        )
    return (
        table(header, rows)
        + common
        + "\n\nTrue accuracy, paired difference from DPO at the same noise and KL (same seeds):"
        + "\n\n"
        + table(["flipped", "KL", *(f"{a} − dpo" for a in others)], diffs)
        + f"\n\n{CAPTION} Largest capped share of any run: {_capped(runs['label_noise'])}; "
        + f"runs left out: {_left_out(runs['label_noise'])}."
        + "\n\n<details><summary>Every arm, noise level and β</summary>\n\n"
        + table(["arm", "flipped", "β", "true acc", "true reward π", "KL", "capped"], per_beta)
        + "\n\n</details>"
    )


def length_bias(runs: dict[str, list[Run]], out: Path) -> str:
    groups: dict[str, list[Run]] = {}
    for loss in ("dpo", "simpo"):
        groups[f"{loss}, bias 0"] = [r for r in runs["beta_frontier"] if r.get("loss.name") == loss]
        groups[f"{loss}, bias 1"] = [r for r in runs["length_bias"] if r.get("loss.name") == loss]
    groups = {k: v for k, v in groups.items() if v}
    levels = _levels(groups, 2)
    plt, fig, axes = _figure(2)
    for name, g in groups.items():
        ls = "-" if "bias 0" in name else "--"
        _errorbar_frontier(axes[0], g, "eval/length/policy", name, ls=ls)
        _errorbar_frontier(axes[1], g, "eval/reward/policy", name, ls=ls)
    for ax in axes:
        ax.set_xscale("log")
    finish_figure(
        fig,
        axes[0],
        None,
        xlabel="KL(π‖π_ref), nats",
        ylabel="tokens per policy sample",
        title="Length against KL (mean ± 95% CI)",
    )
    finish_figure(
        fig,
        axes[1],
        out,
        xlabel="KL(π‖π_ref), nats",
        ylabel="true reward of policy samples",
        title="True reward against KL",
    )
    against = {f"{loss}, bias 1": f"{loss}, bias 0" for loss in ("dpo", "simpo")}
    return "\n\n".join(
        [
            "True reward at matched KL:",
            _matched_tables(groups, "eval/reward/policy", levels, against),
            "Length (tokens) at matched KL:",
            _matched_tables(groups, "eval/length/policy", levels, against, digits=1),
            CAPTION,
            "<details><summary>Every arm and β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


def kto_binary(runs: dict[str, list[Run]], out: Path) -> str:
    groups = {"DPO, pairs": [r for r in runs["beta_frontier"] if r.get("loss.name") == "dpo"]}
    for (arm,), g in by(runs["kto_binary"], "arm").items():
        groups[{"kto_pairs": "KTO, pairs split", "kto_binary": "KTO, thumbs up/down"}[arm]] = g
    groups = {k: v for k, v in groups.items() if v}
    levels = _levels(groups)
    _reward_figure(groups, runs["kto_binary"], out, "DPO and KTO over β (mean ± 95% CI)")
    steps = {
        name: sorted({int(r.summary.get("steps", -1)) for r in g}) for name, g in groups.items()
    }
    against = {k: "DPO, pairs" for k in groups if k != "DPO, pairs"}
    return "\n\n".join(
        [
            "True reward at matched KL:",
            _matched_tables(groups, "eval/reward/policy", levels, against),
            "Optimizer steps: "
            + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in steps.items()),
            CAPTION,
            "<details><summary>Every arm and β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


def online_vs_offline(runs: dict[str, list[Run]], out: Path) -> str:
    groups = {
        "offline DPO": [r for r in runs["beta_frontier"] if r.get("loss.name") == "dpo"],
        "online DPO": runs["online_vs_offline"],
    }
    groups = {k: v for k, v in groups.items() if v}
    levels = _levels(groups)
    _reward_figure(
        groups,
        runs["online_vs_offline"] or runs["beta_frontier"],
        out,
        "Online vs offline DPO (mean ± 95% CI)",
    )
    online = groups.get("online DPO", [])
    budget = ""
    if online:
        offline = groups.get("offline DPO", [])
        epochs = {r.get("trainer.max_epochs") for r in offline}
        budget = (
            f"Pairs trained on: online {fmt([r['online/pairs_total'] for r in online], 0)} a run; "
            f"offline {'/'.join(map(str, sorted(epochs)))} epochs of the task's 2000 pairs."
        )
    return "\n\n".join(
        [
            "True reward at matched KL:",
            _matched_tables(
                groups, "eval/reward/policy", levels, {"online DPO": "offline DPO"}, first="algo"
            ),
            "Length (tokens) at matched KL:",
            _matched_tables(groups, "eval/length/policy", levels, first="algo", digits=1),
            budget,
            CAPTION,
            "<details><summary>Every β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


@functools.cache
def _closed_form_task(source: str):
    """The closed-form task of a run's ``dataset.source`` (JSON), rebuilt once per source."""
    import transformers

    from dpo_lab.tasks.closed_form import load

    transformers.utils.logging.disable_progress_bar()
    settings = {k: v for k, v in json.loads(source).items() if k != "_target_"}
    return load(**settings)


def bt_mle_floor(run: Run, beta: float) -> float | None:
    """KL(π̂‖π*) of the tabular policy the training labels identify: per prompt, the
    Bradley-Terry maximum-likelihood scores ŝ of its labelled pairs, π̂ ∝ π_ref·exp(ŝ/β), each
    prompt's set on its own. It is where DPO lands if it fits each prompt's labels exactly as a
    table would; a model shared across prompts can land closer to π* (it pools evidence) or
    further (it may not fit), so this is a reference point, not a bound. (π_ref is read from
    closed_form_final.csv, 6 decimals.) None when the run's task cannot be rebuilt."""
    import torch

    source = run.get("dataset.source")
    if not source or not (run.path / "closed_form_final.csv").exists():
        return None
    data = _closed_form_task(json.dumps(source, sort_keys=True))
    o = data.oracle
    where = {(p, y): (i, j) for i, p in enumerate(o.prompts) for j, y in enumerate(o.responses[i])}
    P, K = o.rewards.shape
    ref = torch.full((P, K), 1e-9, dtype=torch.float64)
    with open(run.path / "closed_form_final.csv", newline="") as f:
        for r in csv.DictReader(f):
            i, j = where[(r["prompt"], r["response"])]
            ref[i, j] = max(float(r["pi_ref"]), 1e-9)
    ref = ref.log()
    pairs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in data.train:
        i, w = where[(r["prompt"], r["chosen"])]
        pairs[i].append((w, where[(r["prompt"], r["rejected"])][1]))
    kls = []
    for i in range(P):
        score = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        win = torch.tensor([w for w, _ in pairs[i]])
        lose = torch.tensor([lo for _, lo in pairs[i]])
        opt = torch.optim.LBFGS([score], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure(score=score, win=win, lose=lose, opt=opt):
            opt.zero_grad()
            nll = -torch.nn.functional.logsigmoid(score[win] - score[lose]).sum()
            loss = nll + 1e-6 * (score**2).sum()  # a whisker of ridge: scores are up to a shift
            loss.backward()
            return loss

        opt.step(closure)
        star = (ref[i] + o.rewards[i] / beta).log_softmax(-1)
        mle = (ref[i] + score.detach() / beta).log_softmax(-1)
        kls.append((mle.exp() * (mle - star)).sum().item())
    return statistics.fmean(kls)


def closed_form(runs: dict[str, list[Run]], out: Path) -> str:
    plt, fig, (ax1, ax2) = _figure(2)
    rows = []
    for (beta,), g in sorted(by(runs["closed_form"], "beta").items()):
        curves, first, last, floors = [], [], [], []
        for r in g:
            with open(r.path / "closed_form.csv", newline="") as f:
                curve = list(csv.DictReader(f))
            curves.append({int(c["step"]): float(c["kl_to_optimal"]) for c in curve})
            first.append(curve[0])
            last.append(curve[-1])
            floors.append(bt_mle_floor(r, beta))
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [ci95([c[s] for c in curves]) for s in steps]
        m = [x[0] for x in stats]
        h = [0 if math.isnan(x[1]) else x[1] for x in stats]
        (line,) = ax1.plot(steps, m, label=f"β={beta:g}")
        ax1.fill_between(
            steps,
            [max(a - b, 1e-6) for a, b in zip(m, h, strict=True)],
            [a + b for a, b in zip(m, h, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
        with open(g[0].path / "closed_form_final.csv", newline="") as f:
            final = list(csv.DictReader(f))
        by_prompt: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in final:
            by_prompt[r["prompt"]].append((float(r["reward"]), float(r["implicit_reward"])))
        xs, ys = [], []
        for pairs in by_prompt.values():  # centre per prompt: DPO identifies r up to c(x)
            mr = statistics.fmean(r for r, _ in pairs)
            mi = statistics.fmean(i for _, i in pairs)
            xs += [r - mr for r, _ in pairs]
            ys += [i - mi for _, i in pairs]
        ax2.scatter(xs, ys, s=8, alpha=0.6, label=f"β={beta:g} (seed {g[0].get('seed')})")

        def col(rows_, key):
            return [float(x[key]) for x in rows_]

        rows.append(
            [
                f"{beta:g}",
                str(steps[-1]),
                fmt(col(first, "kl_to_optimal")),
                fmt(col(last, "kl_to_optimal")),
                fmt([f for f in floors if f is not None]),
                fmt(
                    [
                        float(x["kl_to_optimal"]) - f
                        for x, f in zip(last, floors, strict=True)
                        if f is not None
                    ],
                    signed=True,
                ),
                fmt(col(last, "kl_to_reference")),
                fmt(col(last, "reward_corr")),
                fmt(col(last, "reward_slope"), 2),
                str(len(g)),
            ]
        )
    ax1.set_yscale("log")
    lim = max(abs(v) for v in ax2.get_xlim() + ax2.get_ylim())
    ax2.plot([-lim, lim], [-lim, lim], color="gray", ls="--", lw=1, label="y = x (exact)")
    finish_figure(
        fig,
        ax1,
        None,
        xlabel="training step",
        ylabel="KL(π̄_θ ‖ π̄*), nats (log scale)",
        title="Distance to the exact DPO optimum (mean ± 95% CI)",
    )
    finish_figure(
        fig,
        ax2,
        out,
        xlabel="true reward r, centred per prompt",
        ylabel="β·log π_θ/π_ref, centred per prompt",
        title="Implicit reward vs true reward (end)",
    )
    header = ["β", "steps", "KL to π* at start", "KL to π* at end", "tabular BT-MLE", "end − MLE"]
    return table([*header, "KL to π_ref", "corr", "slope", "label draws"], rows)


REAL_SAMPLES = 4  # sample reviews shown, before and after


def _user_text(prompt: Any) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def _cell_text(text: str, width: int = 110) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def real_sentiment(runs: dict[str, list[Run]], out: Path) -> str:
    """SmolLM2-135M: the reward-vs-KL frontier of DPO and IPO over β, their chosen and rejected
    log-ratio trajectories, and sample reviews before and after. Every run is kept (its capped
    share shown): SmolLM2 at temperature 1 runs past the cap on some prompts, reference and
    policy alike, so the toy studies' 1% rule would leave every run out."""
    groups = {loss: g for (loss,), g in by(runs["real_sentiment"], "loss.name").items()}
    plt, fig, axes = _figure(3)
    colors = {"dpo": "tab:blue", "ipo": "tab:orange"}
    ax = axes[0]
    for name, g in groups.items():  # keep=list: every run (see the docstring)
        _errorbar_frontier(
            ax, g, "eval/reward/policy", name, keep=list, annotate=True, color=colors.get(name)
        )
    _reference_line(ax, runs["real_sentiment"], "reference (SmolLM2 as released)")
    ax.set_xscale("log")
    finish_figure(
        fig,
        ax,
        None,
        xlabel="KL(π‖π_ref), nats (log scale)",
        ylabel="true reward of policy samples",
        title="SmolLM2-135M: reward vs KL (mean ± 95% CI)",
    )
    styles = {0: "-", 1: "--"}
    series = {
        f"{name} β={beta:g}": (gb, {"color": colors.get(name), "ls": styles.get(i, ":")}, False)
        for name, g in groups.items()
        for i, ((beta,), gb) in enumerate(sorted(by(g, "beta").items()))
    }
    _logratio_panels(fig, axes[1:], series, out, "responses (mean over seeds)")
    rows = []
    for name, g in groups.items():
        for (beta,), gb in sorted(by(g, "beta").items()):
            n = len(gb)
            rows.append(
                [
                    name,
                    f"{beta:g}",
                    fmt([r["eval/reward/policy"] for r in gb], 3, n),
                    fmt_kl([r["eval/kl"] for r in gb], n),
                    fmt([r["probe/logratios/chosen"] for r in gb], 2, n),
                    fmt([r["probe/logratios/rejected"] for r in gb], 2, n),
                    fmt([r["probe/frac_chosen_below_ref"] for r in gb], 2, n),
                    fmt([r["eval/length/policy"] for r in gb], 1, n),
                    fmt([r["eval/capped_frac/policy"] for r in gb], 2, n),
                    str(n),
                ]
            )
    allr = runs["real_sentiment"]
    rows.append(
        [
            "reference (SmolLM2 as released)",
            "—",
            fmt([r["eval/reward/reference"] for r in allr], 3),
            "0",
            "0",
            "0",
            "—",
            fmt([r["eval/length/reference"] for r in allr], 1),
            fmt([r["eval/capped_frac/reference"] for r in allr], 2),
            str(n_seeds(allr)),
        ]
    )
    header = ["loss", "β", "true reward π", "KL(π‖π_ref)", "Δ log π(y_c)", "Δ log π(y_r)"]
    header += ["chosen below ref", "length π", "capped π", "seeds"]
    body = table(header, rows)
    # sample reviews: seed 0's run with the highest true reward, its first prompts
    seed0 = [r for r in allr if r.get("seed") == 0] or allr
    best = max(seed0, key=lambda r: r["eval/reward/policy"])
    samples = [json.loads(x) for x in (best.path / "samples.jsonl").read_text().splitlines()]
    srows = [
        [
            _cell_text(_user_text(s["prompt"]), 60),
            f"{s['reference_reward']:+.2f} {_cell_text(s['reference'])}",
            f"{s['policy_reward']:+.2f} {_cell_text(s['policy'])}",
        ]
        for s in samples[:REAL_SAMPLES]
    ]
    body += (
        f"\n\nSample reviews (held-out prompts, temperature 1, true reward in front) from the "
        f"{best.get('loss.name')} β={best.get('beta'):g} run with seed 0, before (reference) "
        "and after (policy):\n\n" + table(["prompt", "before", "after"], srows)
    )
    return body + (
        "\n\nCells: mean ± 95% CI over seeds; KL as geometric mean ×/÷ its 95% factor; Δ log π: "
        "the probe pairs' mean log-ratio to the reference at the end; capped: the share of "
        "policy samples that reached the cap unfinished (their reward and KL are those of "
        "prefixes). No run is left out."
    )


REFERENCE_FREE = ("simpo", "alphapo", "orpo", "cpo")


def covering_levels(
    ranges: list[tuple[float, float]], n: int = 4, apart: float = 2.0, inset: float = 1.2
):
    """Up to ``n`` KL levels, greedily each the one inside the most of ``ranges`` not yet given a
    level (once every range has one, the most of all of them; ties: nearer KL 1), at least
    ``apart``× from the others after rounding (2 significant digits, more where needed to stay
    inside the ranges it was chosen for); sorted. Each range is first drawn in by ``inset``× at
    both ends (a narrow one to the middle half of its log width): a range runs between per-β
    median KLs, so at its very ends about half the seeds' own frontiers stop short. A range
    that no level can reach, apart from the others, is passed over. Where frontiers are short
    and spread over a wide KL range (a loss zoo over one β grid): as few levels as give every
    frontier one, then more where most of them reach."""
    inner = []
    for lo, hi in ranges:
        k = min(inset, (hi / lo) ** 0.25)  # a narrow range keeps half its (log) width
        inner.append((lo * k, hi / k))
    candidates = {x for lo, hi in inner for x in (lo, hi, math.sqrt(lo * hi))}
    nice = {m * 10.0**e for e in range(-3, 3) for m in (1, 1.5, 2, 3, 5, 7)}
    grid = sorted(nice | candidates)
    left: list[tuple[float, float]] = []
    levels: list[float] = []
    while inner and len(levels) < n:
        left = left or list(inner)  # every range has a level: more where most of them reach

        def spaced(x: float) -> bool:
            return all(max(x / y, y / x) >= apart for y in levels)

        best = None

        def rank(x: float, pool: list = left) -> tuple[int, float]:
            return (-sum(lo <= x <= hi for lo, hi in pool), abs(math.log(x)))

        for kl in sorted(grid, key=rank):
            inside = [(lo, hi) for lo, hi in left if lo <= kl <= hi]
            if not inside:
                break
            level = _round_within(kl, max(r[0] for r in inside), min(r[1] for r in inside))
            if spaced(level):
                best = (level, inside)
                break
        if best is None:  # no level reaches these apart from the others: pass them over
            inner = [r for r in inner if r not in left]
            left = []
            continue
        levels.append(best[0])
        left = [r for r in left if r not in best[1]]
    return sorted(levels)


def loss_zoo(runs: dict[str, list[Run]], out: Path) -> str:
    """The leaderboard: every paired loss (and every option, on DPO) ranked by its best true
    reward over its β grid (mean over seeds, among the β none of whose runs the cap censored),
    with that β's KL; and its true reward read off its
    own frontier at matched KL levels (``covering_levels``: as few levels as give most losses
    one), with the displacement (share of the probe's chosen completions below the reference)
    and the sample length at the level nearest KL 1 it reaches; one frontier figure."""
    all_runs = [r for sweep in READS["loss_zoo"] for r in runs[sweep]]
    # a loss, or an option on one (loss_zoo_options' arms: dpo_wpo, mpo, tr_dpo, ...)
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in all_runs:
        groups[r.arm or r.get("loss.name")].append(r)
    metric = "eval/reward/policy"
    ranges = {n: rng for n, g in groups.items() if (rng := kl_range(g, metric))}
    levels = [  # a level only one frontier reaches compares nothing
        kl
        for kl in covering_levels(list(ranges.values()), n=6)
        if sum(_covers(g, metric, kl) for g in groups.values()) > 1
    ]

    def best(g: list[Run]) -> tuple[float, float, list[Run], int]:
        """(mean reward, β, usable runs, runs) of the β with the best mean reward among the β
        whose every run is usable (not censored by the cap); only where no β is, among the
        usable runs of each, the cell then saying over how many seeds (n=)."""
        per_beta = [(beta, b, usable(b)) for (beta,), b in by(g, "beta").items()]
        clean = [(beta, b, u) for beta, b, u in per_beta if u and len(u) == len(b)]
        options = [
            (statistics.fmean(r[metric] for r in u), beta, u, len(b))
            for beta, b, u in (clean or [x for x in per_beta if x[2]])
            if all(math.isfinite(r[metric]) for r in u)
        ]
        return max(options, key=lambda o: o[0], default=(-math.inf, math.nan, [], 0))

    order = sorted(groups, key=lambda n: (-best(groups[n])[0], n))
    rows = []
    for name in order:
        g = groups[name]
        top, beta, top_runs, k = best(g)
        reached = [kl for kl in levels if _covers(g, metric, kl)]
        at = min(reached, key=lambda kl: abs(math.log(kl)), default=None)
        side = (
            [
                f"{_cell(g, 'probe/frac_chosen_below_ref', at, 2)} @ {at:g}",
                f"{_cell(g, 'eval/length/policy', at, 1)} @ {at:g}",
            ]
            if at is not None
            else ["—", "—"]
        )
        rng = ranges.get(name)
        rows.append(
            [
                name,
                "free" if name in REFERENCE_FREE else "π_ref",
                "—" if not top_runs else fmt([r[metric] for r in top_runs], 3, k),
                "—" if not top_runs else f"{beta:g}",
                "—" if not top_runs else fmt_kl([r["eval/kl"] for r in top_runs], k),
                *(_cell(g, metric, kl) for kl in levels),
                *side,
                "—" if rng is None else f"{rng[0]:.2g}–{rng[1]:.2g}",
                _capped(usable(g)),
                _left_out(g),
                str(n_seeds(g)),
            ]
        )
    header = [
        "loss",
        "reference",
        "best reward",
        "at β",
        "its KL",
        *(f"reward @ KL = {kl:g}" for kl in levels),
        "chosen below ref",
        "length",
        "KL range",
        "capped",
        "left out",
        "seeds",
    ]
    _zoo_figure(groups, all_runs, out)
    ref = [r["eval/reward/reference"] for r in all_runs]
    reach = ", ".join(
        f"{kl:g}: {sum(_covers(g, metric, kl) for g in groups.values())}" for kl in levels
    )
    return "\n\n".join(
        [
            f"{len(groups)} losses and options, ranked by the best mean true reward over their β "
            f"grid (its β and KL beside it); the reference (SFT) model's reward is "
            f"{statistics.fmean(ref):.3f}. The reward at matched KL compares like with like "
            f"where frontiers meet; levels and how many frontiers reach each: {reach}. Chosen "
            "below ref and length: at the level nearest KL 1 that the row's frontier reaches.",
            table(header, rows),
            CAPTION + " A frontier that does not reach a level has no value there (—).",
            "<details><summary>Every loss and β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


def _zoo_figure(groups: dict[str, list[Run]], reference: list[Run], out: Path) -> None:
    """Two panels of frontiers (losses with a reference; reference-free ones, with DPO's for
    comparison), the reference's reward dashed."""
    plt, fig, axes = _figure(2)
    panels = (
        [n for n in groups if n not in REFERENCE_FREE],
        ["dpo", *(n for n in groups if n in REFERENCE_FREE)],
    )
    cmap = plt.get_cmap("tab20")
    for ax, names, title in zip(
        axes, panels, ("with a reference", "reference-free (DPO for scale)"), strict=True
    ):
        for i, name in enumerate(n for n in names if n in groups):
            marker = "os^v"[(i // 20) % 4]  # 20 colours, then another marker
            style = {"color": cmap(i % 20), "lw": 1, "ms": 3, "marker": marker}
            if name == "dpo":
                style |= {"color": "black", "lw": 2}
            _errorbar_frontier(ax, groups[name], "eval/reward/policy", name, **style)
        _reference_line(ax, reference)
        ax.set_xscale("log")
        finish_figure(
            fig,
            ax,
            out if ax is axes[-1] else None,
            xlabel="KL(π‖π_ref), nats (log scale)",
            ylabel="true reward of policy samples",
            title=f"Loss zoo, {title}",
            legend_size=6,
        )


# ---------------------------------------------------------------------------------------------
# RLHF: a reward model and RL (RLOO, PPO) against DPO on the same task
# ---------------------------------------------------------------------------------------------

RLHF_ARMS = {
    "rloo_rm": "RLOO, reward model",
    "ppo_rm": "PPO, reward model",
    "rloo_true": "RLOO, true reward",
}


def rl_curves(run: Run, keys: tuple[str, ...] = ("rl/kl", "rl/score", "rl/true_reward")):
    """Per logged rollout of an RL run (metrics.csv): step and ``keys``; [] without the file
    (a run logged elsewhere, e.g. W&B only)."""
    if not (run.path / "metrics.csv").exists():
        return []
    with open(run.path / "metrics.csv", newline="") as f:
        return [
            {"step": float(r["step"]), **{k: float(r[k]) for k in keys}}
            for r in csv.DictReader(f)
            if all(r.get(k) not in (None, "") for k in keys)
        ]


def crossing(a: list[Run], b: list[Run], metric: str = "eval/reward/policy", n: int = 60) -> str:
    """Where frontier ``a`` crosses ``b`` inside the KL range both cover: on a log-KL grid, the
    paired difference a − b (each seed's own frontiers, as in ``_paired_cell``) averaged over
    one set of seeds (see below); the KLs where that mean changes sign (linear
    in log KL between grid points), or its sign throughout, with the smallest and largest mean
    difference and, at each, how many of those seeds' differences share its sign."""
    ra, rb = kl_range(a, metric), kl_range(b, metric)
    if not ra or not rb or max(ra[0], rb[0]) >= min(ra[1], rb[1]):
        return "no shared KL range"
    lo, hi = max(ra[0], rb[0]), min(ra[1], rb[1])
    grid = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    values = [(matched(a, metric, kl), matched(b, metric, kl)) for kl in grid]
    # one seed set along the whole comparison (a set that changed along the grid could flip the
    # mean's sign by itself): the seeds both frontiers have at the range's middle, over the part
    # of the grid where each of them has both (seeds' own frontiers stop short near the ends)
    seeds = set(values[n // 2][0]) & set(values[n // 2][1])
    if not seeds:
        return "no seed with both frontiers at the shared range's middle"
    pts = [
        (kl, statistics.fmean(diffs), diffs)
        for kl, (va, vb) in zip(grid, values, strict=True)
        if seeds <= set(va) & set(vb)
        for diffs in [[va[s] - vb[s] for s in sorted(seeds)]]
    ]
    cross = []
    for (k0, d0, _), (k1, d1, _) in zip(pts, pts[1:], strict=False):
        if d0 == 0 or d0 * d1 < 0:
            w = d0 / (d0 - d1) if d0 != d1 else 0.0
            cross.append(math.exp(math.log(k0) + w * (math.log(k1) - math.log(k0))))

    def agree(p: tuple) -> str:
        return f"{sum((d > 0) == (p[1] > 0) for d in p[2])} of {len(p[2])} seeds"

    low, high = min(pts, key=lambda p: p[1]), max(pts, key=lambda p: p[1])
    span = (
        f"KL {pts[0][0]:.2g}–{pts[-1][0]:.2g}; mean paired difference from {low[1]:+.3f} "
        f"(KL {low[0]:.2g}, {agree(low)}) to {high[1]:+.3f} (KL {high[0]:.2g}, {agree(high)})"
    )
    if cross:
        return f"crosses at KL ≈ {', '.join(f'{k:.2g}' for k in cross)} ({span})"
    return f"{'above' if pts[0][1] > 0 else 'below'} throughout ({span})"


def rlhf_vs_dpo(runs: dict[str, list[Run]], out: Path) -> str:
    """DPO's frontier over β (beta_frontier's DPO runs) against RLOO and PPO judged by a learned
    reward model and RLOO judged by the true reward, at matched KL; the reward model's and DPO's
    implicit reward's accuracy on the same held-out pairs."""
    metric = "eval/reward/policy"
    dpo = [r for r in runs["beta_frontier"] if r.get("loss.name") == "dpo"]
    rl = runs["rlhf_vs_dpo"] + runs["rlhf_vs_dpo_ppo"]
    groups = {"DPO": dpo}
    for arm, label in RLHF_ARMS.items():
        g = [r for r in rl if r.arm == arm]
        if g:
            groups[label] = g
    _reward_figure(groups, dpo + rl, out, "RLHF vs DPO: reward against KL over β (mean ± 95% CI)")
    levels = _levels(groups, 4)
    against = {name: "DPO" for name in groups if name != "DPO"}
    cross = [
        f"- {name} against DPO: {crossing(g, dpo)}" for name, g in groups.items() if g is not dpo
    ]
    rm = runs["rlhf_vs_dpo_rm"]
    acc_rows = [
        [
            "reward model (BT, 8 epochs)",
            "—",
            fmt([r["probe/true_accuracies"] for r in rm]),
            fmt([r["val/rm/true_accuracies"] for r in rm]),
            fmt([r["probe/rm/accuracies"] for r in rm]),
            str(len(rm)),
        ]
    ]
    for name, g in groups.items():
        if name == "DPO" or name.startswith("RLOO, true"):
            for (beta,), gb in sorted(by(g, "beta").items()):
                acc_rows.append(
                    [
                        f"{name}: β·log π/π_ref",
                        f"{beta:g}",
                        fmt([r["probe/true_accuracies"] for r in gb]),
                        "—",
                        fmt([r["probe/rewards/accuracies"] for r in gb]),
                        str(len(gb)),
                    ]
                )
    return "\n\n".join(
        [
            "True reward at matched KL:",
            _matched_tables(groups, metric, levels, against, first="route"),
            "Where each route's frontier crosses DPO's (paired by seed, inside the KL range both "
            "cover):",
            "\n".join(cross),
            "Is the language model secretly a reward model? Agreement with the true reward's "
            "ranking of the first 128 held-out pairs (ties left out), the learned reward "
            "model's score against each policy's implicit reward; labels: agreement with the "
            "pairs' (Bradley-Terry drawn) labels.",
            table(
                [
                    "scorer",
                    "β",
                    "true accuracy (128 probe pairs)",
                    "true accuracy (256 val)",
                    "label accuracy (128 probe pairs)",
                    "runs",
                ],
                acc_rows,
            ),
            CAPTION,
            "<details><summary>Every route and β</summary>",
            table(PER_BETA, _per_beta_rows(groups)),
            "</details>",
        ]
    )


NOISE_DPO_BETAS = (0.1, 1.0)
NOISE_SEEDS = (0, 1, 2)


def rlhf_noise(runs: dict[str, list[Run]], out: Path) -> str:
    """Per label-noise level: the reward model's and DPO's implicit reward's true accuracy on
    the 256 held-out pairs, and DPO's and RLOO's (against that level's reward model) true reward
    at a KL both frontiers reach."""
    metric = "eval/reward/policy"

    def noise(r: Run) -> float:
        return round(float(r.get("dataset.label_noise")), 3)

    dpo = [
        r
        for r in runs["label_noise"] + runs["rlhf_noise_dpo"]
        if (r.arm in (None, "dpo"))
        and r.get("loss.name") == "dpo"
        and r.get("beta") in NOISE_DPO_BETAS
        and r.get("seed") in NOISE_SEEDS
    ]
    rm, rloo = runs["rlhf_noise_rm"], runs["rlhf_noise"] + runs["rlhf_noise_b"]
    levels = sorted({noise(r) for r in rm})
    plt, fig, (ax1, ax2) = _figure(2)
    rows, curves = [], defaultdict(list)
    detail: dict[str, list[Run]] = {}
    for lv in levels:
        d = [r for r in dpo if noise(r) == lv]
        q = [r for r in rloo if noise(r) == lv]
        detail[f"noise {lv:g}, DPO"] = d
        detail[f"noise {lv:g}, RLOO (RM)"] = q
        m = [r for r in rm if noise(r) == lv]
        ranges = [kl_range(g, metric) for g in (d, q)]
        kl = None
        if all(ranges) and max(ranges[0][0], ranges[1][0]) < min(ranges[0][1], ranges[1][1]):
            lo, hi = max(ranges[0][0], ranges[1][0]), min(ranges[0][1], ranges[1][1])
            kl = _round_within(math.sqrt(lo * hi), lo, hi)
        accs = {"reward model": [r["probe/true_accuracies"] for r in m]}
        for beta in NOISE_DPO_BETAS:
            accs[f"DPO β={beta:g}"] = [
                r["probe/true_accuracies"] for r in d if r.get("beta") == beta
            ]
        for name, xs in accs.items():
            curves[name].append((lv, *ci95(xs)[:2]))
        row = [f"{lv:g}", *(fmt(xs, 3, len(NOISE_SEEDS)) for xs in accs.values())]
        if kl is None:
            row += ["—", "—", "—", "—"]
        else:
            row += [
                f"{kl:g}",
                _cell(d, metric, kl),
                _cell(q, metric, kl),
                _paired_cell(q, d, metric, kl),
            ]
        row += [fmt_kl([r["eval/kl"] for r in q if r.get("beta") == b]) for b in (0.01, 0.1)]
        for name, g in (("DPO", d), ("RLOO, reward model", q)):  # each β's own line
            for (beta,), gb in by(g, "beta").items():
                m, h, _ = ci95([r[metric] for r in gb])
                curves[f"route {name}, β={beta:g}"].append((lv, m, h))
        rows.append(row)
    panels = {
        ax1: ("reward model", *(f"DPO β={b:g}" for b in NOISE_DPO_BETAS)),
        ax2: sorted(k for k in curves if k.startswith("route ")),
    }
    for ax, names in panels.items():
        for name in names:
            pts = curves[name]
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                capsize=3,
                marker="o",
                label=name.removeprefix("route "),
            )
    finish_figure(
        fig,
        ax1,
        None,
        xlabel="share of training labels flipped",
        ylabel="true accuracy, 256 held-out pairs",
        title="Reward model vs DPO's implicit reward",
    )
    finish_figure(
        fig,
        ax2,
        out,
        xlabel="share of training labels flipped",
        ylabel="true reward of policy samples",
        title="True reward by route and β (KL in the table)",
    )
    header = [
        "noise",
        "RM true acc",
        *(f"DPO β={b:g} true acc" for b in NOISE_DPO_BETAS),
        "matched KL",
        "DPO reward",
        "RLOO(RM) reward",
        "RLOO − DPO (paired)",
        "RLOO KL β=0.01",
        "RLOO KL β=0.1",
    ]
    return "\n\n".join(
        [
            "Per noise level: true accuracy of each scorer on all 256 held-out pairs (ties left "
            "out), and each route's true reward at one KL inside both frontiers (the geometric "
            "middle of their overlap). DPO: β ∈ {0.1, 1}, at 0, 0.2 and 0.4 the label_noise "
            "study's runs (seeds 0–2), at 0.1 and 0.3 this study's; RLOO: β ∈ {0.01, 0.1}. Each "
            "seed's frontier has two points per route, so a matched value is a straight line "
            "between them (in log KL): a coarse comparison.",
            table(header, rows),
            CAPTION,
            "<details><summary>Every noise level, route and β</summary>",
            table(PER_BETA, _per_beta_rows(detail)),
            "</details>",
        ]
    )


def _binned(curves: list[list[dict[str, float]]], bins: int) -> list[dict[str, list[float]]]:
    """Rollout curves of several seeds averaged in ``bins`` equal step bins: per bin, each key's
    per-seed means, and ``_bin``, its index (bins some seed has no rollout in are left out)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    last = max(c[-1]["step"] for c in curves)
    out = []
    for b in range(bins):
        lo, hi = last * b / bins, last * (b + 1) / bins
        per_seed = [
            [r for r in c if lo <= r["step"] < hi or (b == bins - 1 and r["step"] == hi)]
            for c in curves
        ]
        if not all(per_seed):
            continue
        means = {
            k: [statistics.fmean(r[k] for r in rows) for rows in per_seed] for k in per_seed[0][0]
        }
        out.append({**means, "_bin": b})
    return out


OVEROPT_ARMS = {"rm250": "reward model, 250 pairs", "rm2000": "reward model, 2000 pairs"}


def overoptimization(runs: dict[str, list[Run]], out: Path) -> str:
    """RLOO at β = 0.001 against two reward models: the reward model's score and the true reward
    of each rollout against its KL (Gao et al. 2023's figure), seed by seed (their paths differ
    too much for a mean to describe), and by quarter of training, with each quarter's change
    from the one before paired by seed (no peak picked from noisy curves)."""
    rm_runs = runs["overoptimization_rm"]
    rl = runs["overoptimization"] + runs["overoptimization_b"]
    plt, fig, (ax1, ax2) = _figure(2)
    rows, seed_rows, end_rows = [], [], []
    for i, (arm, label) in enumerate(OVEROPT_ARMS.items()):
        g = sorted((r for r in rl if r.arm == arm), key=lambda r: r.get("seed"))
        curve_of = {r.path: c for r in g if (c := rl_curves(r))}  # each metrics.csv read once
        g = [r for r in g if r.path in curve_of]
        if not g:
            continue
        n = arm.removeprefix("rm")
        rms = {r.get("seed"): r for r in rm_runs if str(r.get("dataset.max_samples")) == n}
        color = plt.get_cmap("tab10")(i)
        for j, r in enumerate(g):
            binned = _binned([curve_of[r.path]], 24)
            x = [math.sqrt(max(b["rl/kl"][0], 0.0)) for b in binned]
            for ax, key in ((ax1, "rl/true_reward"), (ax2, "rl/score")):
                ax.plot(x, [b[key][0] for b in binned], color=color, ls=("-", "--", ":")[j % 3],
                        marker="o", ms=2, label=f"{label}, seed {r.get('seed')}")  # fmt: skip
            quarters = _binned([curve_of[r.path]], 4)
            rm = rms.get(r.get("seed"))
            seed_rows.append(
                [
                    label if j == 0 else "",
                    str(r.get("seed")),
                    "—" if rm is None else f"{rm['probe/true_accuracies']:.3f}",
                    " → ".join(f"{q['rl/kl'][0]:.3g}" for q in quarters),
                    " → ".join(f"{q['rl/score'][0]:.2f}" for q in quarters),
                    " → ".join(f"{q['rl/true_reward'][0]:.2f}" for q in quarters),
                ]
            )
        quarters = _binned([curve_of[r.path] for r in g], 4)
        for q, b in enumerate(quarters):
            prev = quarters[q - 1] if q and quarters[q - 1]["_bin"] == b["_bin"] - 1 else None

            def delta(key: str, b=b, prev=prev) -> str:
                if prev is None:
                    return "—"
                return fmt([u - v for u, v in zip(b[key], prev[key], strict=True)], signed=True)

            rows.append(
                [
                    label if q == 0 else "",
                    f"{b['_bin'] + 1}/4",
                    fmt_kl(b["rl/kl"]),
                    fmt(b["rl/score"]),
                    delta("rl/score"),
                    fmt(b["rl/true_reward"]),
                    delta("rl/true_reward"),
                ]
            )
        end_rows.append(
            [
                label,
                fmt([r["probe/true_accuracies"] for r in rms.values()]),
                fmt([r["eval/reward/policy"] for r in g]),
                fmt_kl([r["eval/kl"] for r in g]),
                fmt([r["eval/length/policy"] for r in g], 1),
                _capped(g),
                str(len(g)),
            ]
        )
    for ax, ylabel, fname in (
        (ax1, "true reward of the rollout's samples", None),
        (ax2, "reward model's score of the rollout's samples", out),
    ):
        finish_figure(
            fig,
            ax,
            fname,
            xlabel="√KL(π‖π_ref) of the rollout, √nats",
            ylabel=ylabel,
            title="RLOO at β = 0.001, each seed (24 bins of steps)",
            legend_size=6,
        )
    seed_header = ["judge", "seed", "its RM's true acc", "KL by quarter", "RM score by quarter",
                   "true reward by quarter"]  # fmt: skip
    header = ["judge", "quarter", "KL", "RM score", "Δ score", "true reward", "Δ true reward"]
    end_header = ["judge", "RM true acc (256 pairs)", "eval true reward", "eval KL",
                  "eval length", "capped", "seeds"]  # fmt: skip
    return "\n\n".join(
        [
            "Each seed: its reward model's true accuracy on the 256 held-out pairs, and its "
            "rollouts' KL, reward-model score and true reward, each quarter of training's mean.",
            table(seed_header, seed_rows),
            "Over seeds, each quarter, with its change from the quarter before paired by seed:",
            table(header, rows),
            "At the end: the final policies' held-out evaluation.",
            table(end_header, end_rows),
            "Cells: mean ± 95% CI over seeds; KL as geometric mean ×/÷ its 95% factor; capped: "
            "the largest share of a run's evaluation samples that hit the cap unfinished.",
        ]
    )


def closed_form_rl(runs: dict[str, list[Run]], out: Path) -> str:
    """KL(π̄‖π*) over training on the closed_form task: DPO (the closed_form study's runs)
    against RLOO with the true reward, per β."""
    plt, fig, (ax,) = _figure(1)
    rows = []
    colors = {}
    rl = runs["closed_form_rl"] + runs["closed_form_rl_b"]
    for route, group in (("DPO", runs["closed_form"]), ("RLOO", rl)):
        for (beta,), g in sorted(by(group, "beta").items()):
            curves, last, kept = [], [], []
            for r in g:
                path = r.path / "closed_form.csv"
                curve = []
                if path.exists():
                    with open(path, newline="") as f:
                        curve = list(csv.DictReader(f))
                if curve:  # a run without the oracle's rows (an old or cut run) is left out
                    curves.append({int(c["step"]): float(c["kl_to_optimal"]) for c in curve})
                    last.append(curve[-1])
                    kept.append(r)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            g = kept
            m = [statistics.fmean(c[s] for c in curves) for s in steps]
            style = {
                "ls": "-" if route == "DPO" else "--",
                "marker": "o" if route == "DPO" else "s",
                "ms": 3,
            }
            if beta in colors:
                style["color"] = colors[beta]
            (line,) = ax.plot(steps, m, label=f"{route} β={beta:g}", **style)
            colors[beta] = line.get_color()
            mins = [min(c.values()) for c in curves]
            rows.append(
                [
                    route,
                    f"{beta:g}",
                    str(steps[-1]),
                    fmt([c[steps[0]] for c in curves]),
                    fmt([float(x["kl_to_optimal"]) for x in last]),
                    fmt(mins),
                    # DPO learns from finite Bradley-Terry draws: its own floor (the tabular
                    # MLE's KL to π*); RLOO reads the true reward, which has none
                    fmt([f for r in g if (f := bt_mle_floor(r, beta)) is not None])
                    if route == "DPO"
                    else "—",
                    fmt([float(x["kl_to_reference"]) for x in last]),
                    fmt([float(x["reward_corr"]) for x in last]),
                    fmt([r["eval/reward/policy"] for r in g]),
                    fmt_kl([r["eval/kl"] for r in g]),
                    str(len(g)),
                ]
            )
    ax.set_yscale("log")
    finish_figure(
        fig,
        ax,
        out,
        xlabel="training step",
        ylabel="KL(π̄_θ ‖ π̄*) on the response sets, nats (log scale)",
        title="KL to π*: DPO (solid), RLOO on the true reward (dashed)",
    )
    header = [
        "route",
        "β",
        "steps",
        "KL to π* at start",
        "KL to π* at end",
        "lowest KL to π*",
        "tabular BT-MLE",
        "KL(π̄‖π̄_ref) end",
        "implicit-reward corr",
        "free-sampling true reward",
        "free-sampling KL",
        "seeds",
    ]
    return "\n\n".join(
        [
            "Per β, KL(π̄_θ‖π̄*) of the policy renormalized on each prompt's 6 responses, at the "
            "start, at the end and its lowest over training (means over seeds). Tabular BT-MLE: "
            "the KL to π* of the policy DPO's finite label draws identify (the closed_form "
            "study's floor); RLOO reads the true reward itself. Steps: DPO 8 epochs of 32 "
            "pairs a step, RLOO 4 epochs of 32 prompts × 4 samples a step. The free-sampling "
            "columns are the end-of-run evaluation (free generation, not the response sets).",
            table(header, rows),
            "Cells: mean ± 95% CI over seeds; KL as geometric mean ×/÷ its 95% factor.",
        ]
    )


STUDY_FNS = {
    f.__name__: f
    for f in (
        beta_frontier,
        displacement,
        label_noise,
        length_bias,
        kto_binary,
        closed_form,
        online_vs_offline,
        real_sentiment,
        loss_zoo,
        rlhf_vs_dpo,
        rlhf_noise,
        overoptimization,
        closed_form_rl,
    )
}
# A study's sweeps, where it runs more than one (each `experiment=<name>`; default: its own name)
SWEEPS = {
    "loss_zoo": ("loss_zoo", "loss_zoo_b", "loss_zoo_c", "loss_zoo_options"),
    "rlhf_vs_dpo": ("rlhf_vs_dpo_rm", "rlhf_vs_dpo", "rlhf_vs_dpo_ppo"),
    "rlhf_noise": ("rlhf_noise_rm", "rlhf_noise_dpo", "rlhf_noise", "rlhf_noise_b"),
    "overoptimization": ("overoptimization_rm", "overoptimization", "overoptimization_b"),
    "closed_form_rl": ("closed_form_rl", "closed_form_rl_b"),
}
# sweeps that read another sweep's output (RL judged by the reward models a *_rm sweep trained):
# they start once every sweep without a dependency has finished
AFTER = {
    "rlhf_vs_dpo": "rlhf_vs_dpo_rm",
    "rlhf_vs_dpo_ppo": "rlhf_vs_dpo_rm",
    "rlhf_noise": "rlhf_noise_rm",
    "rlhf_noise_b": "rlhf_noise_rm",
    "overoptimization": "overoptimization_rm",
    "overoptimization_b": "overoptimization_rm",
}  # fmt: skip
# the sweeps each study reads (its own, and the runs it shares)
READS = {
    "beta_frontier": ["beta_frontier"],
    "displacement": ["beta_frontier", "displacement"],
    "label_noise": ["label_noise"],
    "length_bias": ["beta_frontier", "length_bias"],
    "kto_binary": ["beta_frontier", "kto_binary"],
    "closed_form": ["closed_form"],
    "online_vs_offline": ["beta_frontier", "online_vs_offline"],
    "real_sentiment": ["real_sentiment"],
    "loss_zoo": list(SWEEPS["loss_zoo"]),
    "rlhf_vs_dpo": ["beta_frontier", *SWEEPS["rlhf_vs_dpo"]],
    "rlhf_noise": ["label_noise", *SWEEPS["rlhf_noise"]],
    "overoptimization": list(SWEEPS["overoptimization"]),
    "closed_form_rl": ["closed_form", *SWEEPS["closed_form_rl"]],
}


# ---------------------------------------------------------------------------------------------
# Running the sweeps
# ---------------------------------------------------------------------------------------------

# Longest first, so that two workers finish close together (job counts × about 10 s, online and
# closed-form jobs about 3× longer).
ORDER = (
    "loss_zoo",
    "rlhf_noise",
    "rlhf_vs_dpo",
    "overoptimization",
    "closed_form_rl",
    "label_noise",
    "beta_frontier",
    "online_vs_offline",
    "length_bias",
    "closed_form",
    "kto_binary",
    "displacement",
)


def run_sweeps(
    root: Path, studies: list[str], workers: int, extra: list[str]
) -> dict[str, tuple[int, float]]:
    """Run each study's sweep (``python -m dpo_lab.train -m experiment=<study>``) into
    ``root/<study>``, ``workers`` sweeps at a time, each with its share of the CPU threads.
    Returns each sweep's exit status and wall time in seconds (also in ``root/<study>/sweep.json``;
    a job that fails inside a sweep leaves ``failed.json`` in its run dir, see dpo_lab.report)."""
    import concurrent.futures
    import json
    import os
    import subprocess
    import time

    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def one(study: str) -> tuple[str, tuple[int, float]]:
        out = root / study
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "dpo_lab.train",
            "-m",
            f"experiment={study}",
            f"hydra.sweep.dir={out}",
            "trainer.enable_progress_bar=false",
            *extra,
        ]
        t0 = time.time()
        with open(out / "sweep.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.time() - t0
        (out / "sweep.json").write_text(
            json.dumps({"cmd": cmd, "returncode": rc, "wall_s": wall, "threads": threads})
        )
        print(f"[studies] {study}: exit {rc} in {wall / 60:.1f} min", flush=True)
        return study, (rc, wall)

    order = sorted(studies, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    sweeps = [sweep for study in order for sweep in SWEEPS.get(study, (study,))]
    # the runs a study reads from other studies (rlhf_vs_dpo: beta_frontier's DPO runs), where
    # root has none finished: run them too, first
    shared = [
        s
        for study in order
        for s in READS.get(study, [])
        if s not in sweeps and not _finished(root / s)
    ]
    sweeps = list(dict.fromkeys(shared + sweeps))
    results: dict[str, tuple[int, float]] = {}
    for phase in ([s for s in sweeps if s not in AFTER], [s for s in sweeps if s in AFTER]):
        ready = []
        for s in phase:
            need = AFTER.get(s)
            if need is not None and results.get(need, (0, 0.0))[0] != 0:
                print(f"[studies] {s}: skipped, {need} failed", flush=True)
                results[s] = (1, 0.0)
            else:
                ready.append(s)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results |= dict(pool.map(one, ready))
    return results


def _finished(sweep: Path) -> bool:
    """A sweep dir whose Hydra process finished (sweep.json with exit status 0)."""
    f = sweep / "sweep.json"
    return f.exists() and json.loads(f.read_text()).get("returncode") == 0


# ---------------------------------------------------------------------------------------------
# Report: tables to stdout and the README, figures to docs/
# ---------------------------------------------------------------------------------------------


def sweep_line(root: Path, study: str, runs: list[Run]) -> str:
    """What a table was made from: runs, seeds, and the sweeps' wall times (sweep.json; a study
    of several sweeps names each)."""
    sweeps = SWEEPS.get(study, (study,))
    infos = [
        (name, json.loads((root / name / "sweep.json").read_text()))
        for name in sweeps
        if (root / name / "sweep.json").exists()
    ]
    wall = ""
    if infos:
        threads = {s["threads"] for _, s in infos}
        per_job = f"{max(threads)} thread{'s' if max(threads) > 1 else ''} per job"
        if len(sweeps) == 1:
            wall = f", sweep wall time {infos[0][1]['wall_s'] / 60:.0f} min ({per_job})"
        else:
            each = ", ".join(f"{name} {s['wall_s'] / 60:.0f} min" for name, s in infos)
            wall = f", sweep wall times {each} ({per_job})"
    seeds = len({r.get("seed") for r in runs})
    return f"_{len(runs)} runs, {seeds} seeds{wall}._"


def replace_block(text: str, study: str, body: str) -> str:
    """``text`` with the lines between ``<!-- study:<study> -->`` and ``<!-- /study:<study> -->``
    replaced by ``body``."""
    start, end = f"<!-- study:{study} -->", f"<!-- /study:{study} -->"
    if start not in text or end not in text:
        raise SystemExit(f"studies.py: error: the README has no {start} … {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def report(root: Path, studies: list[str], docs: Path, readme: Path | None) -> int:
    """Each study's table (stdout, and its README block with ``readme``) and figure (``docs``).
    Refuses before writing anything if a README block or a sweep a study reads is missing."""
    needed = sorted({s for study in studies for s in READS[study]})
    runs = load_runs(root, needed)
    missing = sorted({s for study in studies for s in READS[study] if not runs.get(s)})
    if missing:
        print(
            f"studies.py: error: no finished runs under {root} for {', '.join(missing)} "
            f"(read by {', '.join(st for st in studies if set(READS[st]) & set(missing))})",
            file=sys.stderr,
        )
        return 2
    text = readme.read_text() if readme else None
    if text is not None:
        for study in studies:
            replace_block(text, study, "")  # every block is there before anything is written
    for study in studies:
        body = STUDY_FNS[study](runs, docs / f"{study}.png")
        mine = [r for sweep in SWEEPS.get(study, (study,)) for r in runs[sweep]]
        body = sweep_line(root, study, mine) + "\n\n" + body
        print(f"## {study}\n\n{body}\n")
        if text is not None:
            text = replace_block(text, study, body)
    if readme and text is not None:
        readme.write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["all", "run", "report", *STUDY_FNS])
    ap.add_argument("--root", type=Path, default=Path("multirun/studies"), help="sweep dirs")
    ap.add_argument("--only", nargs="*", choices=list(STUDY_FNS), default=list(ORDER))
    ap.add_argument("--workers", type=int, default=2, help="sweeps run side by side")
    ap.add_argument("--docs", type=Path, default=Path("docs"), help="where figures go")
    ap.add_argument("--readme", type=Path, default=None, help="rewrite its study blocks")
    args, extra = ap.parse_known_args(argv)
    if extra and args.what not in ("all", "run"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.what in ("all", "run"):
        results = run_sweeps(args.root, args.only, args.workers, extra)
        failed = [study for study, (rc, _) in results.items() if rc != 0]
        print(f"[studies] sweeps done: {sum(w for _, w in results.values()) / 60:.0f} min")
        if failed:  # a sweep whose Hydra process failed: its tables would be partial
            print(f"studies.py: error: sweep(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        if args.what == "run":
            return 0
        readme = args.readme or Path("README.md")
        return report(args.root, args.only, args.docs, readme)
    studies = args.only if args.what == "report" else [args.what]
    return report(args.root, studies, args.docs, args.readme)


if __name__ == "__main__":
    sys.exit(main())
