"""Controlled sentiment on a real pretrained LM: the DPO paper's IMDb experiment on SmolLM2-135M.

The DPO paper samples movie-review continuations from an SFT GPT-2, labels pairs with a
sentiment classifier, and trains on them. Here:

- prompts are chat requests for a one-sentence movie review (``TEMPLATES`` × the embedded task's
  48 movie names = 192 prompts, split once, seeded, into training and held-out prompts);
- responses are sampled from SmolLM2-135M-Instruct itself (``builtin:smollm2``, the policy's
  and the reference's starting point), at temperature 1 with the full vocabulary, through its
  chat template: ``samples_per_prompt`` on each prompt. Samples unfinished at
  ``max_new_tokens`` are set aside (SmolLM2 at temperature 1 runs past 64 tokens about a quarter
  of the time), and of the finished ones the highest-reward and the lowest-reward form the pair
  (the first two where all tie; a prompt with fewer than two finished samples is dropped and
  counted). The DPO paper pairs samples at random; best against worst is needed here because
  about three samples in four contain no lexicon word (reward 0), so random pairs would mostly
  be ties with coin-flip labels;
- the true reward is the embedded task's lexicon score (``sentiment.word_score``: 12 positive and
  12 negative adjectives, intensifiers, "not") on the response's lowercased words with
  punctuation stripped and "n't" read as "not" (``text_reward``). Every word outside the
  lexicon counts 0 and adds no
  mass, so a review with no lexicon word scores 0 whatever it says;
- each pair is labelled by a Bradley-Terry draw on that reward (``bt_temperature``), as in the
  embedded task.

Built once per settings into ``<cache root>/real_sentiment-<key>`` (``train.jsonl``,
``val.jsonl``, ``meta.json``), written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from dpo_lab.cache import build_into, cache_root, settings_key
from dpo_lab.data.sources import PreferenceData
from dpo_lab.tasks import sentiment

BUILD_VERSION = 3
SYSTEM = (
    "You are a film critic. Answer in one short sentence, with adjectives such as great, "
    "wonderful, brilliant, dull, boring or awful."
)
TEMPLATES = (
    "Review the movie {m}.",
    "What did you think of the film {m}?",
    "Give a short verdict on the movie {m}.",
    "Write a short review of the new film {m}.",
)


def text_reward(prompt: Any, completion: Any) -> float:
    """The lexicon sentiment score (``sentiment.word_score``) of free text, in (−1, 1): the
    response's words lowercased with punctuation stripped ("Great!" counts as "great") and
    "n't" read as "not" ("isn't boring" is "is not boring", which the lexicon flips). A message
    list counts its messages' contents."""
    if isinstance(completion, list):
        completion = " ".join(m["content"] for m in completion)
    text = re.sub(r"n[’']t\b", " not", completion.lower())
    return sentiment.word_score(re.findall(r"[a-z]+", text))


def all_prompts() -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.format(m=m.title())}]
        for t in TEMPLATES
        for m in sentiment.MOVIES
    ]


def prompt_split(seed: int, n_held_out: int) -> tuple[list, list]:
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[n_held_out:], prompts[:n_held_out]


def build(
    *,
    seed: int = 1234,
    n_held_out_prompts: int = 64,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 64,
    bt_temperature: float = 0.25,
    verbose: bool = True,
) -> Path:
    """Build (or find) the task's pairs; returns its directory (see the module docstring)."""
    settings = dict(
        seed=seed,
        n_held_out_prompts=n_held_out_prompts,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        bt_temperature=bt_temperature,
    )
    from dpo_lab import pretrained

    model_dir = pretrained.smollm2_dir(key="dataset=real_sentiment", verbose=verbose)
    settings["model"] = model_dir.name  # the GGUF file's hash: other weights, other pairs
    root = cache_root() / f"real_sentiment-{settings_key(BUILD_VERSION, settings)}"
    if (root / "meta.json").exists():
        return root
    with torch.random.fork_rng(devices=[]):
        return _build(root, model_dir, settings, verbose=verbose)


