"""A task where DPO's optimum is known exactly: a small enumerable response set per prompt.

The DPO derivation (Rafailov et al. 2023, §4) says that, for Bradley-Terry preferences
``P(y_a ≻ y_b | x) = σ(r(x, y_a) − r(x, y_b))``, the KL-regularized optimum is

    π*(y | x) = π_ref(y | x) · exp(r(x, y) / β) / Z(x),

and DPO's minimizer satisfies ``β log π(y|x)/π_ref(y|x) = r(x, y) + c(x)``: the implicit reward
is the true reward up to a per-prompt constant.

Here each of ``n_prompts`` prompts of the sentiment task gets a fixed set of ``n_responses``
distinct completions sampled from the task's SFT base (the reference, ``model=tiny``). The
reward is ``reward_scale`` × the sentiment reward, used directly as the Bradley-Terry reward;
training pairs are every unordered pair of a prompt's responses, each labelled ``repeats`` times
by an independent Bradley-Terry draw. Because the data only ever compares responses inside the
set, the theory constrains the policy on the set only: the checks use π, π_ref and π* restricted
to the set and renormalized (the per-prompt constants cancel), which is exact, not an estimate.

``ClosedFormProbe`` scores every (prompt, response) every N steps and logs KL(π̄_θ ‖ π̄*), the
correlation and slope of the per-prompt-centred implicit reward against the centred true
reward (1 and 1 at the optimum), and writes them to ``closed_form.csv``.
"""

from __future__ import annotations

import csv
import functools
import inspect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import ConfigError
from dpo_lab.tasks import sentiment

DEFAULTS = {
    "n_prompts": 16,
    "n_responses": 6,
    "repeats": 8,
    "reward_scale": 2.0,
    "seed": 0,
    "label_seed": None,
}


def scaled_reward(prompt: str, completion: str, *, scale: float) -> float:
    """``scale`` × the sentiment task's reward: the Bradley-Terry reward of this task."""
    return scale * sentiment.reward(prompt, completion)


@dataclass
class Oracle:
    """The enumerable response sets and their true rewards: what the exact checks need."""

    prompts: list[str]
    responses: list[list[str]]  # n_prompts × n_responses
    rewards: torch.Tensor  # (n_prompts, n_responses), float64

    def callback(self, *, tokenizer: Any, beta: float | None, every_n_steps: int, out_dir: Path):
        if beta is None:
            return None  # no β (sft): π* is not defined
        return ClosedFormProbe(self, tokenizer, beta, every_n_steps, out_dir)


def _candidates(model, tokenizer, prompts, k, max_new_tokens, seed) -> list[list[str]]:
    from dpo_lab.sampling import generate

    out = []
    with torch.random.fork_rng():  # never disturb the training run's RNG
        torch.manual_seed(seed)
        for prompt in prompts:
            seen: list[str] = []
            for _ in range(50):
                gens = generate(model, tokenizer, [prompt] * (4 * k), max_new_tokens=max_new_tokens)
                for t, capped in zip(gens.texts, gens.capped, strict=True):
                    if t and not capped and t not in seen and len(seen) < k:
                        seen.append(t)
                if len(seen) == k:
                    break
            if len(seen) < k:
                raise ConfigError(
                    f"closed_form: the SFT base gave only {len(seen)} distinct responses to "
                    f"{prompt!r}; lower dataset.source.closed_form.n_responses (now {k})"
                )
            out.append(seen)
    return out


