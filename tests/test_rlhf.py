"""RLHF: the Bradley-Terry reward model and RL (RLOO, PPO), each objective by hand, then short
real runs on the shrunk embedded task."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_llama
from test_distributed import DDP_CPU, LORA

from dpo_lab import rlhf
from dpo_lab.errors import ConfigError
from dpo_lab.logps import completion_logps
from dpo_lab.train import build, check_config, train


def log1pexp(x: float) -> float:
    return math.log(1 + math.exp(x))


# ---------------------------------------------------------------------------- by hand


def test_bradley_terry_loss_on_two_pairs_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    losses = rlhf.bradley_terry_loss(chosen, rejected)
    # −log σ(1) = log(1 + e^−1); −log σ(−2) = log(1 + e^2)
    assert losses.tolist() == pytest.approx([log1pexp(-1), log1pexp(2)], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.3132617, 2.1269280], abs=1e-6)
    c = chosen.clone().requires_grad_()
    rlhf.bradley_terry_loss(c, rejected).sum().backward()
    # d/dr_c −log σ(r_c − r_r) = −σ(r_r − r_c): raises the chosen score, more where it is behind
    assert c.grad.tolist() == pytest.approx([-1 / (1 + math.e), -1 / (1 + math.exp(-2))])


def test_rloo_leave_one_out_advantages_by_hand_for_k3():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # prompt 1: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5; prompt 2: 1.5, 1.5, 0
    assert rlhf.rloo_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    with pytest.raises(ValueError, match="k >= 2"):
        rlhf.rloo_advantages(rewards, 1)


def test_per_token_kl_penalty_and_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert rlhf.kl_penalty(logps, ref, 0.1)[0].tolist() == pytest.approx([-0.05, 0.1, 0.0])
    r = rlhf.token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, 0.1)
    # row 0: −0.1·(0.5), −0.1·(−1), 0 + score 2 on its last token; row 1: −0.05 − 1, padding 0
    assert r.tolist() == [pytest.approx([-0.05, 0.1, 2.0]), pytest.approx([-1.05, 0.0, 0.0])]
    # summed over a sequence, the penalty is −β times the log-ratio of the whole sample
    assert (r[0].sum() - 2.0).item() == pytest.approx(-0.1 * (logps[0] - ref[0]).sum().item())
    with pytest.raises(ValueError, match="at least one token"):
        rlhf.token_rewards(torch.tensor([1.0]), logps[:1], ref[:1], mask[:1] & False, 0.1)


def test_gae_on_a_four_step_trajectory_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.0], [0.5, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.2, 0.1, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    adv, ret = rlhf.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, γλ = 0.45: δ3 = 1 − 0.2 = 0.8; δ2 = 0 + 0.9·0.2 − 0.3 = −0.12, A2 = −0.12 + 0.45·0.8
    # = 0.24; δ1 = −0.2 + 0.9·0.3 − 0.4 = −0.33, A1 = −0.33 + 0.45·0.24 = −0.222;
    # δ0 = 0.1 + 0.9·0.4 − 0.5 = −0.04, A0 = −0.04 + 0.45·(−0.222) = −0.1399
    assert adv[0].tolist() == pytest.approx([-0.1399, -0.222, 0.24, 0.8], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.3601, 0.178, 0.54, 1.0], abs=1e-6)
    # row 1 ends after two tokens: V = 0 past its end, whatever the padding holds
    # δ1 = 1 − 0.1 = 0.9; δ0 = 0.5 + 0.9·0.1 − 0.2 = 0.39, A0 = 0.39 + 0.45·0.9 = 0.795
    assert adv[1].tolist() == pytest.approx([0.795, 0.9, 0.0, 0.0], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([0.995, 1.0, 0.0, 0.0], abs=1e-6)
    # γ = λ = 1: the advantage is the reward-to-go minus the value
    adv1, _ = rlhf.gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    togo = rewards[0].flip(0).cumsum(0).flip(0)
    assert adv1[0].tolist() == pytest.approx((togo - values[0]).tolist(), abs=1e-6)


def test_ppo_clipped_objective_by_hand_on_four_tokens():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    logps = ratios.log().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clipfrac, approx_kl = rlhf.ppo_policy_loss(logps, old, adv, mask, clip_range=0.2)
    # per token max(−Aρ, −A·clip(ρ, 0.8, 1.2)): max(−1.5, −1.2) = −1.2 (clipped),
    # max(−0.5, −0.8) = −0.5, max(1.1, 1.1) = 1.1, max(0.7, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert clipfrac.item() == 0.5
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    assert approx_kl.item() == pytest.approx(sum(k3) / 4, abs=1e-6)
    loss.backward()
    # no gradient through a clipped token; −A·ρ/4 through the others (d ρ / d log ρ = ρ)
    assert logps.grad[0].tolist() == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0], abs=1e-6)
    # padding counts nowhere
    pad = torch.tensor([[True, True, False, False]])
    loss2, frac2, _ = rlhf.ppo_policy_loss(logps.detach(), old, adv, pad, 0.2)
    assert loss2.item() == pytest.approx((-1.2 - 0.5) / 2) and frac2.item() == 0.5


def test_value_loss_and_explained_variance_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 0: V − R = 1, clipped V = 0.7 → 0.7; max(1, 0.49) = 1; token 1: 1 both ways
    assert rlhf.value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * 1.0)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    assert rlhf.explained_variance(r, r, m) == pytest.approx(1.0)
    assert rlhf.explained_variance(torch.full_like(r, 2.5), r, m) == pytest.approx(0.0)
    # residuals (1, −1, 1, −1): variance 1 against the returns' 1.25
    assert rlhf.explained_variance(r + torch.tensor([[-1.0, 1, -1, 1]]), r, m) == pytest.approx(
        1 - 1 / 1.25
    )


def test_per_token_log_probs_sum_to_the_sequence_and_align_left():
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 6, 7, 8, 0], [1, 9, 10, 11, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    for lean in (True, False):
        sums, tokens, flat, rows, hidden = completion_logps(
            model, ids, attn, comp, per_token=True, hidden_states=True, lean=lean
        )
        per, mask = rlhf.left_aligned(flat, rows, 2)
        assert mask.tolist() == [[True, True, True], [True, True, True]]
        assert torch.allclose((per * mask).sum(-1), sums, atol=1e-6)
        assert hidden.shape == (6, 32)
        # token 3 of row 0 (id 7), predicted at position 2, by hand from the full logits
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits
        assert per[0, 1].item() == pytest.approx(logits[0, 2].log_softmax(-1)[7].item(), abs=1e-5)


# ---------------------------------------------------------------------------- config


def test_rlhf_config_errors(cfg_factory):
    with pytest.raises(ConfigError, match="algo=rloo trains with its own objective"):
        check_config(cfg_factory("algo=rloo", "loss=simpo"))
    with pytest.raises(ConfigError, match="objective of algo=reward_model"):
        check_config(cfg_factory("loss=bradley_terry"))
    with pytest.raises(ConfigError, match="takes no beta"):
        check_config(cfg_factory("algo=reward_model", "beta=0.1"))
    with pytest.raises(ConfigError, match="beta must be a number > 0 for algo=ppo"):
        check_config(cfg_factory("algo=ppo", "beta=0"))
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        check_config(cfg_factory("algo=ppo", "trainer.accumulate_grad_batches=2"))
    with pytest.raises(ConfigError, match="reference.precompute"):
        check_config(cfg_factory("algo=rloo", "reference.precompute=true"))
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2 for RLOO"):
        build(cfg_factory("algo=rloo", "algo.samples_per_prompt=1", "eval.num_prompts=0"))
    with pytest.raises(ConfigError, match="model.lora.dropout=0.05: algo=rloo"):
        check_config(cfg_factory("algo=rloo", "model.lora.enabled=true"))
    with pytest.raises(ConfigError, match=r"algo.gamma must be a number in \[0, 1\]"):
        check_config(cfg_factory("algo=ppo", "algo.gamma=1.5"))
    with pytest.raises(ConfigError, match="algo.clip_range must be a number >= 0"):
        check_config(cfg_factory("algo=ppo", "algo.clip_range=-0.1"))
    with pytest.raises(ConfigError, match="algo.num_minibatches=80: a rollout batch has 64"):
        check_config(cfg_factory("algo=ppo", "algo.num_minibatches=80"))
    with pytest.raises(ConfigError, match="dataset.padding_free: a reward model"):
        check_config(cfg_factory("algo=reward_model", "dataset.padding_free=true"))
    with pytest.raises(ConfigError, match="no reward model there"):
        build(
            cfg_factory(
                "algo=rloo",
                "+algo.judge._target_=dpo_lab.online.RewardModelJudge",
                "+algo.judge.name_or_path=runs/../nowhere/final",
            )
        )
    with pytest.raises(ConfigError, match="an epoch's last batch has 1 prompts"):
        build(cfg_factory("algo=ppo", "dataset.max_samples=17", "algo.samples_per_prompt=1",
                          "algo.num_minibatches=2", "eval.num_prompts=0"))  # fmt: skip
    with pytest.raises(ConfigError, match="sharded path"):
        check_config(cfg_factory("algo=ppo", "trainer=fsdp"))
    # the RL objective composes with β from the top-level key and the algo's default
    assert cfg_factory("algo=rloo").beta == 0.05
    assert cfg_factory("algo=ppo", "beta=0.2").loss.name == "kl_regularized"


# ---------------------------------------------------------------------------- real runs


def test_reward_scores_pool_at_the_last_position_even_when_pad_is_the_end_token():
    """Where the pad token is the end token (SmolLM2, or EOS set as pad), transformers' pooling
    (the last token that is not pad) skips a completion's end token; ``reward_scores`` reads the
    head at the last attended position, right or left padded."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=2,
    )
    model = LlamaForSequenceClassification(config).eval()
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 2, 2]])  # both end with the end token 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        scores = rlhf.reward_scores(model, {"input_ids": ids, "attention_mask": mask})
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = model.score(torch.stack([hidden[0, 4], hidden[1, 2]]))[:, 0]
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(scores, by_hand, atol=1e-5)
    assert not torch.allclose(scores, hf, atol=1e-3)  # transformers pooled at 7 and 9 instead
    left_ids = torch.tensor([[1, 5, 6, 7, 2], [2, 2, 1, 9, 2]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        left = rlhf.reward_scores(model, {"input_ids": left_ids, "attention_mask": left_mask})
    assert torch.allclose(left, scores, atol=1e-4)  # the same sequences, padded on the left


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A reward model of the shrunk task (its policy's vocabulary), 20 steps of 4 pairs: its
    run dir, and the run (module and data module)."""
    import time

    from conftest import make_cfg

    from dpo_lab.train import finish

    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = make_cfg(
        out,
        "algo=reward_model",
        "dataset.batch_size=4",
        "trainer.max_steps=20",
        "model.lr=3e-3",
        "trainer.log_every_n_steps=5",
    )
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    summary = finish(run, time.time())
    assert summary["steps"] == 20 and "val/rm/true_accuracies" in summary  # validated at the end
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/rm/loss")]
    assert rows and all(math.isfinite(float(r["train/rm/margins"])) for r in rows)
    return out, run


@pytest.mark.slow
def test_reward_model_trained_20_steps_beats_chance_on_held_out_true_labels(tmp_path):
    """On the embedded task itself (the shipped default: 256 held-out pairs, 222 of them untied
    under the true reward), 20 steps of 64 pairs, three seeds. Measured on this project's
    machine: 0.752, 0.559 and 0.743 (mean 0.685; a fresh head on this 64-wide base is slow and
    seed-dependent at 20 steps, 8 epochs reach 0.82, see README's RLHF studies). Chance gives a
    mean of three above 0.6 with p < 1e-6 and one seed above 0.5 half the time; a head that
    learned nothing, or a sign flip between the pooling and the loss, fails."""
    from conftest import make_cfg

    accs = []
    for seed in (0, 1, 2):
        cfg = make_cfg(
            tmp_path / f"run{seed}",
            "algo=reward_model",
            "trainer.max_steps=20",
            "dataset.batch_size=64",
            "model.lr=3e-3",
            "optim.scheduler.warmup_steps=2",
            "trainer.enable_progress_bar=false",
            f"seed={seed}",
            small=False,
        )
        summary = train(cfg)
        assert summary["steps"] == 20
        accs.append(summary["val/rm/true_accuracies"])
    assert sum(accs) / 3 > 0.6, accs
    assert min(accs) > 0.5, accs


def test_the_saved_reward_model_judges_as_it_was_trained(reward_model):
    """final/ loads with transformers as a sequence classifier, and RewardModelJudge (the RL
    judge, scoring token ids) scores held-out sequences as the training module scored them in
    its (2B, T) chosen-then-rejected block, whatever the padding around them."""
    from transformers import AutoModelForSequenceClassification

    from dpo_lab.online import RewardModelJudge

    out, run = reward_model
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.config.num_labels == 1
    items = run.datamodule.val_items[:6]
    batch = run.datamodule.collate(items)
    run.module.model.eval()
    with torch.no_grad():
        trained = rlhf.reward_scores(run.module.model, batch)  # 6 chosen, then 6 rejected
    judge = RewardModelJudge(str(out / "final"))
    prompts = [it["prompt_ids"] for it in items] * 2
    completions = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    by_judge = judge.score_ids(prompts, completions)
    assert by_judge == pytest.approx(trained.tolist(), abs=1e-5)
    alone = [judge.score_ids([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert alone == pytest.approx(by_judge, abs=1e-5)  # unpadded, one at a time
    assert len({round(x, 4) for x in by_judge}) > 6  # the scores tell sequences apart


def _rl_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if v not in ("", None)}
            for r in csv.DictReader(f)
            if r.get("rl/score")
        ]


@pytest.mark.slow
def test_a_short_rloo_run_with_the_true_reward_raises_the_true_reward(cfg_factory):
    cfg = cfg_factory(
        "algo=rloo",
        "trainer.max_epochs=4",
        "model.lr=2e-3",
        "beta=0.02",
        "algo.max_new_tokens=12",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=24",
        "eval.samples_per_prompt=4",
    )
    summary = train(cfg)
    rows = _rl_rows(Path(cfg.output_dir))
    assert len(rows) == summary["steps"] == 24  # 96 prompts / 16 a batch × 4 epochs
    # measured on this project's machine: the first 4 rollouts' mean −0.012, the last 4's 0.190;
    # the held-out evaluation 0.252 against the reference's −0.012 (the true reward's sd over
    # samples is about 0.5, so a 0.1 rise over 4 × 64 samples is > 3 standard errors)
    first = sum(r["rl/true_reward"] for r in rows[:4]) / 4
    last = sum(r["rl/true_reward"] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)
    # the held-out evaluation agrees: the policy's own samples beat the reference's
    assert summary["eval/reward/policy"] > summary["eval/reward/reference"] + 0.1
    assert summary["eval/kl"] > 0 and rows[-1]["rl/kl"] > 0
    for key in ("rl/entropy", "rl/length", "rl/score", "rl/loss"):
        assert all(math.isfinite(r[key]) for r in rows), key


@pytest.mark.slow
def test_ppo_metrics_are_finite_against_the_learned_reward_model(cfg_factory, reward_model):
    rm_dir, _ = reward_model
    cfg = cfg_factory(
        "algo=ppo",
        "trainer.max_steps=12",  # optimizer steps: 3 rollouts × 2 epochs × 2 minibatches
        "algo.epochs=2",
        "algo.max_new_tokens=10",
        "probe.every_n_steps=3",  # crossed, never landed on, by 4 steps a batch
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
        "+algo.judge._target_=dpo_lab.online.RewardModelJudge",
        f"+algo.judge.name_or_path={rm_dir / 'final'}",
    )
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 12
    rows = _rl_rows(Path(cfg.output_dir))
    assert len(rows) == 3
    for r in rows:
        for key in (
            "ppo/clipfrac",
            "ppo/approx_kl",
            "ppo/value_loss",
            "ppo/explained_variance",
            "rl/score",
            "rl/true_reward",
            "rl/kl",
            "rl/entropy",
            "rl/length",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["ppo/clipfrac"] <= 1.0
        assert r["ppo/approx_kl"] >= 0 and r["ppo/value_loss"] >= 0
    assert rows[0]["rl/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is π_ref's own
    assert rows[-1]["ppo/clipfrac"] > 0 or rows[-1]["ppo/approx_kl"] > 0  # the updates moved π
    # the value head trained (zero at the start)
    assert run.module.value_head.weight.abs().sum() > 0
    # the probe scores at the first step past each multiple of 3 (and at 0 and the end)
    with open(Path(cfg.output_dir) / "probe.csv", newline="") as f:
        assert sorted({int(r["step"]) for r in csv.DictReader(f)}) == [0, 4, 8, 12]


@pytest.mark.slow
def test_rloo_under_lora_and_two_ddp_processes(tmp_path):
    """LoRA adapters trained by RLOO on two gloo processes: the run completes its steps (a
    process that stalled in a collective would hang it), the KL is against the base with adapters
    off (0 at the first rollout, then moving), and rank 0 writes the final adapter."""
    out = tmp_path / "run"
    run_cli(
        *DDP_CPU,
        *LORA,
        "algo=rloo",
        "dataset.batch_size=4",
        "trainer.max_steps=3",
        "algo.max_new_tokens=8",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=4",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        timeout=240,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["rl/samples_total"] == 3 * 4 * 4  # rank 0's
    rows = _rl_rows(out)
    assert len(rows) == 3 and rows[0]["rl/kl"] == pytest.approx(0.0, abs=1e-5)
    assert abs(rows[-1]["rl/kl"]) > 1e-6
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_ppo_first_update_reproduces_the_rollout_and_the_schedule_counts_updates(cfg_factory):
    """One epoch, one minibatch: the update's forward (rows in a shuffled order, re-padded) runs
    before any step, so its ratio to the rollout's log-probs is 1 on every token: clipfrac 0 and
    approx_kl 0 (an index or column mix-up shows here). The learning-rate schedule is sized in
    optimizer steps: 2 batches × 3 epochs × 2 minibatches = 12, decaying to 0 at the last."""
    cfg = cfg_factory(
        "algo=ppo",
        "algo.epochs=1",
        "algo.num_minibatches=1",
        "trainer.max_steps=1",
        "algo.max_new_tokens=10",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
    )
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    (row,) = _rl_rows(Path(cfg.output_dir))
    assert row["ppo/clipfrac"] == 0.0
    assert row["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-6)

    cfg_overrides = [
        "algo=ppo",
        "algo.epochs=3",
        "algo.num_minibatches=2",
        "dataset.max_samples=32",
        "trainer.max_epochs=1",
        "algo.max_new_tokens=6",
        "optim.scheduler.decay=linear",
        "optim.scheduler.warmup_steps=0",
        "eval.num_prompts=0",
        "trainer.log_every_n_steps=1",
    ]
    cfg = cfg_factory(*cfg_overrides)
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 12
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # max_steps inside a batch: the updates stop there (Lightning checks it between batches)
    run = build(cfg_factory(*cfg_overrides, "trainer.max_steps=9"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 9


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 12], ids=["mid-epoch", "epoch-end"])
def test_a_ppo_run_ended_by_max_steps_extends_exactly(tmp_path, stop):
    """PPO stopped after ``stop`` optimizer steps (2 updates a rollout batch, 6 batches an
    epoch: 4 is mid-epoch, 12 an epoch's end), resumed to 16: the same rollouts (the sampling
    RNG is in the checkpoint, and the data loaders draw from their own generators, so a new
    epoch's iterator does not move it), the same updates (value head, AdamW state) and the same
    final policy as a run of 16 straight. A constant rate: a decaying schedule is sized by the
    max_steps each run was given."""
    from conftest import make_cfg
    from safetensors.torch import load_file

    steps = [
        "algo=ppo",
        "algo.epochs=1",
        "algo.num_minibatches=2",
        "algo.max_new_tokens=8",
        "trainer.max_epochs=-1",
        "checkpoint.every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
        "optim.scheduler=null",
    ]
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    train(make_cfg(whole, *steps, "trainer.max_steps=16"))
    train(make_cfg(extended, *steps, f"trainer.max_steps={stop}"))
    summary = train(make_cfg(extended, *steps, "trainer.max_steps=16", "resume=auto"))
    assert summary["steps"] == 16
    a, b = _rl_rows(whole), _rl_rows(extended)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        for key in ("rl/score", "rl/kl", "ppo/clipfrac", "ppo/value_loss"):
            assert x.get(key) == y.get(key), (key, x, y)
    wa = load_file(whole / "final" / "model.safetensors")
    wb = load_file(extended / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
