"""Figure and table of one study sweep (``experiment=<name>``), from its run dirs alone.

    python scripts/studies.py label_noise  multirun/<date>/<time> --out docs/label_noise.png
    python scripts/studies.py length_bias  multirun/<date>/<time> --out docs/length_bias.png
    python scripts/studies.py kto_binary   multirun/<date>/<time> --out docs/kto_binary.png
    python scripts/studies.py closed_form  multirun/<date>/<time> --out docs/closed_form.png

Prints a markdown table of the study's numbers (mean ± std over seeds where the sweep has
several) and writes the figure. ``python -m dpo_lab.report`` gives the generic per-job table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dpo_lab.plots import finish_figure
from dpo_lab.report import Job, collect


def _value(job: Job, key: str, default: str = "") -> str:
    for o in job.overrides.split():
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    return default


def _stat(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "—"
    m, s = _stat(xs)
    return f"{m:.3f} ± {s:.3f}" if len(xs) > 1 else f"{m:.3f}"


def _grouped(jobs: list[Job], *keys: str) -> dict[tuple[str, ...], list[Job]]:
    groups: dict[tuple[str, ...], list[Job]] = defaultdict(list)
    for j in jobs:
        groups[tuple(_value(j, k) for k in keys)].append(j)
    return dict(groups)


def _metric(group: list[Job], name: str) -> list[float]:
    return [j.summary[name] for j in group if name in j.summary]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2), dpi=120)
    return plt, fig, axes


COLUMNS = [
    ("probe/true_accuracies", "true acc"),
    ("probe/rewards/accuracies", "label acc"),
    ("eval/reward/policy", "reward π"),
    ("eval/kl", "KL"),
    ("eval/length/policy", "length π"),
    ("eval/length/reference", "length ref"),
]


def label_noise(jobs: list[Job], out: Path) -> str:
    arm_key = "+arm/label_noise"
    groups = _grouped(jobs, arm_key, "dataset.label_noise")
    arms = sorted({a for a, _ in groups}, key=["dpo", "cdpo", "robust_dpo", "ipo"].index)
    noises = sorted({float(n) for _, n in groups})
    plt, fig, (ax1, ax2) = _figure(2)
    for arm in arms:
        xs, acc, rew = [], [], []
        for n in noises:
            g = next((v for (a, k), v in groups.items() if a == arm and float(k) == n), [])
            if g:
                xs.append(n)
                acc.append(statistics.fmean(_metric(g, "probe/true_accuracies")))
                rew.append(statistics.fmean(_metric(g, "eval/reward/policy")))
        ax1.plot(xs, acc, marker="o", label=arm)
        ax2.plot(xs, rew, marker="o", label=arm)
    finish_figure(
        fig,
        ax1,
        None,
        xlabel="share of training labels flipped",
        ylabel="held-out accuracy vs the true reward",
        title="Clean-label accuracy (256 held-out pairs)",
    )
    finish_figure(
        fig,
        ax2,
        out,
        xlabel="share of training labels flipped",
        ylabel="true reward of policy samples",
        title="Reward of samples (128 held-out prompts)",
    )
    rows = []
    for (arm, n), g in sorted(
        groups.items(), key=lambda kv: (arms.index(kv[0][0]), float(kv[0][1]))
    ):
        rows.append([arm, n, *(_fmt(_metric(g, m)) for m, _ in COLUMNS[:4])])
    return _table(["loss", "label noise", *(c for _, c in COLUMNS[:4])], rows)


def length_bias(jobs: list[Job], out: Path) -> str:
    groups = _grouped(jobs, "loss", "dataset.source.length_bias")
    plt, fig, (ax1, ax2) = _figure(2)
    losses = sorted({loss for loss, _ in groups})
    biases = sorted({b for _, b in groups}, key=float)
    width = 0.8 / len(losses)
    for i, loss in enumerate(losses):
        for panel, metric in ((ax1, "eval/length/policy"), (ax2, "eval/reward/policy")):
            means, stds = [], []
            for b in biases:
                m, s = _stat(_metric(groups[(loss, b)], metric))
                means.append(m)
                stds.append(s)
            xs = [k + (i - (len(losses) - 1) / 2) * width for k in range(len(biases))]
            panel.bar(xs, means, width, yerr=stds, capsize=3, label=f"loss={loss}")
    ref_len = statistics.fmean(_metric(jobs, "eval/length/reference"))
    ax1.axhline(ref_len, color="gray", ls="--", lw=1, label="reference")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(biases)), [f"length_bias={b}" for b in biases])
    finish_figure(
        fig, ax1, None, xlabel="", ylabel="tokens per policy sample", title="Response length"
    )
    finish_figure(
        fig, ax2, out, xlabel="", ylabel="true reward of policy samples", title="True reward"
    )
    rows = [
        [loss, b, *(_fmt(_metric(groups[(loss, b)], m)) for m, _ in COLUMNS[2:])]
        for loss in losses
        for b in biases
    ]
    return _table(["loss", "length_bias", *(c for _, c in COLUMNS[2:])], rows)


def kto_binary(jobs: list[Job], out: Path) -> str:
    groups = _grouped(jobs, "+arm/kto_binary")
    order = [a for a in ("dpo_pairs", "kto_pairs", "kto_binary") if (a,) in groups]
    plt, fig, axes = _figure(3)
    for ax, (metric, label) in zip(
        axes,
        (
            ("eval/reward/policy", "true reward of policy samples"),
            ("eval/kl", "KL(π‖π_ref), nats"),
            ("eval/length/policy", "tokens per policy sample"),
        ),
        strict=True,
    ):
        stats = [_stat(_metric(groups[(a,)], metric)) for a in order]
        ax.bar(range(len(order)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3)
        ax.set_xticks(range(len(order)), order)
        finish_figure(
            fig,
            ax,
            out if ax is axes[-1] else None,
            xlabel="",
            ylabel=label,
            title=label.split(",")[0],
        )
    rows = [[a, *(_fmt(_metric(groups[(a,)], m)) for m, _ in COLUMNS)] for a in order]
    return _table(["arm", *(c for _, c in COLUMNS)], rows)


def bt_mle_floor(job: Job, beta: float) -> float | None:
    """KL(π̂‖π*) of the policy the training labels themselves identify: per prompt, the
    Bradley-Terry maximum-likelihood scores ŝ of its labelled pairs, π̂ ∝ π_ref·exp(ŝ/β). DPO run
    to convergence on these labels lands there, so this is the floor its finite data sets (π_ref
    read from closed_form_final.csv, 6 decimals). None when the job's task cannot be rebuilt."""
    import torch
    import yaml

    from dpo_lab.tasks.closed_form import load

    cfg_file = job.path / "config.yaml"
    if not cfg_file.exists():
        return None
    source = yaml.safe_load(cfg_file.read_text())["dataset"]["source"]
    data = load(**{k: v for k, v in source.items() if k != "_target_"})
    o = data.oracle
    where = {(p, y): (i, j) for i, p in enumerate(o.prompts) for j, y in enumerate(o.responses[i])}
    P, K = o.rewards.shape
    ref = torch.full((P, K), 1e-9, dtype=torch.float64)
    with open(job.path / "closed_form_final.csv", newline="") as f:
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


