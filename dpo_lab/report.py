"""``python -m dpo_lab.report <sweep dir>``: a sweep's table and figures from its run dirs alone.

Reads every job dir of a Hydra multirun (``.hydra/overrides.yaml``, ``summary.json``,
``failed.json``, ``probe.csv``) — no W&B needed — and writes into the sweep dir:

- ``report.md`` and ``report.csv``: one row per job with the overrides that set it apart from
  the other jobs, its status (done, failed with its error, or incomplete) and final metrics;
- ``displacement.png``: each job's mean probe log-ratio of chosen (solid) and rejected (dashed)
  completions over training, so losses and β can be compared for preference displacement;
- ``frontier.png``: true reward of policy samples against KL(π‖π_ref), one point per job (the
  reward-vs-KL frontier across a β or loss sweep), with the reference's reward marked.

When the jobs logged to W&B and credentials exist, the table and figures are also logged as a
``report`` run in the sweep's W&B group (``--wandb offline|off`` to choose).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lab.plots import finish_figure

METRICS = (
    "val/rewards/accuracies",
    "probe/rewards/accuracies",
    "probe/true_accuracies",
    "eval/reward/policy",
    "eval/reward/reference",
    "eval/kl",
    "eval/length/policy",
    "probe/frac_chosen_below_ref",
    "wall_time_s",
)
# shown where some job has them: a reward model's run (algo=reward_model) evaluates no policy
EXTRA = ("val/rm/accuracies", "val/rm/true_accuracies")


@dataclass
class Job:
    path: Path
    overrides: str
    status: str  # done | failed | incomplete
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def collect(sweep: Path) -> list[Job]:
    """Every job dir under ``sweep`` (a dir holding ``.hydra/overrides.yaml``), in job order."""
    jobs = []
    dirs = sorted(
        (p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")),
        key=lambda d: (len(d.name.split("_")[0]), d.name),
    )
    lists = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or [] for d in dirs]
    shared = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    for d, overrides_list in zip(dirs, lists, strict=True):
        # label each job by what sets it apart from the others (the swept values)
        overrides = " ".join(o for o in overrides_list if o not in shared)
        if (d / "summary.json").exists():
            jobs.append(Job(d, overrides, "done", json.loads((d / "summary.json").read_text())))
        elif (d / "failed.json").exists():
            failure = json.loads((d / "failed.json").read_text())
            jobs.append(
                Job(d, overrides, "failed", error=f"{failure['error_type']}: {failure['error']}")
            )
        else:
            jobs.append(Job(d, overrides, "incomplete"))
    return jobs


def _override(job: Job, key: str) -> str | None:
    """The value ``job`` sets for ``key`` among its distinguishing overrides, if any."""
    for o in job.overrides.split():
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    return None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_tables(jobs: list[Job], sweep: Path) -> tuple[Path, Path]:
    metrics = [*METRICS, *(m for m in EXTRA if any(m in j.summary for j in jobs))]
    header = ["job", "overrides", "status", *metrics, "error"]
    rows = [
        [j.path.name, j.overrides, j.status, *(j.summary.get(m) for m in metrics), j.error]
        for j in jobs
    ]
    with open(sweep / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    done = sum(j.status == "done" for j in jobs)
    lines = [
        f"# Sweep report: {sweep}",
        "",
        f"{len(jobs)} jobs: {done} done, {sum(j.status == 'failed' for j in jobs)} failed, "
        f"{sum(j.status == 'incomplete' for j in jobs)} incomplete.",
        "",
        "| " + " | ".join(header[1:]) + " |",
        "|" + "---|" * (len(header) - 1),
    ]
    for r in rows:
        cells = [_fmt(c).replace("|", "\\|").replace("\n", " ") for c in r[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    (sweep / "report.md").write_text("\n".join(lines) + "\n")
    return sweep / "report.md", sweep / "report.csv"


def _probe_logratios(path: Path) -> tuple[list[int], list[float], list[float]]:
    by_step: dict[int, list[tuple[float, float]]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            c = float(r["policy_chosen_logps"]) - float(r["reference_chosen_logps"])
            rj = float(r["policy_rejected_logps"]) - float(r["reference_rejected_logps"])
            by_step.setdefault(int(r["step"]), []).append((c, rj))
    steps = sorted(by_step)
    chosen = [sum(c for c, _ in by_step[s]) / len(by_step[s]) for s in steps]
    rejected = [sum(r for _, r in by_step[s]) / len(by_step[s]) for s in steps]
    return steps, chosen, rejected


def write_figures(jobs: list[Job], sweep: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [j for j in jobs if j.status == "done"]
    out = []
    probed = [j for j in done if (j.path / "probe.csv").exists()]
    if probed:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for n, j in enumerate(probed):
            steps, chosen, rejected = _probe_logratios(j.path / "probe.csv")
            color = colors[n % len(colors)]
            ax.plot(steps, chosen, color=color, label=j.overrides or j.path.name)
            ax.plot(steps, rejected, color=color, ls="--")
        ax.axhline(0, color="gray", lw=1)
        out.append(
            finish_figure(
                fig,
                ax,
                sweep / "displacement.png",
                xlabel="training step",
                ylabel="mean log π − log π_ref on the probe set",
                title="Displacement: chosen (solid) and rejected (dashed)",
                legend_size=7,
            )
        )
    evaluated = [j for j in done if "eval/kl" in j.summary and "eval/reward/policy" in j.summary]
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        groups: dict[str, list[Job]] = {}
        for j in evaluated:  # one curve per loss when the sweep varies the loss
            groups.setdefault(_override(j, "loss") or "", []).append(j)
        for name, group in groups.items():
            group.sort(key=lambda j: j.summary["eval/kl"])
            xs = [j.summary["eval/kl"] for j in group]
            ys = [j.summary["eval/reward/policy"] for j in group]
            ax.plot(xs, ys, marker="o", label=f"loss={name}" if name else None)
            for j, x, y in zip(group, xs, ys, strict=True):
                label = " ".join(o for o in j.overrides.split() if not o.startswith("loss="))
                ax.annotate(
                    label or j.path.name,
                    (x, y),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ref = [j.summary["eval/reward/reference"] for j in evaluated]
        ax.axhline(sum(ref) / len(ref), color="gray", ls="--", lw=1, label="reference")
        ax.set_xscale("symlog")
        out.append(
            finish_figure(
                fig,
                ax,
                sweep / "frontier.png",
                xlabel="KL(π‖π_ref), nats (symlog)",
                ylabel="true reward of policy samples",
                title="Reward against KL",
            )
        )
    return out


def _wandb_settings(jobs: list[Job]) -> dict[str, Any] | None:
    """The W&B logger settings the sweep's jobs ran with, if any job logged to W&B."""
    for j in jobs:
        cfg_file = j.path / ".hydra" / "config.yaml"
        if cfg_file.exists():
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
            wb = (cfg.get("logger") or {}).get("wandb")
            if wb:
                return wb
    return None


