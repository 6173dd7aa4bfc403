"""Sweeps: a failing job is recorded and the others complete; the report builds from run dirs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_a_failing_job_does_not_end_the_sweep_and_the_report_lists_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "beta=0.1,0",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert "dpo_lab: job failed (ConfigError: beta must be a number > 0" in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    assert (jobs[0] / "summary.json").exists()  # beta=0.1 completed
    failure = json.loads((jobs[1] / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError" and "beta must be" in failure["error"]

    report = subprocess.run(
        [sys.executable, "-m", "dpo_lab.report", str(sweep), "--wandb", "offline"],
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
    # the report as a W&B run (offline here): its table and both figures
    (run,) = (sweep / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert any((media / "table" / "report").glob("table_*.table.json"))
    assert {p.name.split("_")[0] for p in (media / "images" / "report").glob("*.png")} == {
        "displacement",
        "frontier",
    }


def test_report_on_a_dir_without_jobs(tmp_path):
    from dpo_lab.report import main

    assert main([str(tmp_path)]) == 2


@pytest.mark.slow
def test_optuna_preset_tunes_beta_and_lr(tmp_path):
    """hparams_search=optuna runs trials through the Optuna sweeper and records the best ones."""
    import yaml

    sweep = tmp_path / "optuna"
    run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"beta", "optim.optimizer.lr"}
    assert 0.02 <= results["best_params"]["beta"] <= 2.0
    assert 1e-4 <= results["best_params"]["optim.optimizer.lr"] <= 3e-3
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 2
    assert results["best_value"] == max(s["eval/reward/policy"] for s in summaries)
    assert {s["beta"] for s in summaries} != {0.1}  # the sampler chose the β, not the default


def wandb_records(path):
    """The records of an offline W&B run's transaction log (``run-*.wandb``): a LevelDB-style
    log of protobuf ``Record``s after a 7-byte file header, in 32 KiB blocks, each piece behind
    a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last). wandb's own reader
    is internal API and moves between versions; the protobuf definitions ship with it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, piece = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            yield record
            piece = b""


@pytest.mark.slow
def test_each_sweep_job_is_a_w_and_b_run_named_grouped_and_flat(tmp_path):
    """Each job of a W&B sweep is one run, named by its overrides, grouped by the sweep dir,
    with the flattened config (``loss.name``, ``beta``, ...) to filter on (offline here)."""
    import yaml

    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        "logger=wandb",
        "loss=dpo,ipo",
        "trainer.max_steps=1",
        "eval.num_prompts=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").exists())
    assert len(jobs) == 2
    seen = []
    for job in jobs:
        (log,) = job.glob("wandb/offline-run-*/*.wandb")  # one W&B run per job
        runs, config = [], {}
        for r in wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append(r.run)
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert {r.display_name for r in runs} == {",".join(sorted(overrides))}  # Hydra's name
        assert {r.run_group for r in runs} == {"sweep"}
        assert {r.run_id for r in runs} == {(job / "wandb_run_id").read_text()}
        assert config["beta"] == 0.1 and config["dataset.label_noise"] == 0.0
        assert "loss" not in config  # flattened: dotted keys, no nested blocks
        seen.append(config["loss.name"])
    assert sorted(seen) == ["dpo", "ipo"]
