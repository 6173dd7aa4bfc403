"""End-of-run evaluation: sample from the policy and the reference, score, estimate KL.

KL(π‖π_ref) is estimated by Monte Carlo on the policy's own samples:
``mean_y~π [log π(y|x) − log π_ref(y|x)]`` over whole completions. The estimate is unbiased only
for samples drawn from π itself, i.e. temperature 1 and no top-k/top-p truncation, which is why
those are the defaults here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from dpo_lab.sampling import generate, sequence_logps, stop_token_ids


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def clustered_se(values: list[float], groups: list[Any]) -> float:
    """Standard error of the mean of ``values`` when samples of one group (one prompt) are not
    independent: the spread of the per-group means over √(number of groups). With one sample a
    group this is the usual s/√n; with several it does not pretend they are independent draws.
    NaN with fewer than two groups."""
    by: dict[Any, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        by.setdefault(g, []).append(v)
    means = [statistics.fmean(v) for v in by.values()]
    if len(means) < 2:
        return float("nan")
    return statistics.stdev(means) / math.sqrt(len(means))


def evaluate(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    reward_fn: Callable[[str, str], float] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample ``samples_per_prompt`` completions from both models on each of ``prompts``; return
    metrics and a per-sample table.

    Metrics, each a mean over every sample, with ``_se`` its standard error clustered by prompt
    (``clustered_se``): ``eval/reward/{policy,reference}`` (+ ``_std`` over samples; only with a
    ground-truth reward), ``eval/kl`` (policy vs reference on the policy's samples),
    ``eval/length/{policy,reference}`` (completion tokens, the end token included), and
    ``eval/capped_frac/{policy,reference}``: the share of samples that reached
    ``max_new_tokens`` without an end token. A capped sample is scored as the text it has, and
    its log-ratio is over that prefix only, so a capped share above 0 means reward, length and
    KL are censored: read them with it. ``eval/num_samples`` and ``eval/num_prompts`` count the
    samples a model and the prompts.
    Sampling stops at every end token the model declares (``stop_token_ids``). Each model samples
    from the same seeded RNG state, so the reference's numbers are identical across runs that
    share ``seed`` and prompts.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature)
    # each model's own end tokens (a reference named apart may declare others); a LoRA reference
    # is the policy's base, which declares what the policy does
    stop = stop_token_ids(policy, tokenizer)
    ref_stop = (
        stop_token_ids(reference, tokenizer) if hasattr(reference, "generation_config") else stop
    )
    asked = [p for p in prompts for _ in range(samples_per_prompt)]
    group = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    torch.manual_seed(seed)
    pol = generate(policy, tokenizer, asked, top_p=top_p, stop=stop, **kw)
    torch.manual_seed(seed)
    ref = generate(reference, tokenizer, asked, top_p=top_p, stop=ref_stop, **kw)
    pad = tokenizer.pad_token_id
    kl = sequence_logps(policy, pol, pad, batch_size) - sequence_logps(
        reference, pol, pad, batch_size
    )
    columns: dict[str, list[float]] = {
        "eval/kl": kl.tolist(),
        "eval/length/policy": [float(len(c)) for c in pol.completion_ids],
        "eval/length/reference": [float(len(c)) for c in ref.completion_ids],
    }
    rows = [
        {"prompt": p, "sample": i % samples_per_prompt, "policy": a, "reference": b}
        for i, (p, a, b) in enumerate(zip(asked, pol.texts, ref.texts, strict=True))
    ]
    if reward_fn is not None:
        for name, gens in (("policy", pol), ("reference", ref)):
            columns[f"eval/reward/{name}"] = [
                reward_fn(p, y) for p, y in zip(asked, gens.texts, strict=True)
            ]
        for row, a, b in zip(
            rows, columns["eval/reward/policy"], columns["eval/reward/reference"], strict=True
        ):
            row.update(policy_reward=a, reference_reward=b)
    for row, lr, pc, rc in zip(rows, columns["eval/kl"], pol.capped, ref.capped, strict=True):
        row.update(policy_logratio=lr, policy_capped=pc, reference_capped=rc)
    metrics: dict[str, float] = {
        "eval/num_samples": float(len(asked)),
        "eval/num_prompts": float(len(prompts)),
    }
    for name, xs in columns.items():
        mean, std = _mean_std(xs)
        metrics[name] = mean
        if name.startswith("eval/reward/"):
            metrics[name + "_std"] = std
        metrics[name + "_se"] = clustered_se(xs, group)
    metrics["eval/capped_frac/policy"] = pol.capped_frac
    metrics["eval/capped_frac/reference"] = ref.capped_frac
    return metrics, rows
