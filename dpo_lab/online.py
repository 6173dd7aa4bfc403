"""Online preference optimization: pairs sampled from the current policy and ranked by a judge.

At every training step, for each prompt of the batch, ``OnlinePairs`` samples K completions from
the current policy (batched generation with a KV cache, temperature/top-p configurable, cut at
the model's end tokens or ``max_new_tokens``), scores them with a judge, and forms pairs, the
higher score as chosen:
``best_worst`` (one pair per prompt) or ``all`` (every pair with different scores). Prompts whose
K samples all score the same give no pair and are counted. The pairs then go through the same
paired losses as offline data (DPO, IPO, ...).

Judges score ``(prompts, completions) -> list[float]``:

- ``TaskRewardJudge``: the dataset's ground-truth reward (the embedded task has one);
- ``RewardModelJudge``: an ``AutoModelForSequenceClassification`` from a hub id or local dir;
- any Python callable ``f(prompt, completion) -> float`` given by ``_target_`` (with
  ``_partial_: true`` if it takes arguments), wrapped by ``as_judge``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpo_lab.data.collate import PreferenceCollator, pad_sequences
from dpo_lab.errors import ConfigError
from dpo_lab.logps import completion_logps
from dpo_lab.sampling import generate, stop_token_ids

PAIRINGS = ("best_worst", "all")


class TaskRewardJudge:
    """The dataset's ground-truth ``reward(prompt, completion)``."""

    def __init__(self, reward_fn: Callable[[Any, str], float]):
        self.reward_fn = reward_fn

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return [float(self.reward_fn(p, c)) for p, c in zip(prompts, completions, strict=True)]


class RewardModelJudge:
    """A sequence-classification reward model: its first logit on ``prompt + separator +
    completion`` (``__call__``: any reward model, pooled as transformers pools), or on token ids
    (``score_ids``: a model with the policy's vocabulary, such as ``algo=reward_model``'s
    ``final/``, scored at each sequence's last token as it was trained: ``rlhf.reward_scores``).

    Args:
        name_or_path: hub id or local directory of an ``AutoModelForSequenceClassification``.
        batch_size: texts per forward.
        separator: put between prompt and completion text.
    """

    def __init__(self, name_or_path: str, batch_size: int = 32, separator: str = " "):
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(name_or_path).expanduser()
        looks_local = (
            name_or_path.startswith((".", "/", "~"))
            or local.exists()
            or ".." in name_or_path
            or name_or_path.count("/") > 1  # a hub id is one "owner/name"
        )
        if looks_local and not (local / "config.json").exists():
            raise ConfigError(
                f"algo.judge.name_or_path={name_or_path!r}: no reward model there (no "
                "config.json); train one first with algo=reward_model, whose run dir's final/ "
                "is the judge"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        except OSError as e:
            raise ConfigError(
                f"algo.judge.name_or_path={name_or_path!r}: could not load a reward model ({e})"
            ) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.separator = batch_size, separator

    @torch.no_grad()
    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> list[float]:
        """Scores of token sequences (prompt ids then completion ids, end token included) in
        this model's vocabulary: what ``algo=reward_model`` trained on (``dpo_lab.rlhf``)."""
        from dpo_lab.rlhf import reward_scores

        device = next(self.model.parameters()).device
        pairs = list(zip(prompt_ids, completion_ids, strict=True))
        scores: list[float] = []
        for s in range(0, len(pairs), self.batch_size):
            batch = pad_sequences(pairs[s : s + self.batch_size], self.tokenizer.pad_token_id)
            scores += reward_scores(
                self.model, {k: v.to(device) for k, v in batch.items()}
            ).tolist()
        return scores

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        texts = [f"{p}{self.separator}{c}" for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], padding=True, return_tensors="pt")
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores


def as_judge(obj: Any) -> Callable[[Sequence[Any], Sequence[str]], list[float]]:
    """A batch judge from a judge object or a per-pair callable ``f(prompt, completion)``."""
    if isinstance(obj, (TaskRewardJudge, RewardModelJudge)):
        return obj
    if not callable(obj):
        raise ConfigError(f"algo.judge must be callable, got {type(obj).__name__}")
    return TaskRewardJudge(obj)


def failure_ranked(scores: Sequence[float], capped: Sequence[bool]) -> list[float]:
    """Scores for ranking: a capped (unfinished) sample scores −inf, below every finished one."""
    return [float("-inf") if c else float(s) for s, c in zip(scores, capped, strict=True)]


