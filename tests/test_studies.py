"""The studies' machinery: the closed-form task's exact checks, binary feedback, the length-biased
labeller, the clean-label probe accuracy, and the study figures."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_cfg
from test_task import SMALL as TASK  # the shrunk task build test_task uses

from dpo_lab.tasks import sentiment
from dpo_lab.tasks.closed_form import closed_form_metrics
from dpo_lab.train import train

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _studies():
    """scripts/studies.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("studies", SCRIPTS / "studies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["studies"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_closed_form_metrics_by_hand():
    # one prompt, two responses, π_ref = (1/2, 1/2), r = (1, 0), β = 1:
    # π* = (e, 1) / (e + 1), so KL(π_ref ‖ π*) = ½·log(½(e+1)/e) + ½·log(½(e+1))
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    r = torch.tensor([[1.0, 0.0]])
    e = math.e
    expected = 0.5 * math.log(0.5 * (e + 1) / e) + 0.5 * math.log(0.5 * (e + 1))
    m = closed_form_metrics(ref, ref, r, beta=1.0)
    assert m["closed_form/kl_to_optimal"] == pytest.approx(expected, abs=1e-12)
    assert m["closed_form/kl_to_reference"] == pytest.approx(0.0, abs=1e-12)
    # the DPO optimum, shifted by a per-prompt constant and with mass outside the set: exact
    ref = torch.log(torch.tensor([[0.2, 0.3, 0.1], [0.05, 0.5, 0.25]]))
    r = torch.tensor([[1.0, -0.5, 2.0], [0.0, 0.3, -1.0]])
    beta = 0.5
    optimum = ref + r / beta + torch.tensor([[-1.3], [0.7]])
    m = closed_form_metrics(optimum, ref, r, beta=beta)
    assert m["closed_form/kl_to_optimal"] == pytest.approx(0.0, abs=1e-6)
    assert m["closed_form/reward_corr"] == pytest.approx(1.0, abs=1e-6)
    assert m["closed_form/reward_slope"] == pytest.approx(1.0, abs=1e-6)
    # half the log-ratio: the implicit reward is r/2, still perfectly correlated, slope 1/2
    m = closed_form_metrics(ref + r / (2 * beta), ref, r, beta=beta)
    assert m["closed_form/reward_slope"] == pytest.approx(0.5, abs=1e-6)
    assert m["closed_form/reward_corr"] == pytest.approx(1.0, abs=1e-6)
    assert m["closed_form/kl_to_optimal"] > 0.01


@pytest.mark.slow
def test_closed_form_task_trains_and_logs_its_exact_checks(tmp_path):
    cfg = make_cfg(
        tmp_path / "cf",
        "dataset=closed_form",
        *(f"dataset.source.{k}={v}" for k, v in _small_source().items()),
        "dataset.source.closed_form.n_prompts=3",
        "dataset.source.closed_form.n_responses=3",
        "dataset.source.closed_form.repeats=2",
        "trainer.max_steps=3",
        "trainer.max_epochs=5",  # 3 prompts × 3 pairs × 2 labels = 18 pairs: 2 steps an epoch
        "probe.every_n_steps=1",
        "eval.num_prompts=4",
        "beta=1.0",
        "optim.scheduler=null",
        "model.lr=1e-2",
    )
    summary = train(cfg)
    out = Path(cfg.output_dir)
    with open(out / "closed_form.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [0, 1, 2, 3]
    assert float(curve[0]["kl_to_reference"]) == pytest.approx(0.0, abs=1e-9)  # starts at π_ref
    assert float(curve[-1]["kl_to_reference"]) > 0  # it moved
    with open(out / "closed_form_final.csv", newline="") as f:
        final = list(csv.DictReader(f))
    assert len(final) == 9  # 3 prompts × 3 responses
    for prompt in {r["prompt"] for r in final}:  # π, π* and π_ref are distributions per prompt
        for col in ("pi", "pi_star", "pi_ref"):
            assert sum(float(r[col]) for r in final if r["prompt"] == prompt) == pytest.approx(
                1.0, abs=1e-5
            )
    metrics = (out / "metrics.csv").read_text().splitlines()[0]
    assert "closed_form/kl_to_optimal" in metrics and "closed_form/reward_corr" in metrics
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2 and "eval/reward/policy" in summary  # 3 prompts × 2 samples


def _small_source() -> dict:
    from conftest import SMALL

    return {
        o.split("=")[0].removeprefix("dataset.source."): o.split("=")[1]
        for o in SMALL
        if o.startswith("dataset.source.")
    }


def test_binary_feedback_rates_each_completion_alone():
    rows = [
        {
            "id": "p1",
            "prompt": "x was",
            "chosen": "great .",
            "rejected": "dull .",
            "reward_chosen": 0.5,
            "reward_rejected": -0.5,
        },
        {
            "id": "p2",
            "prompt": "y was",
            "chosen": "fine .",
            "rejected": "awful .",
            "reward_chosen": -0.2,
            "reward_rejected": -0.6,
        },
    ]
    out = sentiment.binary_feedback(rows, temperature=1e-3, seed=0)  # T → 0: the reward's sign
    assert [(r["id"], r["completion"], r["label"]) for r in out] == [
        ("p1-chosen", "great .", True),
        ("p1-rejected", "dull .", False),
        ("p2-chosen", "fine .", False),  # chosen in its pair, but a bad review on its own
        ("p2-rejected", "awful .", False),
    ]
    warm = sentiment.binary_feedback(rows * 500, temperature=0.25, seed=0)
    ups = [r["label"] for r in warm if r["reward"] == 0.5]
    assert abs(sum(ups) / len(ups) - 1 / (1 + math.exp(-2))) < 0.05  # P(up) = σ(r/T)


def test_length_bias_makes_the_labeller_prefer_longer_completions():
    plain = json.loads((sentiment.build(**TASK) / "meta.json").read_text())
    biased = json.loads((sentiment.build(**TASK, length_bias=3.0) / "meta.json").read_text())
    assert "length_bias" not in plain["settings"]  # the default keeps its cache key
    assert biased["chosen_longer"]["train"] > plain["chosen_longer"]["train"] + 0.2


@pytest.mark.slow
def test_probe_true_accuracy_scores_against_the_true_reward(tmp_path):
    cfg = make_cfg(tmp_path / "run", "trainer.max_steps=2", "eval.num_prompts=0")
    summary = train(cfg)
    out = Path(cfg.output_dir)
    from dpo_lab.tasks.sentiment import load

    with open(out / "probe.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) == summary["steps"]]
    config = yaml.safe_load((out / "config.yaml").read_text())
    src = {k: v for k, v in config["dataset"]["source"].items() if k != "_target_"}
    val = {r["id"]: r for r in load(**src).val}
    agree = known = 0
    for r in rows:
        v = val[r["example_id"]]
        true = v["reward_chosen"] - v["reward_rejected"]
        if true == 0:
            continue
        implicit = (float(r["policy_chosen_logps"]) - float(r["reference_chosen_logps"])) - (
            float(r["policy_rejected_logps"]) - float(r["reference_rejected_logps"])
        )
        known += 1
        agree += (implicit > 0) == (true > 0)
    assert summary["probe/true_accuracies"] == pytest.approx(agree / known, abs=1e-6)


def _fake_run(
    root: Path,
    study: str,
    n: int,
    config: dict,
    overrides: list[str],
    summary: dict,
    metrics: str | None = None,
):
    d = root / study / f"{n}_job"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.csv").write_text(
        metrics
        or "step,probe/logratios/chosen,probe/logratios/rejected\n0,0,0\n10,-1,-2\n20,-2,-4\n"
    )
    if study.startswith("closed_form"):
        (d / "closed_form.csv").write_text(
            "step,kl_to_optimal,kl_to_reference,reward_corr,reward_slope\n"
            "0,0.5,0,nan,0\n10,0.05,0.3,0.9,0.95\n"
        )
        (d / "closed_form_final.csv").write_text(
            "prompt,response,reward,implicit_reward,pi,pi_star,pi_ref\n"
            "a,x,1.0,0.9,0.6,0.6,0.5\na,y,-1.0,-0.8,0.4,0.4,0.5\n"
        )
    return d


def _fake_sweeps(root: Path) -> None:
    """Two seeds × two or three β for every study's arms; KL = 1, 4, 16 over β, reward rising
    with KL by arm, so the matched-KL cells are known by hand."""
    n = 0

    def add(study, loss, beta, seed, kl, reward, arm=None, **cfg):
        nonlocal n
        capped = cfg.pop("capped", 0.0)
        metrics = cfg.pop("metrics", None)
        extra = cfg.pop("summary", {})
        config = {"loss": {"name": loss}, "beta": beta, "seed": seed, **cfg}
        overrides = [f"beta={beta}", f"seed={seed}"] + ([f"+arm/{study}={arm}"] if arm else [])
        summary = {
            "eval/reward/policy": reward,
            "eval/reward/reference": 0.0,
            "eval/kl": kl,
            "eval/length/policy": 10.0 + kl,
            "eval/capped_frac/policy": capped,
            "probe/true_accuracies": 0.5 + reward / 10,
            "probe/logratios/chosen": -1.0,
            "probe/logratios/rejected": -2.0,
            "probe/frac_chosen_below_ref": 0.8,
            "online/pairs_total": 5000,
            "steps": 189,
            **extra,
        }
        _fake_run(root, study, n, config, overrides, summary, metrics)
        n += 1

    grid = [(1.0, 1.0), (0.1, 4.0), (0.01, 16.0)]  # β, KL
    for seed in (0, 1):
        for beta, kl in grid:
            r = math.log2(kl) / 10 + seed / 100  # 0, 0.2, 0.4 (+ seed)
            for loss in ("dpo", "ipo"):
                add("beta_frontier", loss, beta, seed, kl, r)
            # one SimPO run ran away to the cap: it is left out of the frontiers
            capped = 0.5 if (seed, beta) == (1, 0.01) else 0.0
            add("beta_frontier", "simpo", beta, seed, kl, r, capped=capped)
            for loss in ("dpo", "simpo"):
                add("length_bias", loss, beta, seed, kl, r - 0.1)
            for arm in ("kto_pairs", "kto_binary"):
                add("kto_binary", "kto", beta, seed, kl, r + 0.05, arm=arm)
            add("online_vs_offline", "dpo", beta, seed, kl, r + 0.2, algo={"name": "online"})
            for arm in ("dpo", "ipo"):
                for noise in (0.0, 0.4):
                    add(
                        "label_noise",
                        arm,
                        beta,
                        seed,
                        kl,
                        r - noise,
                        arm=arm,
                        dataset={"label_noise": noise},
                    )
            for sweep, loss, offset in (
                ("loss_zoo", "dpo", 0.0),
                ("loss_zoo_b", "cpo", 0.1),
                ("loss_zoo_c", "simpo", -0.05),
            ):
                add(sweep, loss, beta, seed, kl, r + offset)
            add("loss_zoo_options", "dpo", beta, seed, kl, r + 0.05, arm="dpo_wpo")
        for loss in ("dpo", "dpop"):
            add("displacement", loss, 0.1, seed, 4.0, 0.3)
        for beta in (0.5, 1.0):
            add("closed_form", "dpo", beta, seed, 1.0, 0.1)
            rl_sweep = "closed_form_rl" if beta == 0.5 else "closed_form_rl_b"
            add(rl_sweep, "kl_regularized", beta, seed, 1.0, 0.3)
        # RLHF: reward models, then RL over β whose frontier lies 0.1 above DPO's (rloo_rm),
        # 0.1 below (ppo_rm); by noise level; overoptimization's rollout curves
        rm = {"probe/true_accuracies": 0.8, "val/rm/true_accuracies": 0.82,
              "probe/rm/accuracies": 0.7}  # fmt: skip
        add("rlhf_vs_dpo_rm", "bradley_terry", None, seed, 0.0, 0.0, summary=rm)
        for beta, kl in grid:
            r = math.log2(kl) / 10 + seed / 100
            add("rlhf_vs_dpo", "kl_regularized", beta, seed, kl, r + 0.1, arm="rloo_rm")
            add("rlhf_vs_dpo_ppo", "kl_regularized", beta, seed, kl, r - 0.1, arm="ppo_rm")
        for noise in (0.0, 0.1, 0.4):
            noisy = {"dataset": {"label_noise": noise}}
            add("rlhf_noise_rm", "bradley_terry", None, seed, 0.0, 0.0, summary=rm, **noisy)
            for beta, kl in grid:
                r = math.log2(kl) / 10 + seed / 100 - noise  # label_noise's fakes' reward
                if noise == 0.1:
                    add("rlhf_noise_dpo", "dpo", beta, seed, kl, r, **noisy)
                sweep = "rlhf_noise" if noise < 0.3 else "rlhf_noise_b"
                add(sweep, "kl_regularized", beta, seed, kl, r + 0.1, **noisy)
        for arm, n_pairs in (("rm250", 250), ("rm2000", 2000)):
            add("overoptimization_rm", "bradley_terry", None, seed, 0.0, 0.0, summary=rm,
                dataset={"max_samples": n_pairs})  # fmt: skip
            # KL grows with the step; the score rises throughout, the true reward peaks midway
            rows = [f"{t},{t / 10},{t / 100},{min(t, 80 - t) / 100}" for t in range(0, 81, 2)]
            curve = "step,rl/kl,rl/score,rl/true_reward\n" + "\n".join(rows) + "\n"
            sweep = "overoptimization" if arm == "rm250" else "overoptimization_b"
            add(sweep, "kl_regularized", 0.001, seed, 8.0, 0.2, arm=arm, metrics=curve)  # fmt: skip


@pytest.mark.parametrize(
    "study",
    [
        "beta_frontier",
        "displacement",
        "label_noise",
        "length_bias",
        "kto_binary",
        "closed_form",
        "online_vs_offline",
        "loss_zoo",
        "rlhf_vs_dpo",
        "rlhf_noise",
        "overoptimization",
        "closed_form_rl",
    ],
)
def test_study_tables_and_figures_build_from_run_dirs(tmp_path, study, capsys):
    _fake_sweeps(tmp_path)
    argv = [study, "--root", str(tmp_path), "--docs", str(tmp_path / "docs")]
    assert _studies().main(argv) == 0
    stdout = capsys.readouterr().out
    assert (tmp_path / "docs" / f"{study}.png").stat().st_size > 10_000
    rows = [x for x in stdout.splitlines() if x.startswith("| ")]
    assert len(rows) >= 3
    if study == "beta_frontier":
        per_beta = next(x for x in rows if x.startswith("| dpo | 0.1 |"))
        # reward 0.2 + seed/100 over seeds 0, 1: mean 0.205, t(1)·s/√2 = 12.706 × 0.00707 / √2
        assert "| 0.205 ± 0.064 | 4 ×/÷ 1.00 |" in per_beta
        # matched levels: the middles of 4 equal shares of [log 1, log 16]: √2, 2√2, 4√2, 8√2
        assert (
            "| loss | KL = 1.4 | KL = 2.8 | KL = 5.7 | KL = 11 | capped | left out | seeds |"
            in rows
        )
        dpo = next(x for x in rows if x.startswith("| dpo | ") and "×/÷" not in x)
        at = [math.log2(kl) / 10 + 0.005 for kl in (1.4, 2.8, 5.7, 11)]  # the frontier, by hand
        assert dpo.startswith("| dpo | " + " | ".join(f"{v:.3f} ± 0.064" for v in at) + " |")
        simpo = next(x for x in rows if x.startswith("| simpo | ") and "×/÷" not in x)
        assert simpo.endswith("| 0.000 | 1 | 2 |")  # the capped run: left out, counted
        assert "(n=1)" in simpo  # seed 1's frontier now stops at KL 4
        assert next(x for x in rows if x.startswith("| ipo − dpo |")).count("+0.000 ± 0.000") == 4
    if study == "loss_zoo":
        # the four sweeps read as one; ranked by the best mean reward over β (KL 16: 0.4 + 0.005
        # + the row's offset), an option on DPO its own row; every frontier spans KL 1–16,
        # drawn in to 1.2–13.3, so the levels are 1.2 (nearest KL 1), then, 2× apart, 3 and 7
        board = [x for x in rows if x.split(" | ")[1] in ("free", "π_ref")]
        assert [x.split(" | ")[0] for x in board] == ["| cpo", "| dpo_wpo", "| dpo", "| simpo"]
        head = (
            "| its KL | reward @ KL = 1.2 | reward @ KL = 3 | reward @ KL = 7 | chosen below ref |"
        )
        assert head in stdout
        at = [math.log2(kl) / 10 + 0.005 for kl in (1.2, 3, 7)]  # the frontier, by hand
        cells = " | ".join(f"{v + 0.1:.3f} ± 0.064" for v in at)
        assert board[0].startswith(f"| cpo | free | 0.505 ± 0.064 | 0.01 | 16 ×/÷ 1.00 | {cells} |")
        # displacement and length at 1.2 (length 10 + KL, in log KL: 11 + 3·log 1.2/log 4), the
        # KL range, nothing left out
        tail = "| 0.80 ± 0.00 @ 1.2 | 11.4 ± 0.0 @ 1.2 | 1–16 | 0.000 | 0 | 2 |"
        assert board[2].endswith(tail)
    if study == "rlhf_vs_dpo":
        # paired by seed the RL frontiers sit exactly ±0.1 from DPO's, at every KL both reach
        diffs = {x.split(" | ")[0]: x for x in rows if " − DPO |" in x}
        assert diffs["| RLOO, reward model − DPO"].count("+0.100 ± 0.000") == 4
        assert diffs["| PPO, reward model − DPO"].count("-0.100 ± 0.000") == 4
        assert "RLOO, reward model against DPO: above throughout" in stdout
        assert "PPO, reward model against DPO: below throughout" in stdout
    if study == "rlhf_noise":
        # at 0.1 (this study's DPO) and 0 and 0.4 (label_noise's): RLOO − DPO = +0.1, paired
        for lv in ("0", "0.1", "0.4"):
            level = next(x for x in rows if x.startswith(f"| {lv} |"))
            assert "+0.100 ± 0.000" in level, level
    if study == "overoptimization":
        # quarters of 0–80 steps: the true reward min(t, 80 − t)/100 rises, then falls; the
        # score t/100 rises throughout
        quarters = [x for x in rows if " | 1/4 | " in x or " | 4/4 | " in x]
        assert len(quarters) == 4
        last = next(x for x in rows if x.startswith("| reward model, 250 pairs") is False
                    and " | 4/4 | " in x)  # fmt: skip
        cells = last.split(" | ")
        assert cells[4].startswith("+") and cells[6].startswith("-")  # Δ score > 0, Δ true < 0


def test_ci95_by_hand():
    s = _studies()
    ci95, fmt, t975 = s.ci95, s.fmt, s.t975

    assert t975(4) == pytest.approx(2.776) and t975(100) == pytest.approx(1.984, abs=0.002)
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, s = √2.5 = 1.5811, s/√5 = 0.70711
    m, h, n = ci95(xs)
    assert (m, n) == (3.0, 5) and h == pytest.approx(2.776 * 0.70711, abs=1e-4)  # 1.96293
    assert fmt(xs, 2) == "3.00 ± 1.96"
    assert fmt([1.0, float("nan"), 3.0], 1, expect=3) == "2.0 ± 12.7 (n=2)"  # t(1)·√2/√2
    assert ci95([])[2] == 0 and math.isnan(ci95([2.0])[1])


def test_matched_kl_interpolates_in_log_kl_and_never_extrapolates():
    s = _studies()
    at_kl, levels_in = s.at_kl, s.levels_in

    pts = [(4.0, 0.4), (1.0, 0.0), (16.0, 0.6)]  # unsorted on purpose
    assert at_kl(pts, 2.0) == pytest.approx(0.2)  # half way in log KL between 1 and 4
    assert at_kl(pts, 8.0) == pytest.approx(0.5)
    assert at_kl(pts, 1.0) == pytest.approx(0.0) and at_kl(pts, 16.0) == pytest.approx(0.6)
    assert at_kl(pts, 0.5) is None and at_kl(pts, 20.0) is None
    # levels sit inside the intervals, never in the gap between them: [1, 4] and [16, 64] have
    # log lengths 2·ln 2 each; 4 levels at the middles of 4 equal shares: 1·√2, 2√2, 16√2, 32√2
    assert levels_in([(16.0, 64.0), (1.0, 4.0)], 4) == [1.4, 2.8, 23.0, 45.0]
    assert levels_in([(1.0, 2.0), (1.5, 4.0)], 1) == [2.0]  # overlapping: merged to [1, 4]
    assert levels_in([(3.0, 3.0)], 2) == [] and levels_in([], 3) == []


def test_kl_intervals_are_multiplicative():
    s = _studies()
    # logs of 1, e², e⁴: mean 2, s = 2, t(2) = 4.303: geometric mean e² ×/÷ e^(4.303·2/√3)
    cell = s.fmt_kl([1.0, math.e**2, math.e**4])
    assert cell == f"{math.e**2:.3g} ×/÷ {math.exp(4.303 * 2 / math.sqrt(3)):.2f}"
    assert s.fmt_kl([-0.1, 0.001]) == "0.001 ×/÷ 1.00"  # estimates ≤ 0 count as 1e-3


def test_report_rewrites_the_readme_blocks_and_refuses_a_missing_one(tmp_path, capsys):
    s = _studies()
    _fake_sweeps(tmp_path)
    readme = tmp_path / "README.md"
    text = "# x\n<!-- study:kto_binary -->\nold\n<!-- /study:kto_binary -->\ntail\n"
    readme.write_text(text)
    docs = tmp_path / "docs"
    assert s.report(tmp_path, ["kto_binary"], docs, readme) == 0
    new = readme.read_text()
    assert (
        "old" not in new and new.startswith("# x\n<!-- study:kto_binary -->\n_") and "tail" in new
    )
    assert "| KTO, thumbs up/down − DPO, pairs |" in new
    with pytest.raises(SystemExit, match="study:closed_form"):  # no block: nothing written
        s.report(tmp_path, ["kto_binary", "closed_form"], docs, readme)
    assert readme.read_text() == new
    (tmp_path / "beta_frontier").rename(tmp_path / "elsewhere")  # a sweep it reads is missing
    assert s.report(tmp_path, ["kto_binary"], docs, None) == 2
    assert "beta_frontier" in capsys.readouterr().err


def test_covering_levels_give_every_short_frontier_a_level():
    """Frontiers over one β grid can be short and far apart. Each range is drawn in 1.2× at both
    ends (0.36–0.5, 1.2–3.3, 2.4–6.7, 12–17). The first level sits where most of them meet (2.4:
    inside 1.2–3.3 and 2.4–6.7, the point nearest KL 1), then each frontier still without one
    gets one, 2× apart (0.5, its end nearest KL 1; then 12), then levels go where most reach
    (1.2: 1.2–3.3 alone, the others too near)."""
    ranges = [(0.3, 0.6), (1, 4), (2, 8), (10, 20)]
    assert _studies().covering_levels(ranges) == [0.5, 1.2, 2.4, 12]
    assert _studies().covering_levels(ranges, n=3) == [0.5, 2.4, 12]
    # a range no level can reach 2× from the others (0.72–0.78, near 1.2) is passed over, and
    # levels still go on where the others reach
    assert _studies().covering_levels([(1, 16), (0.7, 0.8)], n=4) == [1.2, 3, 7]
    assert _studies().covering_levels([]) == []