def _pairs(model, tokenizer, prompts, rng, *, k, max_new_tokens, bt_temperature, split):
    """One labelled pair per prompt: ``k`` samples, the finished ones ranked by the true reward,
    the highest against the lowest (ties: the first two), the label a Bradley-Terry draw."""
    from dpo_lab.sampling import generate

    asked = [p for p in prompts for _ in range(k)]
    gens = generate(model, tokenizer, asked, max_new_tokens=max_new_tokens, batch_size=64)
    rows, dropped = [], {"fewer_than_two_finished": 0, "identical": 0}
    for i, prompt in enumerate(prompts):
        done = [
            (text_reward(prompt, t), j, t)
            for j, t in enumerate(gens.texts[i * k : (i + 1) * k])
            if not gens.capped[i * k + j] and t
        ]
        if len(done) < 2:
            dropped["fewer_than_two_finished"] += 1
            continue
        done.sort(key=lambda x: (-x[0], x[1]))  # by reward, then in sampled order
        (ra, _, ya), (rb, _, yb) = done[0], done[-1]
        if ra == rb:  # all tie: the first two different texts, in sampled order
            firsts: dict[str, tuple] = {}
            for x in sorted(done, key=lambda x: x[1]):
                firsts.setdefault(x[2], x)
            if len(firsts) < 2:
                dropped["identical"] += 1
                continue
            (ra, _, ya), (rb, _, yb) = list(firsts.values())[:2]
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ra - rb) / bt_temperature))
        (yc, rc), (yr, rr) = ((ya, ra), (yb, rb)) if a_wins else ((yb, rb), (ya, ra))
        rows.append(
            {
                "id": f"{split}-{len(rows):05d}",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": yc}],
                "rejected": [{"role": "assistant", "content": yr}],
                "reward_chosen": round(rc, 6),
                "reward_rejected": round(rr, 6),
            }
        )
    samples = [text_reward(None, t) for t in gens.texts]
    stats = {
        "capped": round(gens.capped_frac, 4),
        "no_lexicon_word": round(sum(r == 0 for r in samples) / len(samples), 4),
        "mean_reward": round(sum(samples) / len(samples), 4),
    }
    return rows, dropped, stats


def _build(root: Path, model_dir: Path, settings: dict[str, Any], *, verbose: bool) -> Path:
    from dpo_lab.models import load_model

    t0 = time.time()
    if verbose:
        print(f"[dpo_lab] sampling the real_sentiment pairs from SmolLM2 once, into {root}")
    rng = random.Random(settings["seed"])
    torch.manual_seed(settings["seed"])
    tokenizer, model = load_model(str(model_dir))
    train_prompts, held_out = prompt_split(settings["seed"], settings["n_held_out_prompts"])
    kw = dict(
        k=settings["samples_per_prompt"],
        max_new_tokens=settings["max_new_tokens"],
        bt_temperature=settings["bt_temperature"],
    )
    train, drop_train, samples_train = _pairs(
        model, tokenizer, train_prompts, rng, split="train", **kw
    )
    val, drop_val, samples_val = _pairs(model, tokenizer, held_out, rng, split="val", **kw)

    def share(rows, f):
        return round(sum(map(f, rows)) / len(rows), 4)

    meta = {
        "settings": settings,
        "build_version": BUILD_VERSION,
        "prompts": {"train": len(train_prompts), "held_out": len(held_out)},
        "pairs": {"train": len(train), "val": len(val)},
        "dropped_pairs": {"train": drop_train, "val": drop_val},
        "samples": {"train": samples_train, "val": samples_val},
        "label_agrees_with_reward": {
            n: share(r, lambda x: x["reward_chosen"] > x["reward_rejected"])
            for n, r in (("train", train), ("val", val))
        },
        "tied_reward": {
            n: share(r, lambda x: x["reward_chosen"] == x["reward_rejected"])
            for n, r in (("train", train), ("val", val))
        },
        "pair_without_lexicon_word": {
            n: share(r, lambda x: x["reward_chosen"] == 0 and x["reward_rejected"] == 0)
            for n, r in (("train", train), ("val", val))
        },
        "build_seconds": round(time.time() - t0, 1),
    }
    with build_into(root, "meta.json") as tmp:
        for name, rows in (("train", train), ("val", val)):
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if verbose:
        print(f"[dpo_lab] real_sentiment built in {meta['build_seconds']}s: {meta['pairs']}")
    return root


def load(**settings: Any) -> PreferenceData:
    """The task's pairs (sampled on first use) and its true reward ``text_reward``."""
    root = build(**settings)
    train = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (root / "val.jsonl").read_text().splitlines()]
    return PreferenceData(train, val, reward_fn=text_reward)
