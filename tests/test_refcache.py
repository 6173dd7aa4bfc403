"""Precomputed reference log-probs: same training as a live reference, a named file reused across
runs and losses, checked against the data and weights it was made from, and the reference freed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_lab.errors import ConfigError
from dpo_lab.reference import CachedReference
from dpo_lab.train import build, check_config


def fit(cfg):
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


STEPS = ["trainer.max_steps=3", "eval.num_prompts=0"]


@pytest.mark.slow
def test_precomputed_matches_live_and_is_reused(cfg_factory, tmp_path):
    live = fit(cfg_factory(*STEPS))
    pre = fit(cfg_factory(*STEPS, "reference.precompute=true"))
    # the reference model is gone: the module looks its log-probs up
    assert isinstance(pre.module.reference, CachedReference) and pre.module.reference.model is None
    assert not any(k.startswith("reference.") for k in pre.module.state_dict())
    for k, v in live.module.policy.state_dict().items():
        torch.testing.assert_close(pre.module.policy.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    for k in ("train/loss", "train/rewards/margins"):
        assert float(pre.trainer.callback_metrics[k]) == pytest.approx(
            float(live.trainer.callback_metrics[k]), abs=1e-4
        )
    record = json.loads((Path(pre.cfg.output_dir) / "reference_cache.json").read_text())
    assert record["computed"] and Path(record["path"]).exists()
    # another run, another loss and β over the same data and reference: the same file, reused
    again = fit(cfg_factory(*STEPS, "reference.precompute=true", "loss=ipo", "beta=0.3"))
    record2 = json.loads((Path(again.cfg.output_dir) / "reference_cache.json").read_text())
    assert record2["path"] == record["path"] and not record2["computed"]


@pytest.mark.slow
def test_cache_is_checked_against_its_sources(cfg_factory, tmp_path):
    path = tmp_path / "ref.safetensors"
    fit(cfg_factory(*STEPS, "reference.precompute=true", f"reference.cache_path={path}"))
    assert path.exists()
    # other data (a different max_prompt_length changes the tokenized pairs): the named file
    # no longer matches, and is refused rather than silently used
    with pytest.raises(ConfigError, match=r"was made from different train_items"):
        fit(
            cfg_factory(
                *STEPS,
                "reference.precompute=true",
                f"reference.cache_path={path}",
                "dataset.max_prompt_length=4",
            )
        )
    # other reference weights: refused too
    with pytest.raises(ConfigError, match=r"reference_weights"):
        fit(
            cfg_factory(
                *STEPS,
                "reference.precompute=true",
                f"reference.cache_path={path}",
                "model.dtype=bfloat16",
            )
        )


def test_precompute_needs_a_paired_loss_with_a_reference(cfg_factory):
    with pytest.raises(ConfigError, match="loss=simpo uses no reference"):
        check_config(cfg_factory("loss=simpo", "reference.precompute=true"))
    with pytest.raises(ConfigError, match="not available for loss=kto"):
        check_config(cfg_factory("loss=kto", "reference.precompute=true"))
