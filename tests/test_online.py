"""Online DPO: pairs ranked by the judge, judges (task reward, local reward model, callable),
generation cut at EOS and max tokens, and a real online training run."""

from __future__ import annotations

import pytest
import torch

from dpo_lab.errors import ConfigError
from dpo_lab.online import RewardModelJudge, as_judge, form_pairs
from dpo_lab.sampling import generate, stop_token_ids
from dpo_lab.tasks.sentiment import build_tokenizer
from dpo_lab.train import build, check_config


def test_pairs_take_the_higher_score_as_chosen():
    scores = [0.1, 0.9, 0.5, 0.5, -1.0, 2.0, 2.0, 0.0, 0.3, 0.3, 0.3, 0.3]  # 3 prompts, K = 4
    assert form_pairs(scores, 4, "best_worst") == [(1, 0), (5, 4)]  # the all-tied third: none
    every = form_pairs(scores, 4, "all")
    assert all(scores[c] > scores[r] for c, r in every)
    assert set(every) >= {(1, 0), (2, 0), (3, 0), (1, 2), (1, 3), (5, 4), (6, 7)}
    assert len(every) == 5 + 5  # first group: 6 pairs minus the tie (2, 3); second: minus (5, 6)


def test_generation_respects_eos_and_max_tokens():
    from conftest import tiny_llama

    tok = build_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=1)
    with torch.no_grad():  # a bias toward EOS, so that both endings occur
        model.lm_head.weight[tok.eos_token_id] = model.model.norm.weight * 0.25
    torch.manual_seed(0)
    gens = generate(model, tok, ["moonrise was"] * 64, max_new_tokens=7, batch_size=64)
    assert all(1 <= len(c) <= 7 for c in gens.completion_ids)
    ended = [tok.eos_token_id in c for c in gens.completion_ids]
    assert any(ended) and not all(ended), "both endings should occur in this test"
    for c, capped in zip(gens.completion_ids, gens.capped, strict=True):
        if tok.eos_token_id in c:
            assert c.index(tok.eos_token_id) == len(c) - 1  # nothing after EOS
            assert not capped
        else:
            assert len(c) == 7 and capped  # only the cap ends a completion without EOS
    assert gens.capped_frac == pytest.approx(1 - sum(ended) / 64)


def test_capped_online_samples_rank_below_finished_ones_so_chosen_ends_like_offline(
    monkeypatch,
):
    """Online and offline completions end the same way: an online sample unfinished at the cap
    is a failure (never chosen), so every chosen completion ends with EOS, as every offline
    completion does once tokenized; a capped sample can still be rejected."""
    from dpo_lab import online
    from dpo_lab.data.collate import encode_example
    from dpo_lab.sampling import Generations

    tok = build_tokenizer()
    eos = tok.eos_token_id
    word = tok.convert_tokens_to_ids
    long_ = [word("great")] * 6  # capped at 6: the judge would love it
    short = [word("great"), word("."), eos]
    bad = [word("awful"), eos]
    prompts = ["moonrise was", "starfall was"]
    # per prompt K = 3: a capped "great great ...", a finished good and a finished bad answer;
    # the second prompt's samples are all capped (a tie: no pair)
    completions = [long_, short, bad, long_, long_, long_]

    def fake_generate(model, tokenizer, asked, **kw):
        ids = [tokenizer(p)["input_ids"] for p in asked]
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        capped = [eos not in c for c in completions]
        return Generations(list(asked), texts, ids, [list(c) for c in completions], capped)

    monkeypatch.setattr(online, "generate", fake_generate)
    judge = lambda p, y: float(len(y.split()))  # noqa: E731  longer is better, to this judge
    maker = online.OnlinePairs(judge, tok, prompts, samples_per_prompt=3, pairs="all")
    model = torch.nn.Linear(1, 1)
    batch, metrics = maker(model, None, {"index": torch.tensor([0, 1])})
    assert metrics["online/capped_frac"] == pytest.approx(4 / 6)
    assert metrics["online/pairs"] == 3  # short > bad, short > capped, bad > capped
    assert metrics["online/tied_prompts"] == 1  # the all-capped prompt gives no pair
    assert metrics["online/score_margin"] == pytest.approx(2 - 1)  # finished pairs only
    chosen = batch["input_ids"][:3]
    ends = [row[batch["attention_mask"][i].bool()][-1].item() for i, row in enumerate(chosen)]
    assert ends == [eos] * 3
    # best_worst: the best finished sample against the capped one
    maker = online.OnlinePairs(judge, tok, prompts, samples_per_prompt=3, pairs="best_worst")
    batch, metrics = maker(model, None, {"index": torch.tensor([0, 1])})
    assert metrics["online/pairs"] == 1
    ids = batch["input_ids"]
    n_prompt = len(tok("moonrise was")["input_ids"])
    assert ids[0, n_prompt : n_prompt + 3].tolist() == short
    assert ids[1, n_prompt : n_prompt + 6].tolist() == long_
    offline = encode_example(tok, "moonrise was", "great .")[1]
    assert offline[-1] == eos and offline == short  # the same ids as the online chosen sample