def upload(jobs: list[Job], sweep: Path, files: list[Path], mode: str) -> str | None:
    """Log the report (its table and figures) to W&B as one run of job_type ``report`` in the
    sweep's group, next to the sweep's runs. ``mode``: auto (online when the jobs logged to W&B
    and credentials exist, else nothing), online, offline, off. Returns the run's directory."""
    from dpo_lab.loggers import wandb_credentials

    settings = _wandb_settings(jobs)
    if mode == "off" or (mode == "auto" and not (settings and wandb_credentials())):
        return None
    import wandb

    run = wandb.init(
        project=(settings or {}).get("project") or "dpo_lab",
        entity=(settings or {}).get("entity"),
        group=(settings or {}).get("group") or sweep.name,  # the jobs' group (see train.py)
        job_type="report",
        name=f"report-{sweep.name}",
        dir=str(sweep),
        mode="offline" if mode == "offline" else "online",
        settings=wandb.Settings(silent=True),
    )
    with open(sweep / "report.csv", newline="") as f:
        rows = list(csv.reader(f))
    run.log(
        {
            "report/table": wandb.Table(columns=rows[0], data=rows[1:]),
            **{f"report/{p.stem}": wandb.Image(str(p)) for p in files},
        }
    )
    run.finish()
    return run.dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dpo_lab.report", description=__doc__.splitlines()[0]
    )
    ap.add_argument("sweep", type=Path, help="a Hydra multirun dir (multirun/<date>/<time>)")
    ap.add_argument(
        "--wandb",
        choices=("auto", "online", "offline", "off"),
        default="auto",
        help="log the table and figures to W&B (auto: when the jobs did and credentials exist)",
    )
    args = ap.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"dpo_lab.report: error: {args.sweep} is not a directory", file=sys.stderr)
        return 2
    jobs = collect(args.sweep)
    if not jobs:
        print(
            f"dpo_lab.report: error: no job dirs (*/.hydra/overrides.yaml) under {args.sweep}",
            file=sys.stderr,
        )
        return 2
    md, csv_path = write_tables(jobs, args.sweep)
    figures = write_figures(jobs, args.sweep)
    print(md.read_text())
    for p in (csv_path, *figures):
        print(p)
    where = upload(jobs, args.sweep, figures, args.wandb)
    if where:
        print(f"logged to W&B ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
