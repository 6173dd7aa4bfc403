"""End-of-run evaluation: sample from the policy and the reference, score, estimate KL.

KL(π‖π_ref) is estimated by Monte Carlo on the policy's own samples:
``mean_y~π [log π(y|x) − log π_ref(y|x)]`` over whole completions. The estimate is unbiased only
for samples drawn from π itself, i.e. temperature 1 and no top-k/top-p truncation, which is why
those are the defaults here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from dpo_lab.sampling import generate, sequence_logps, stop_token_ids


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def evaluate(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    reward_fn: Callable[[str, str], float] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample from both models on ``prompts``; return metrics and a per-prompt sample table.

    Metrics: ``eval/reward/{policy,reference}`` (+ ``_std``; only with a ground-truth reward),
    ``eval/kl`` (policy vs reference on the policy's samples), ``eval/length/{policy,reference}``
    (completion tokens, the end token included). Sampling stops at every end token the model
    declares (``stop_token_ids``). Each model samples from the same seeded RNG state, so the
    reference's numbers are identical across runs that share ``seed`` and prompts.
    """
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature)
    # each model's own end tokens (a reference named apart may declare others); a LoRA reference
    # is the policy's base, which declares what the policy does
    stop = stop_token_ids(policy, tokenizer)
    ref_stop = (
        stop_token_ids(reference, tokenizer) if hasattr(reference, "generation_config") else stop
    )
    torch.manual_seed(seed)
    pol = generate(policy, tokenizer, prompts, top_p=top_p, stop=stop, **kw)
    torch.manual_seed(seed)
    ref = generate(reference, tokenizer, prompts, top_p=top_p, stop=ref_stop, **kw)
    pad = tokenizer.pad_token_id
    kl = sequence_logps(policy, pol, pad, batch_size) - sequence_logps(
        reference, pol, pad, batch_size
    )
    metrics = {
        "eval/kl": kl.mean().item(),
        "eval/length/policy": statistics.fmean(len(c) for c in pol.completion_ids),
        "eval/length/reference": statistics.fmean(len(c) for c in ref.completion_ids),
    }
    rows = [
        {"prompt": p, "policy": a, "reference": b}
        for p, a, b in zip(prompts, pol.texts, ref.texts, strict=True)
    ]
    if reward_fn is not None:
        r_pol = [reward_fn(p, y) for p, y in zip(prompts, pol.texts, strict=True)]
        r_ref = [reward_fn(p, y) for p, y in zip(prompts, ref.texts, strict=True)]
        (mp, sp), (mr, sr) = _mean_std(r_pol), _mean_std(r_ref)
        metrics.update(
            {
                "eval/reward/policy": mp,
                "eval/reward/policy_std": sp,
                "eval/reward/reference": mr,
                "eval/reward/reference_std": sr,
            }
        )
        for row, a, b in zip(rows, r_pol, r_ref, strict=True):
            row.update(policy_reward=a, reference_reward=b)
    return metrics, rows