def form_pairs(scores: Sequence[float], k: int, pairing: str) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices per group of ``k`` consecutive samples.

    ``best_worst``: the highest against the lowest score of each group; ``all``: every pair of
    samples with different scores. The higher score is always chosen; groups whose scores are all
    equal give no pair.
    """
    pairs = []
    for g in range(0, len(scores), k):
        idx = list(range(g, g + k))
        if pairing == "best_worst":
            best = max(idx, key=lambda i: scores[i])
            worst = min(idx, key=lambda i: scores[i])
            if scores[best] > scores[worst]:
                pairs.append((best, worst))
        else:
            pairs += [
                (i, j) if scores[i] > scores[j] else (j, i)
                for a, i in enumerate(idx)
                for j in idx[a + 1 :]
                if scores[i] != scores[j]
            ]
    return pairs


class OnlinePairs:
    """Makes each step's training pairs from the current policy (see the module docstring).
    ``padding_free``: the pairs are packed into one row (``dataset.padding_free``)."""

    def __init__(
        self,
        judge: Any,
        tokenizer: Any,
        prompts: Sequence[Any],
        *,
        samples_per_prompt: int = 4,
        pairs: str = "best_worst",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        padding_free: bool = False,
    ):
        if samples_per_prompt < 2:
            raise ConfigError(f"algo.samples_per_prompt must be >= 2, got {samples_per_prompt}")
        if pairs not in PAIRINGS:
            raise ConfigError(f"algo.pairs={pairs!r}: expected one of {', '.join(PAIRINGS)}")
        self.judge, self.tokenizer, self.prompts = as_judge(judge), tokenizer, list(prompts)
        self.k, self.pairing = samples_per_prompt, pairs
        self.gen = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.collate = PreferenceCollator(tokenizer.pad_token_id, padding_free)
        self.pairs_total = 0  # pairs trained on so far (checkpointed)
        self._last_call: float | None = None  # when the previous step's generation started
        self._last_gen_seconds = 0.0

    def state_dict(self) -> dict[str, int]:
        return {"pairs_total": self.pairs_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pairs_total = int(state.get("pairs_total", 0))

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        batch: dict[str, Any],
        synced_gpus: bool = False,
        placeholder: bool = False,
    ) -> tuple[dict[str, Any] | None, dict[str, float]]:
        """(paired batch on the policy's device, metrics). If every prompt tied, the batch is
        None, or with ``placeholder`` a stand-in pair to train on with weight 0 (several
        processes: see ``PreferenceModule.training_step``); ``metrics["online/pairs"]`` is 0.
        ``synced_gpus``: the policy is sharded, keep every process's generation in step."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self._last_call is not None:  # the previous step's share of wall time generating
            metrics["online/gen_time_share"] = self._last_gen_seconds / (t0 - self._last_call)
        self._last_call = t0
        prompts = [self.prompts[i] for i in batch["index"].tolist()]
        repeated = [p for p in prompts for _ in range(self.k)]
        gens = generate(
            policy,
            self.tokenizer,
            repeated,
            batch_size=len(repeated),
            stop=stop_token_ids(policy, self.tokenizer),
            synced_gpus=synced_gpus,
            **self.gen,
        )
        gen_seconds = self._last_gen_seconds = time.perf_counter() - t0
        scores = self.judge(repeated, gens.texts)
        ranked = failure_ranked(scores, gens.capped)
        pairs = form_pairs(ranked, self.k, self.pairing)
        device = next(policy.parameters()).device
        self.pairs_total += len(pairs)
        metrics |= {
            "online/score": sum(scores) / len(scores),
            "online/sample_length": sum(map(len, gens.completion_ids)) / len(gens.completion_ids),
            "online/capped_frac": gens.capped_frac,
            "online/pairs": float(len(pairs)),
            "online/tied_prompts": float(len(prompts) - len({c // self.k for c, _ in pairs})),
            "online/gen_seconds": gen_seconds,
            "online/pairs_total": float(self.pairs_total),
        }
        finished = [(c, r) for c, r in pairs if not gens.capped[r]]
        if finished:  # the judge's scores, over pairs of two finished samples
            metrics["online/score_margin"] = sum(scores[c] - scores[r] for c, r in finished) / len(
                finished
            )
        if reference is not None:  # KL(π‖π_ref) on this step's samples (π's own, temperature 1)
            seqs = pad_sequences(
                list(zip(gens.prompt_ids, gens.completion_ids, strict=True)),
                self.tokenizer.pad_token_id,
            )
            seqs = {k: v.to(device) for k, v in seqs.items()}
            with torch.no_grad():
                lp = completion_logps(policy, **seqs)[0] - completion_logps(reference, **seqs)[0]
            metrics["online/kl"] = lp.mean().item()
        if not pairs and not placeholder:
            return None, metrics
        # every prompt tied: a stand-in pair (the first prompt's first two samples), which the
        # caller trains on with weight 0 so that every process runs the same collectives
        items = [
            {
                "index": n,
                "id": f"online-{n}",
                "prompt_ids": gens.prompt_ids[c],
                "chosen_ids": gens.completion_ids[c],
                "rejected_ids": gens.completion_ids[r],
            }
            for n, (c, r) in enumerate(pairs or [(0, 1)])
        ]
        out = self.collate(items)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}, metrics
