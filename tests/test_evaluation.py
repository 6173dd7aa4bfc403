"""End-of-run evaluation: several samples a prompt, prompt-clustered standard errors, the capped
share, and held-out prompts that training never saw."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from dpo_lab.evaluation import clustered_se, evaluate
from dpo_lab.tasks import sentiment
from dpo_lab.tasks.sentiment import build_tokenizer


def test_clustered_se_by_hand():
    # two prompts, two samples each: per-prompt means 1 and 3 → s = √2, SE = √2/√2 = 1
    assert clustered_se([0.0, 2.0, 3.0, 3.0], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    # one sample a prompt: the usual s/√n
    xs = [1.0, 2.0, 4.0]
    assert clustered_se(xs, [0, 1, 2]) == pytest.approx(statistics.stdev(xs) / math.sqrt(3))
    assert math.isnan(clustered_se([1.0, 2.0], ["a", "a"]))  # one prompt: no spread to measure


def test_evaluate_counts_samples_and_capped_share():
    from conftest import tiny_llama

    tok = build_tokenizer()
    policy = tiny_llama(vocab=len(tok), seed=1)
    with torch.no_grad():  # a bias toward EOS, so that both endings occur
        policy.lm_head.weight[tok.eos_token_id] = policy.model.norm.weight * 0.25
    reference = tiny_llama(vocab=len(tok), seed=2)
    head = torch.nn.Linear(reference.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():  # a reference that never ends: every sample is capped
        head.weight.copy_(reference.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = -1e4
    reference.lm_head = head
    prompts = ["moonrise was", "starfall was", "i watched nightfall and it was"]
    metrics, rows = evaluate(
        policy, reference, tok, prompts, sentiment.reward,
        max_new_tokens=5, batch_size=8, samples_per_prompt=6, seed=0,
    )  # fmt: skip
    assert metrics["eval/num_samples"] == 18 and len(rows) == 18
    assert metrics["eval/num_prompts"] == 3
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(6)]
    capped = [r["policy_capped"] for r in rows]
    assert 0 < sum(capped) < 18, "both endings should occur in this test"
    assert metrics["eval/capped_frac/policy"] == pytest.approx(sum(capped) / 18)
    assert all(r["reference_capped"] for r in rows)
    assert metrics["eval/capped_frac/reference"] == 1.0
    assert metrics["eval/length/reference"] == 5.0  # capped samples run to the cap
    rewards = [r["policy_reward"] for r in rows]
    assert metrics["eval/reward/policy"] == pytest.approx(statistics.fmean(rewards))
    assert metrics["eval/reward/policy_se"] == pytest.approx(
        clustered_se(rewards, [r["prompt"] for r in rows])
    )


def test_held_out_prompts_are_disjoint_from_training_prompts(tmp_path, monkeypatch):
    from test_task import SMALL

    train_prompts, held_out = sentiment.prompt_split(1234)
    assert not set(train_prompts) & set(held_out)
    assert sorted(train_prompts + held_out) == sorted(sentiment.all_prompts())
    assert len(held_out) == sentiment.HELD_OUT_PROMPTS == 128 and len(train_prompts) == 256
    assert sentiment.prompt_split(1234) == (train_prompts, held_out)  # seeded: the same split

    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path))
    root = sentiment.build(**SMALL)
    rows = {
        split: [json.loads(line) for line in (root / f"{split}.jsonl").open()]
        for split in ("train", "val")
    }
    train_seen = {r["prompt"] for r in rows["train"]}
    val_seen = [r["prompt"] for r in rows["val"]]
    assert train_seen <= set(train_prompts) and not train_seen & set(val_seen)
    # held-out pairs take the held-out prompts in turn (after any dropped draws)
    assert set(val_seen) <= set(held_out) and len(set(val_seen)) == len(val_seen)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["prompts"]["shared"] == 0 and "capped" in meta["dropped_pairs"]["train"]


def test_a_run_evaluates_distinct_held_out_prompts_several_times(cfg_factory):
    from dpo_lab.train import train

    cfg = cfg_factory(
        "trainer.max_steps=1", "eval.num_prompts=5", "eval.samples_per_prompt=3",
        "eval.max_new_tokens=4",
    )  # fmt: skip
    summary = train(cfg)
    assert summary["eval/num_samples"] == 15 and summary["eval/num_prompts"] == 5
    assert 0.0 <= summary["eval/capped_frac/policy"] <= 1.0
    rows = [json.loads(line) for line in open(f"{cfg.output_dir}/samples.jsonl")]
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == 5 and all(prompts.count(p) == 3 for p in set(prompts))
    assert all(k in summary for k in ("eval/kl_se", "eval/reward/policy_se"))
    # the prompts the run evaluated are not among the prompts it trained on
    source = {k: v for k, v in cfg.dataset.source.items() if k != "_target_"}
    trained = {r["prompt"] for r in sentiment.load(**source).train}
    assert trained and not set(prompts) & trained