def test_generation_stops_at_every_end_token_the_model_declares():
    """A model whose generation_config declares two end tokens (as Llama 3 declares three), and a
    chat template whose turns end with their own token: sampling stops at any of them."""
    from conftest import tiny_llama

    tok = build_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=1)
    second = tok.convert_tokens_to_ids("great")  # stands in for an <|eot_id|>
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():  # every sample is the second end token, again and again
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[second] = 30.0
    model.lm_head = head
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    assert stop_token_ids(model, tok) == [tok.eos_token_id, second]
    torch.manual_seed(0)
    gens = generate(model, tok, ["moonrise was"] * 8, max_new_tokens=6)
    assert gens.completion_ids == [[second]] * 8  # cut after the first end token
    torch.manual_seed(0)  # with the tokenizer's EOS alone it would run on to the cap
    only_eos = generate(model, tok, ["moonrise was"] * 8, max_new_tokens=6, stop=[tok.eos_token_id])
    assert all(len(c) == 6 for c in only_eos.completion_ids)

    chat = build_tokenizer()
    chat.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    chat.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    model.generation_config.eos_token_id = tok.eos_token_id
    end = chat.convert_tokens_to_ids("<|end|>")
    assert stop_token_ids(model, chat) == [chat.eos_token_id, end]


def test_reward_model_judge_from_a_local_random_init_model(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), batch_size=2)
    scores = judge(["moonrise was"] * 3, ["great .", "awful .", "a truly great film ."])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores == judge(["moonrise was"] * 3, ["great .", "awful .", "a truly great film ."])
    with pytest.raises(ConfigError, match="no reward model there.*algo=reward_model"):
        RewardModelJudge(str(tmp_path / "missing"))


def length_score(prompt, completion):  # a plain callable judge, given by _target_ in a test
    return float(len(completion.split()))


def test_a_plain_callable_is_a_judge():
    assert as_judge(length_score)(["p", "p"], ["a b", "a"]) == [2.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("judge", ["task", "callable"])
def test_a_two_step_online_run_trains(cfg_factory, judge):
    extra = (
        []
        if judge == "task"
        else ["+algo.judge._target_=test_online.length_score", "+algo.judge._partial_=true"]
    )
    cfg = cfg_factory(
        "algo=online",
        "trainer.max_steps=2",
        "eval.num_prompts=0",
        "algo.max_new_tokens=16",  # long enough that some pairs are two finished samples
        "trainer.log_every_n_steps=1",
        *extra,
    )
    run = build(cfg)
    start = {k: v.clone() for k, v in run.module.policy.state_dict().items()}
    ref = {k: v.clone() for k, v in run.module.reference.model.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    assert not torch.equal(
        start["lm_head.weight"], run.module.policy.state_dict()["lm_head.weight"]
    )
    assert all(torch.equal(v, run.module.reference.model.state_dict()[k]) for k, v in ref.items())
    logged = set(run.trainer.callback_metrics)
    assert {
        "online/score",
        "online/score_margin",
        "online/kl",
        "online/pairs",
        "online/sample_length",
        "online/gen_time_share",
        "train/loss",
    } <= logged
    assert 0 < float(run.trainer.callback_metrics["online/gen_time_share"]) < 1


@pytest.mark.slow
def test_online_with_lora_samples_the_adapted_policy_against_its_base(cfg_factory):
    """Online pairs under LoRA: the policy samples with its adapters on, the KL is taken against
    the same modules with them off, and only the adapters train."""
    import csv
    from pathlib import Path

    cfg = cfg_factory(
        "algo=online",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lr=5e-3",
        "trainer.max_steps=3",
        "eval.num_prompts=0",
        "algo.max_new_tokens=8",
        "trainer.log_every_n_steps=1",
    )
    run = build(cfg)
    policy = run.module.policy
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 3
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and all("lora_" in k for k in changed)
    with open(Path(cfg.output_dir) / "metrics.csv", newline="") as f:
        kl = [float(r["online/kl"]) for r in csv.DictReader(f) if r.get("online/kl")]
    assert len(kl) == 3
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at 0: policy = its base
    assert abs(kl[-1]) > 1e-6  # after two updates the adapters move the policy off its base


def test_online_config_errors(cfg_factory):
    with pytest.raises(ConfigError, match="algo=online forms pairs; loss=kto"):
        check_config(cfg_factory("algo=online", "loss=kto"))
    with pytest.raises(ConfigError, match="cannot be precomputed"):
        check_config(cfg_factory("algo=online", "reference.precompute=true"))
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        build(cfg_factory("algo=online", "algo.samples_per_prompt=1", "eval.num_prompts=0"))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 6], ids=["mid-epoch", "epoch-end"])
def test_online_run_ended_by_max_steps_extends_exactly(tmp_path, stop):
    """Online DPO stopped at step ``stop`` (6 steps an epoch: 2 is mid-epoch, 6 its end, where
    the uninterrupted run validates and starts a new epoch's iterator), resumed to 8: the same
    samples and pairs as a run of 8 straight. The data loaders draw their iterators' seeds from
    their own generators, so neither moves the global RNG the samples come from."""
    import csv

    from conftest import make_cfg

    from dpo_lab.train import train

    steps = [
        "algo=online",
        "algo.max_new_tokens=8",
        "trainer.max_epochs=-1",
        "checkpoint.every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
    ]

    def rows(out):
        with open(out / "metrics.csv", newline="") as f:
            return [
                (r["step"], r["online/score"], r["online/pairs"])
                for r in csv.DictReader(f)
                if r.get("online/score")
            ]

    whole, extended = tmp_path / "whole", tmp_path / "extended"
    train(make_cfg(whole, *steps, "trainer.max_steps=8"))
    train(make_cfg(extended, *steps, f"trainer.max_steps={stop}"))
    train(make_cfg(extended, *steps, "trainer.max_steps=8", "resume=auto"))
    assert len(rows(whole)) == 8 and rows(whole) == rows(extended)
