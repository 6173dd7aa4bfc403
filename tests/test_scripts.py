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
