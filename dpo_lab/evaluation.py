"""End-of-run evaluation: sample from the policy and the reference, score, estimate KL.

KL(π‖π_ref) is estimated by Monte Carlo on the policy's own samples:
``mean_y~π [log π(y|x) − log π_ref(y|x)]`` over whole completions. The estimate is unbiased only
for samples drawn from π itself, i.e. temperature 1 and no top-k/top-p truncation, which is why
those are the defaults here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lab.data.collate import encode_prompt, pad_sequences
from dpo_lab.logps import completion_logps


@dataclass
class Generations:
    prompts: list[str]
    texts: list[str]  # decoded completions, special tokens removed
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # sampled tokens up to and including EOS


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Generations:
    """Sample one completion per prompt (left-padded batches, KV cache), cut after EOS."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = Generations(prompts, [], [], [])
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        P = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), P), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding: every prompt ends at position P-1
            input_ids[i, P - len(ids) :] = torch.tensor(ids)
            attention_mask[i, P - len(ids) :] = 1
        seqs = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for ids, new in zip(chunk, seqs[:, P:].tolist(), strict=True):
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            out.prompt_ids.append(ids)
            out.completion_ids.append(new)
            out.texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


@torch.no_grad()
def sequence_logps(
    model: Any, gens: Generations, pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """(N,) summed log-probs of each generated completion given its prompt under ``model``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = list(zip(gens.prompt_ids, gens.completion_ids, strict=True))
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pad_sequences(pairs[start : start + batch_size], pad_id)
        logps, _ = completion_logps(model, **{k: v.to(device) for k, v in batch.items()})
        out.append(logps.cpu())
    model.train(was_training)
    return torch.cat(out)


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
    (completion tokens, EOS included). Each model samples from the same seeded RNG state, so the
    reference's numbers are identical across runs that share ``seed`` and prompts.
    """
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature)
    torch.manual_seed(seed)
    pol = generate(policy, tokenizer, prompts, top_p=top_p, **kw)
    torch.manual_seed(seed)
    ref = generate(reference, tokenizer, prompts, top_p=top_p, **kw)
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