def closed_form(jobs: list[Job], out: Path) -> str:
    plt, fig, (ax1, ax2) = _figure(2)
    rows = []
    for j in sorted(jobs, key=lambda j: float(_value(j, "beta", "0") or 0)):
        beta = _value(j, "beta") or str(j.summary.get("beta"))
        with open(j.path / "closed_form.csv", newline="") as f:
            curve = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in curve]
        ax1.plot(steps, [float(r["kl_to_optimal"]) for r in curve], label=f"β={beta}")
        with open(j.path / "closed_form_final.csv", newline="") as f:
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
        ax2.scatter(xs, ys, s=8, alpha=0.6, label=f"β={beta}")
        first, last = curve[0], curve[-1]
        floor = bt_mle_floor(j, float(beta))
        rows.append(
            [
                beta,
                str(steps[-1]),
                f"{float(first['kl_to_optimal']):.3f}",
                f"{float(last['kl_to_optimal']):.3f}",
                "—" if floor is None else f"{floor:.3f}",
                f"{float(last['kl_to_reference']):.3f}",
                f"{float(last['reward_corr']):.3f}",
                f"{float(last['reward_slope']):.3f}",
                f"{j.summary.get('wall_time_s', float('nan')):.0f}",
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
        title="Distance to the exact DPO optimum",
    )
    finish_figure(
        fig,
        ax2,
        out,
        xlabel="true reward r, centred per prompt",
        ylabel="β·log π_θ/π_ref, centred per prompt",
        title="Implicit reward vs true reward (end)",
    )
    return _table(
        [
            "β",
            "steps",
            "KL to π* at start",
            "KL to π* at end",
            "BT-MLE floor",
            "KL to π_ref",
            "corr",
            "slope",
            "wall s",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Running the sweeps
# ---------------------------------------------------------------------------------------------

# Longest first, so that two workers finish close together (job counts × about 10 s, online and
# closed-form jobs about 3× longer).
ORDER = (
    "label_noise",
    "beta_frontier",
    "online_vs_offline",
    "length_bias",
    "closed_form",
    "kto_binary",
    "displacement",
)


def run_sweeps(root: Path, studies: list[str], workers: int, extra: list[str]) -> dict[str, float]:
    """Run each study's sweep (``python -m dpo_lab.train -m experiment=<study>``) into
    ``root/<study>``, ``workers`` sweeps at a time, each with its share of the CPU threads.
    Returns each sweep's wall time in seconds (also in ``root/<study>/sweep.json``)."""
    import concurrent.futures
    import json
    import os
    import subprocess
    import time

    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def one(study: str) -> tuple[str, float]:
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
        return study, wall

    order = sorted(studies, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, order))


STUDIES = {f.__name__: f for f in (label_noise, length_bias, kto_binary, closed_form)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        ap = argparse.ArgumentParser()
        ap.add_argument("run")
        ap.add_argument("--root", type=Path, default=Path("multirun/studies"))
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--only", nargs="*", default=list(ORDER))
        a, extra = ap.parse_known_args(argv)
        print(run_sweeps(a.root, a.only, a.workers, extra))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="figure path (default: in the sweep)")
    args = ap.parse_args(argv)
    jobs = [j for j in collect(args.sweep) if j.status == "done"]
    if not jobs:
        print(f"studies.py: error: no finished jobs under {args.sweep}", file=sys.stderr)
        return 2
    out = args.out or args.sweep / f"{args.study}.png"
    print(STUDIES[args.study](jobs, out))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