def load(*, closed_form: dict[str, Any] | None = None, **base: Any) -> PreferenceData:
    """The closed-form task's pairs, built on the sentiment task named by ``base``."""
    settings = dict(DEFAULTS)
    unknown = set(closed_form or {}) - set(settings)
    if unknown:
        raise ConfigError(
            f"dataset.source.closed_form: unknown key(s) {sorted(unknown)}; "
            f"accepted: {sorted(settings)}"
        )
    settings.update(closed_form or {})
    n, k, repeats = settings["n_prompts"], settings["n_responses"], settings["repeats"]
    if n < 1 or k < 2 or repeats < 1:
        raise ConfigError("closed_form: need n_prompts >= 1, n_responses >= 2, repeats >= 1")
    build_keys = set(inspect.signature(sentiment.build).parameters) - {"verbose"}
    extra = set(base) - build_keys - {"feedback"}
    if extra or base.get("feedback", "pairs") != "pairs":
        raise ConfigError(
            f"closed_form: dataset.source keys {sorted(extra) or ['feedback']} do not apply "
            "(the task makes its own pairs)"
        )
    root = sentiment.build(**{k_: v for k_, v in base.items() if k_ in build_keys})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    all_prompts = sentiment.all_prompts()
    rng = random.Random(settings["seed"])
    if n > len(all_prompts):
        raise ConfigError(f"closed_form: n_prompts <= {len(all_prompts)}, got {n}")
    prompts = rng.sample(all_prompts, n)
    responses = _candidates(
        model, tokenizer, prompts, k, base.get("max_new_tokens", 64), settings["seed"]
    )
    reward_fn = functools.partial(scaled_reward, scale=settings["reward_scale"])
    rewards = torch.tensor(
        [[reward_fn(p, y) for y in ys] for p, ys in zip(prompts, responses, strict=True)],
        dtype=torch.float64,
    )

    # the labels have their own RNG, so a study can redraw them (label_seed) on the same sets
    label_seed = settings["label_seed"]
    rng = random.Random(f"labels-{settings['seed'] if label_seed is None else label_seed}")

    def draw(split: str, reps: int) -> list[dict[str, Any]]:
        rows = []
        for pi, (prompt, ys) in enumerate(zip(prompts, responses, strict=True)):
            for a in range(k):
                for b in range(a + 1, k):
                    p_a = 1.0 / (1.0 + math.exp(-(rewards[pi, a] - rewards[pi, b]).item()))
                    for _ in range(reps):
                        win, lose = (a, b) if rng.random() < p_a else (b, a)
                        rows.append(
                            {
                                "id": f"{split}-{len(rows):06d}",
                                "prompt": prompt,
                                "chosen": ys[win],
                                "rejected": ys[lose],
                                "reward_chosen": rewards[pi, win].item(),
                                "reward_rejected": rewards[pi, lose].item(),
                            }
                        )
        return rows

    train, val = draw("train", repeats), draw("val", 1)
    data = PreferenceData(train, val, reward_fn=reward_fn)
    data.oracle = Oracle(prompts, responses, rewards)
    return data


def closed_form_metrics(
    policy: torch.Tensor, reference: torch.Tensor, rewards: torch.Tensor, beta: float
) -> dict[str, float]:
    """Exact comparisons with DPO's optimum on the enumerable sets.

    Args: (P, K) sequence log-probs under the policy and the reference, the true rewards, β.
    Returns KL(π̄_θ‖π̄*), KL(π̄_θ‖π̄_ref) (π̄: renormalized over each prompt's set; means over
    prompts, nats), and the Pearson correlation and least-squares slope of the per-prompt-centred
    implicit reward β·(log π_θ − log π_ref) against the centred true reward.
    """
    policy, reference, rewards = policy.double(), reference.double(), rewards.double()
    log_pi = policy.log_softmax(-1)
    log_star = (reference + rewards / beta).log_softmax(-1)
    log_ref = reference.log_softmax(-1)
    kl_star = (log_pi.exp() * (log_pi - log_star)).sum(-1).mean().item()
    kl_ref = (log_pi.exp() * (log_pi - log_ref)).sum(-1).mean().item()
    implicit = beta * (policy - reference)
    ic = (implicit - implicit.mean(-1, keepdim=True)).flatten()
    rc = (rewards - rewards.mean(-1, keepdim=True)).flatten()
    denom = (ic.norm() * rc.norm()).item()
    corr = (ic @ rc).item() / denom if denom > 0 else float("nan")
    slope = (ic @ rc).item() / (rc @ rc).item() if (rc @ rc).item() > 0 else float("nan")
    return {
        "closed_form/kl_to_optimal": kl_star,
        "closed_form/kl_to_reference": kl_ref,
        "closed_form/reward_corr": corr,
        "closed_form/reward_slope": slope,
    }


