"""Sweeps: a failing job is recorded and the others complete; the report builds from run dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SMALL


@pytest.mark.slow
def test_a_failing_job_does_not_end_the_sweep_and_the_report_lists_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_lab.train",
            "-m",
            *SMALL,
            "beta=0.1,0",
            "trainer.max_steps=2",
            "eval.num_prompts=4",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dpo_lab: job failed (ConfigError: beta must be a number > 0" in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    assert (jobs[0] / "summary.json").exists()  # beta=0.1 completed
    failure = json.loads((jobs[1] / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError" and "beta must be" in failure["error"]

    report = subprocess.run(
        [sys.executable, "-m", "dpo_lab.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    md = (sweep / "report.md").read_text()
    assert "2 jobs: 1 done, 1 failed, 0 incomplete." in md
    assert "| beta=0.1 | done |" in md
    assert "| beta=0 | failed |" in md and "ConfigError: beta must be a number > 0" in md
    assert (sweep / "report.csv").read_text().count("\n") == 3
    for fig in ("displacement.png", "frontier.png"):
        assert (sweep / fig).stat().st_size > 10_000


def test_report_on_a_dir_without_jobs(tmp_path):
    from dpo_lab.report import main

    assert main([str(tmp_path)]) == 2
