"""The hand-run scripts still run: the benchmark's dpo_lab side (TRL is optional) and the plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow
def test_benchmark_dpo_lab_side_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "benchmark.py"),
            "--tools",
            "dpo_lab",
            "--modes",
            "live,precomputed,lora",
            "--vocab",
            "64",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--prompt",
            "4",
            "--completion",
            "6",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line
        for line in proc.stdout.splitlines()
        if line.startswith(("| live", "| precomputed", "| lora"))
    }
    assert set(rows) == {"live", "precomputed", "lora"}
    for line in rows.values():
        tokens_per_s = float(line.split("|")[2])
        assert tokens_per_s > 0
    assert "dpo_lab precomputed ÷ dpo_lab live" in proc.stdout


def test_online_vs_offline_report_from_run_dirs(tmp_path):
    import json

    import yaml

    for i, (algo, kl, reward) in enumerate([("offline", 10.0, 0.7), ("online", 50.0, 0.9)]):
        d = tmp_path / f"{i}_algo={algo}"
        d.mkdir()
        (d / "config.yaml").write_text(
            yaml.safe_dump({"algo": {"name": algo}, "seed": 0, "dataset": {"batch_size": 4}})
        )
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "steps": 3,
                    "eval/kl": kl,
                    "eval/reward/policy": reward,
                    "wall_time_s": 1.0,
                    "eval/reward/reference": 0.0,
                    "eval/length/policy": 9.0,
                    "probe/rewards/accuracies": 0.6,
                }
            )
        )
        (d / "metrics.csv").write_text("step,online/pairs_total\n0,4\n1,7\n2,\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "online_vs_offline.py"),
            str(tmp_path),
            "--out",
            str(tmp_path / "fig.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split("|")[1].strip(): line
        for line in proc.stdout.splitlines()
        if line.startswith("| o")
    }
    assert set(rows) == {"offline", "online"}
    assert "| 12.000 ± 0.000 |" in rows["offline"]  # pairs: 3 steps x batch 4
    assert "| 7.000 ± 0.000 |" in rows["online"]  # pairs: what the online run logged
    assert (tmp_path / "fig.png").stat().st_size > 10_000