class ClosedFormProbe(L.Callback):
    """Scores every (prompt, response) of the oracle every N steps; see ``closed_form_metrics``."""

    def __init__(self, oracle: Oracle, tokenizer: Any, beta: float, every_n_steps: int, out_dir):
        from dpo_lab.data.collate import encode_batch, pad_sequences

        self.oracle, self.beta, self.every = oracle, beta, every_n_steps
        P, K = oracle.rewards.shape
        prompts = [p for p in oracle.prompts for _ in range(K)]
        completions = [y for ys in oracle.responses for y in ys]
        self.batch = pad_sequences(
            encode_batch(tokenizer, prompts, completions), tokenizer.pad_token_id
        )
        self.shape = (P, K)
        self.csv_path = Path(out_dir) / "closed_form.csv"
        self.final_path = Path(out_dir) / "closed_form_final.csv"
        self.reference: torch.Tensor | None = None
        self.last_step = -1
        self.last_metrics: dict[str, float] = {}
        self.last_policy: torch.Tensor | None = None

    @torch.no_grad()
    def _score(self, pl_module: Any, model: torch.nn.Module) -> torch.Tensor:
        from dpo_lab.logps import completion_logps

        was_training = model.training
        model.eval()
        from dpo_lab.sharding import full_root_params

        batch = {k: v.to(pl_module.device) for k, v in self.batch.items()}
        trainer = pl_module.trainer
        with full_root_params(trainer), trainer.precision_plugin.forward_context():
            logps, _ = completion_logps(model, **batch, **pl_module.logps_kwargs)
        model.train(was_training)
        return logps.cpu().view(self.shape)

    def _record(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        policy = self._score(pl_module, pl_module.policy)
        metrics = closed_form_metrics(policy, self.reference, self.oracle.rewards, self.beta)
        self.last_metrics, self.last_policy = metrics, policy
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", *(k.split("/", 1)[1] for k in metrics)])
            w.writerow([step, *(f"{v:.6f}" for v in metrics.values())])

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.reference = state["last_step"], state["reference"]

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.reference is None:  # the starting model: the reference of every reference loss
            # the live reference model; else (reference-free, or precomputed and freed) the
            # policy before its first update, which is the same model
            live = getattr(pl_module.reference, "model", None)
            self.reference = self._score(pl_module, live if live is not None else pl_module.policy)
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        # the first step at or past each multiple of N (PPO takes several steps a batch)
        if trainer.global_step // self.every > self.last_step // self.every:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._record(trainer, pl_module)
        if not trainer.is_global_zero or self.last_policy is None:
            return
        o, ref, pol = self.oracle, self.reference, self.last_policy
        log_pi = pol.double().log_softmax(-1)
        log_star = (ref.double() + o.rewards / self.beta).log_softmax(-1)
        with open(self.final_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["prompt", "response", "reward", "implicit_reward", "pi", "pi_star", "pi_ref"]
            )
            for i, prompt in enumerate(o.prompts):
                for j, y in enumerate(o.responses[i]):
                    w.writerow(
                        [
                            prompt,
                            y,
                            f"{o.rewards[i, j].item():.6f}",
                            f"{self.beta * (pol[i, j] - ref[i, j]).item():.6f}",
                            f"{log_pi[i, j].exp().item():.6f}",
                            f"{log_star[i, j].exp().item():.6f}",
                            f"{ref[i].double().softmax(-1)[j].item():.6f}",
                        ]
                    )
