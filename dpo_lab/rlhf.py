"""RLHF, the route DPO shortcuts: a Bradley-Terry reward model, then RL against a judge.

Both maximize the same objective, ``E_{y~π}[r(x, y)] − β·KL(π‖π_ref)``; DPO reaches its optimum
``π* = π_ref·exp(r/β)/Z`` in closed form from the pairs, RLHF by learning ``r`` and sampling.

- ``algo=reward_model`` (``RewardModelModule``): a scalar head on the SFT base
  (``AutoModelForSequenceClassification``, ``num_labels=1``) trained with the Bradley-Terry loss
  ``−log σ(r(x, y_c) − r(x, y_r))`` (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1) on the same
  pairs, config groups and label noise as DPO. The score of a sequence is the head's output at
  its last attended position, in fp32 (``reward_scores``), over exactly the tokens the policy
  scores: the prompt's ids and the completion's, end token included. ``final/`` is a
  transformers model that ``dpo_lab.online.RewardModelJudge`` loads.
- ``algo=rloo`` and ``algo=ppo`` (``RLModule``): each training batch's prompts are answered by the
  current policy (``dpo_lab.sampling.generate``, stopping at every end token), the judge scores
  each answer, and the reward is that score minus a per-token KL penalty:
  ``r_t = −β·(log π(y_t|·) − log π_ref(y_t|·))`` on every sampled token (the k1 estimator, whose
  sum over a sequence estimates KL(π‖π_ref) unbiasedly on π's own samples; Ziegler et al. 2019,
  Stiennon et al. 2020), plus the judge's score on the last token.

  RLOO (Kool et al. 2019; Ahmadian et al. 2024): k samples a prompt; sample i's advantage is its
  total reward minus the mean of the other k−1 of its prompt; one REINFORCE update per batch,
  loss ``−mean_i A_i·Σ_t log π(y_it)``.

  PPO (Schulman et al. 2017; Ouyang et al. 2022; Huang et al. 2024's implementation details): a
  value head (a linear layer on the policy's last hidden state, zero-initialized, sharing the
  trunk as transformers' old ``AutoModelForCausalLMWithValueHead`` did), GAE(γ, λ) advantages
  (whitened over the rollout's tokens), then ``epochs`` passes of ``num_minibatches`` clipped
  updates: ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` per token with ``ρ = π/π_old``, plus
  ``vf_coef`` × the clipped value loss.

The pure functions below are the objectives, tested by hand in ``tests/test_rlhf.py``; the two
modules wire them to Lightning. Metrics: README's table (``rm/*``, ``rl/*``, ``ppo/*``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lab.data.collate import batch_sequences
from dpo_lab.errors import ConfigError
from dpo_lab.faults import rng_state, set_rng_state
from dpo_lab.logps import completion_logps
from dpo_lab.metrics import PerExampleMeans
from dpo_lab.module import clip_gradients
from dpo_lab.online import RewardModelJudge, as_judge
from dpo_lab.sampling import generate, stop_token_ids
from dpo_lab.sharding import synced_generation

ALGOS = ("reward_model", "rloo", "ppo")
RL_ALGOS = ("rloo", "ppo")
OBJECTIVE = {"reward_model": "bradley_terry", "rloo": "kl_regularized", "ppo": "kl_regularized"}

# ---------------------------------------------------------------------------- the objectives


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """(B,) ``−log σ(r_c − r_r)``: the negative log-likelihood of the labels under the
    Bradley-Terry model ``P(y_c ≻ y_r) = σ(r(x, y_c) − r(x, y_r))`` (Ouyang et al. 2022, eq. 1)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 where there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Per-token reward ``−β·(log π(y_t|·) − log π_ref(y_t|·))`` on the sampled tokens."""
    return -beta * (logps - ref_logps)


def token_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """(N, C) each completion token's reward: the KL penalty on every token and the judge's
    ``scores`` (N,) added on each completion's last token. Rows are left-aligned: ``mask`` (N, C)
    is a prefix of each row, at least one token long."""
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("every completion needs at least one token (its end token)")
    rewards = kl_penalty(logps, ref_logps, beta) * mask
    last = (lengths - 1).long()
    return rewards.index_put(
        (torch.arange(len(scores), device=scores.device), last),
        scores.to(rewards.dtype),
        accumulate=True,
    )


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """(N,) REINFORCE leave-one-out advantages: N = P·k rewards, k consecutive per prompt; each is
    its reward minus the mean of its prompt's other k − 1 (Kool et al. 2019)."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    R = rewards.view(-1, k)
    baseline = (R.sum(-1, keepdim=True) - R) / (k - 1)
    return (R - baseline).flatten()


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), each (N, C), by generalized advantage estimation (Schulman et al.
    2016): ``δ_t = r_t + γ·V_{t+1} − V_t`` with ``V`` = 0 after a completion's last token,
    ``A_t = δ_t + γλ·A_{t+1}``, returns ``A_t + V_t``. Rows left-aligned, ``mask`` a prefix."""
    mask = mask.to(values.dtype)
    N, C = values.shape
    advantages = torch.zeros_like(values)
    running = values.new_zeros(N)
    for t in reversed(range(C)):
        alive = mask[:, t + 1] if t + 1 < C else values.new_zeros(N)  # a next token exists
        next_value = values[:, t + 1] * alive if t + 1 < C else values.new_zeros(N)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * alive) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` standardized over the masked positions (mean 0, variance 1), 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask.to(x.dtype)


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, clipfrac, approx_kl) of PPO's clipped surrogate (Schulman et al. 2017), per token:
    ``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))`` with ``ρ = exp(log π − log π_old)``, averaged over
    the masked tokens. ``clipfrac``: the share of tokens where the clipped term is the larger (the
    clip is active); ``approx_kl``: ``mean((ρ − 1) − log ρ)``, an unbiased, non-negative estimate
    of KL(π_old‖π) (Schulman's k3)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> Tensor:
    """PPO's clipped value loss: ``½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)`` over the
    masked tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 − Var(R − V) / Var(R)`` over the masked tokens: 1 for a perfect value head, 0 for one
    no better than a constant, negative for a worse one. NaN when the returns do not vary."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float("nan") if var.item() == 0 else (1 - var_diff / var).item()


def left_aligned(flat: Tensor, rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """((N, C) values, (N, C) mask) from per-token values in row order and each token's row: row
    i's tokens at columns 0..len_i−1, in order (``completion_logps(per_token=True)``)."""
    counts = torch.zeros(n, dtype=torch.long, device=rows.device).index_add(
        0, rows, torch.ones_like(rows)
    )
    place = torch.arange(rows.shape[0], device=rows.device) - (counts.cumsum(0) - counts)[rows]
    C = int(counts.max().item()) if n else 0
    out = flat.new_zeros((n, C))
    mask = torch.zeros((n, C), dtype=torch.bool, device=rows.device)
    out[rows, place] = flat
    mask[rows, place] = True
    return out, mask


# ---------------------------------------------------------------------------- reward model


def reward_scores(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(N,) fp32 scores of a padded batch's sequences (prompt and completion ids, left or right
    padded) under a sequence-classification reward model: its scalar head at each row's last
    attended position, in fp32.

    By position, not as transformers pools (the last token that is not the pad token): where the
    pad token is the end token (SmolLM2's ``<|im_end|>``; Llama's and Pythia's EOS set as pad),
    that would skip every completion's end token, so the model could not tell a finished answer
    from one cut off at the cap. Heads other than a linear ``score`` (the decoder-only
    architectures' name) fall back to transformers' own pooling."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    head = getattr(model, "score", None)
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    last = (torch.arange(ids.shape[1], device=ids.device) * mask).argmax(-1)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    h = hidden[torch.arange(ids.shape[0], device=ids.device), last]
    with torch.autocast(h.device.type, enabled=False):  # the score in fp32, not rounded to bf16
        bias = None if head.bias is None else head.bias.float()
        return F.linear(h.float(), head.weight.float(), bias)[:, 0]


RM_METRICS = ("loss", "accuracies", "margins", "chosen", "rejected", "true_accuracies")


class RewardModelModule(L.LightningModule):
    """Bradley-Terry training of a scalar-head reward model on the preference pairs.

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels=1``.
        optimizer, scheduler: as ``PreferenceModule``'s.
        true_margins: per split, r(x, y_c) − r(x, y_r) of each row under the task's true reward,
            indexed by the row's ``index`` (None for data without one): ``rm/true_accuracies``
            is the share of pairs with a non-zero true margin that the model ranks as the true
            reward does, whatever the (noisy) labels say.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        true_margins: dict[str, Tensor | None] | None = None,
    ):
        super().__init__()
        self.model = model
        self._optimizer, self._scheduler = optimizer, scheduler
        self.true_margins = true_margins or {}
        # per-example means over micro-batches and ranks, as PreferenceModule's (submodules:
        # they move with the module and reduce over processes)
        self.train_means = PerExampleMeans(list(RM_METRICS))
        self.val_means = PerExampleMeans(list(RM_METRICS))
        self.validated_at: int | None = None  # the step of the last validation

    def on_fit_start(self) -> None:
        self.train()

    def step(self, batch: dict[str, Any], split: str) -> Tensor:
        scores = reward_scores(self.model, batch)
        B = len(batch["index"])
        chosen, rejected = scores[:B], scores[B:]
        losses = bradley_terry_loss(chosen, rejected)
        agree = chosen.new_zeros(0)  # no example where the data has no true reward
        true = self.true_margins.get(split)
        if true is not None:
            margin = true[batch["index"].cpu()].to(chosen.device)
            known = margin != 0  # a tie under the true reward has no clean label
            agree = (((chosen - rejected) > 0) == (margin > 0))[known].float()
        values = {
            "loss": losses,
            "accuracies": (chosen > rejected).float(),
            "margins": chosen - rejected,
            "chosen": chosen,
            "rejected": rejected,
            "true_accuracies": agree,
        }
        (self.train_means if split == "train" else self.val_means).update(values)
        return losses.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        loss = self.step(batch, "train")
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=1)
        return {
            "loss": loss,
            "tokens": batch["attention_mask"].sum(),
            "examples": len(batch["index"]),
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        means = self.train_means.means()
        self.train_means.reset()
        self.log_dict({f"train/rm/{k}": v for k, v in means.items()}, on_step=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        means = self.val_means.means()
        self.val_means.reset()
        self.log_dict({f"val/rm/{k}": v for k, v in means.items()})
        self.validated_at = self.trainer.global_step  # finish validates again if training went on

    @torch.no_grad()
    def probe_metrics(self, batches: Sequence[dict[str, Any]], true: Tensor | None) -> dict:
        """On the displacement probe's pairs (the first held-out pairs, as DPO's probe scores
        them): ``probe/rm/accuracies`` against their labels and ``probe/true_accuracies``
        against the true reward, ties left out (the same pairs and rule as a DPO run's
        implicit-reward ``probe/true_accuracies``)."""
        was = self.model.training
        self.model.eval()
        margins = []
        trainer = self._trainer
        for batch in batches:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if trainer is not None:  # under the run's precision, as validation scores
                with trainer.precision_plugin.forward_context():
                    s = reward_scores(self.model, batch)
            else:
                s = reward_scores(self.model, batch)
            B = len(batch["index"])
            margins.append((s[:B] - s[B:]).cpu())
        self.model.train(was)
        if not margins:
            return {}
        m = torch.cat(margins)
        out = {"probe/rm/accuracies": (m > 0).float().mean().item()}
        if true is not None:
            known = true != 0
            out["probe/true_accuracies"] = ((m > 0) == (true > 0))[known].float().mean().item()
        return out

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        return _optimizers(self, [p for p in self.model.parameters() if p.requires_grad], 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dpo_lab"] = {"rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng" in checkpoint.get("dpo_lab", {}):
            set_rng_state(checkpoint["dpo_lab"]["rng"])


def _optimizers(module: L.LightningModule, params: list[Tensor], updates_per_batch: int) -> Any:
    """The optimizer and the schedule, sized in optimizer steps: ``updates_per_batch`` a batch
    (PPO's epochs × minibatches), at most ``trainer.max_steps`` (which counts optimizer steps,
    manual ones too)."""
    optimizer = module._optimizer(params)
    if module._scheduler is None:
        return optimizer
    trainer = module.trainer
    total: float = trainer.estimated_stepping_batches  # loads the training batches (inf: unbounded)
    if updates_per_batch > 1:
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
        total = trainer.num_training_batches * epochs * updates_per_batch
        if trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
    scheduler = module._scheduler(
        optimizer, total_steps=None if total == float("inf") else int(total)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_reward_model(path: str, model_cfg: dict[str, Any]) -> tuple[Any, nn.Module]:
    """(tokenizer, ``AutoModelForSequenceClassification`` with a fresh scalar head) on the
    model at ``path`` (the SFT base), in ``model.dtype``, its pad token set for the pooling."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dpo_lab.models import DTYPES, disable_dropout, keep_trainable

    if model_cfg["dtype"] not in DTYPES:
        raise ConfigError(
            f"model.dtype={model_cfg['dtype']!r}: expected one of {', '.join(DTYPES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model_cfg["trust_remote_code"]
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.name_or_path={path!r}: could not load its tokenizer ({first})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": that is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=DTYPES[model_cfg["dtype"]],
            attn_implementation=model_cfg["attn_implementation"],
            trust_remote_code=model_cfg["trust_remote_code"],
        )
    except ValueError as e:
        raise ConfigError(
            f"model.name_or_path={model_cfg['name_or_path']!r}: transformers has no sequence-"
            f"classification head for this architecture ({str(e).splitlines()[0]})"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.get("disable_dropout", True):
        disable_dropout(model)
    keep_trainable(model, model_cfg.get("trainable_dtype"), model_cfg["dtype"])
    if model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, model


# ---------------------------------------------------------------------------- RL


# PPO's numeric settings: (lowest, highest or None)
PPO_RANGES = {
    "epochs": (1, None),
    "num_minibatches": (1, None),
    "clip_range": (0, None),
    "clip_range_value": (0, None),
    "vf_coef": (0, None),
    "gamma": (0, 1),
    "lam": (0, 1),
}


def check_ppo(algo: dict[str, Any]) -> None:
    """PPO's settings in their ranges, each error naming its key."""
    for key in ("epochs", "num_minibatches"):
        if isinstance(algo[key], bool) or not isinstance(algo[key], int) or algo[key] < 1:
            raise ConfigError(f"algo.{key} must be an integer >= 1, got {algo[key]!r}")
    for key, (lo, hi) in PPO_RANGES.items():
        v = algo[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi and v > hi):
            want = f"in [{lo}, {hi}]" if hi else f">= {lo}"
            raise ConfigError(f"algo.{key} must be a number {want}, got {v!r}")


def scores_ids(judge: Any, tokenizer: Any) -> bool:
    """Whether ``judge`` scores token ids: a reward model with the policy's vocabulary scores the
    very ids sampled (no decode and re-encode); any other judge the decoded texts."""
    return (
        isinstance(judge, RewardModelJudge)
        and judge.tokenizer.get_vocab() == tokenizer.get_vocab()
        and judge.tokenizer.pad_token_id is not None
    )


def judge_scores(judge: Any, gens: Any, ids: bool) -> list[float]:
    """The judge's scores of generations (``ids``: of their token ids, see ``scores_ids``)."""
    if ids:
        return judge.score_ids(gens.prompt_ids, gens.completion_ids)
    return judge(gens.prompts, gens.texts)


class RLModule(L.LightningModule):
    """RLOO or PPO on the policy's own samples against a judge (see the module docstring).

    Args:
        policy: the causal LM being trained (LoRA-wrapped or not).
        reference: a ``LiveReference`` (the frozen starting model, or the LoRA base).
        judge: a batch judge or per-pair callable (``dpo_lab.online.as_judge``).
        tokenizer: the policy's tokenizer.
        prompts: the training split's prompts; a batch's ``index`` picks its prompts.
        prompt_ids: each training row's prompt token ids by ``index``, as the data module
            tokenized them (cut to ``dataset.max_prompt_length``, as DPO and the reward model
            saw them).
        algo: the ``algo`` config (name, samples_per_prompt, sampling and PPO settings).
        beta: the KL penalty's β.
        optimizer, scheduler: as ``PreferenceModule``'s; the scheduler steps every update.
        logps_kwargs: ``completion_logps`` settings.
        true_reward: the task's ground-truth ``reward(prompt, completion)``, logged as
            ``rl/true_reward`` on every rollout (None: not logged).
        gradient_clip_val, gradient_clip_algorithm: the clip of every update (manual
            optimization: the trainer's own settings are taken here).
        padding_free: pack each update's sequences into one row.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: Any,
        judge: Any,
        tokenizer: Any,
        prompts: Sequence[Any],
        prompt_ids: dict[int, list[int]],
        algo: dict[str, Any],
        beta: float,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logps_kwargs: dict[str, Any] | None = None,
        true_reward: Callable[[Any, str], float] | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        padding_free: bool = False,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.reference = policy, reference
        self.judge, self.tokenizer, self.prompts = as_judge(judge), tokenizer, list(prompts)
        self._judge_ids = scores_ids(self.judge, tokenizer)
        self.algo, self.beta = dict(algo), float(beta)
        self.name = self.algo["name"]
        self.k = int(self.algo["samples_per_prompt"])
        if self.name == "rloo" and self.k < 2:
            raise ConfigError(f"algo.samples_per_prompt must be >= 2 for RLOO, got {self.k}")
        if self.k < 1:
            raise ConfigError(f"algo.samples_per_prompt must be >= 1, got {self.k}")
        self.updates_per_batch = 1
        self.value_head = None
        if self.name == "ppo":
            check_ppo(self.algo)
            self.updates_per_batch = int(self.algo["epochs"]) * int(self.algo["num_minibatches"])
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self._optimizer, self._scheduler = optimizer, scheduler
        self.logps_kwargs = dict(logps_kwargs or {})
        self.true_reward, self.padding_free = true_reward, padding_free
        self.clip_val, self.clip_algorithm = gradient_clip_val, gradient_clip_algorithm or "norm"
        self.prompt_ids = prompt_ids
        self.samples_total = 0

    def on_fit_start(self) -> None:
        self.train()
        if self.value_head is not None:  # fp32 even where *-true precision cast the module
            self.value_head.float()  # (in place: the optimizer keeps the same parameters)
        self.reference.to(self.device)
        model = getattr(self.judge, "model", None)
        if isinstance(model, nn.Module):  # a reward model judges where the policy samples
            model.to(self.device)

    # -- a rollout: samples, scores, per-token log-probs under π and π_ref -------------------

    def _sequences(self, prompt_ids: Sequence, completion_ids: Sequence) -> dict[str, Tensor]:
        seqs = batch_sequences(
            list(zip(prompt_ids, completion_ids, strict=True)),
            self.tokenizer.pad_token_id,
            self.padding_free,
        )
        return {k: v.to(self.device) for k, v in seqs.items()}

    def _token_logps(self, model: nn.Module, seqs: dict[str, Tensor], values: bool = False):
        """((N, C) log-probs, (N, C) mask, (N, C) values or None), rows left-aligned."""
        n = (
            (seqs["cu_seq_lens"].shape[0] - 1)
            if "cu_seq_lens" in seqs
            else seqs["input_ids"].shape[0]
        )
        out = completion_logps(
            model, **seqs, per_token=True, hidden_states=values, **self.logps_kwargs
        )
        logps, mask = left_aligned(out[2], out[3], n)
        v = None
        if values:  # fp32 values whatever the trunk computes in (bf16 hidden states included)
            w = self.value_head.weight
            with torch.autocast(w.device.type, enabled=False):
                pred = self.value_head(out[4].to(w.dtype)).squeeze(-1).float()
            v, _ = left_aligned(pred, out[3], n)
        return logps, mask, v

    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        index = [i for i in batch["index"].tolist() for _ in range(self.k)]
        repeated = [self.prompts[i] for i in index]
        gens = generate(  # temperature 1, top-p 1: π's own samples, as the KL estimate needs
            self.policy,
            self.tokenizer,
            repeated,
            batch_size=len(repeated),
            max_new_tokens=int(self.algo["max_new_tokens"]),
            stop=stop_token_ids(self.policy, self.tokenizer),
            synced_gpus=synced_generation(self._trainer),
            prompt_ids=[self.prompt_ids[i] for i in index],
        )
        gen_seconds = time.perf_counter() - t0
        capped = torch.tensor(gens.capped, dtype=torch.float32, device=self.device)
        raw = torch.tensor(judge_scores(self.judge, gens, self._judge_ids), device=self.device)
        scores = raw.float() - float(self.algo["missing_eos_penalty"]) * capped
        seqs = self._sequences(gens.prompt_ids, gens.completion_ids)
        with torch.no_grad():
            ref, _, _ = self._token_logps(self.reference.model, seqs)
        metrics = {
            "rl/score": raw.float().mean().item(),
            "rl/length": sum(map(len, gens.completion_ids)) / len(gens.completion_ids),
            "rl/capped_frac": gens.capped_frac,
            "rl/gen_seconds": gen_seconds,
        }
        if self.true_reward is not None:
            true = [
                float(self.true_reward(p, y)) for p, y in zip(repeated, gens.texts, strict=True)
            ]
            metrics["rl/true_reward"] = sum(true) / len(true)
        self.samples_total += len(repeated)
        metrics["rl/samples_total"] = float(self.samples_total)
        return {"gens": gens, "seqs": seqs, "scores": scores, "ref": ref, "metrics": metrics}

    def _rollout_metrics(self, logps: Tensor, ref: Tensor, mask: Tensor) -> dict[str, float]:
        kl = ((logps - ref) * mask).sum(-1)  # per sequence: Σ_t log π/π_ref on π's own samples
        return {
            "rl/kl": kl.mean().item(),
            # −log π of each sampled token, averaged: a sample estimate of the per-token entropy
            # (exact in expectation at temperature 1, where the samples are π's own)
            "rl/entropy": -masked_mean(logps, mask).item(),
        }

    # -- the updates --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        roll = self.rollout(batch)
        metrics = roll["metrics"]
        if self.name == "rloo":
            metrics |= self._rloo(roll)
        else:
            metrics |= self._ppo(roll)
        several = self._trainer is not None and self._trainer.world_size > 1
        self.log_dict(metrics, on_step=True, batch_size=1, sync_dist=several)
        seqs = roll["seqs"]
        tokens = (
            seqs["attention_mask"].sum() if "attention_mask" in seqs else seqs["input_ids"].numel()
        )
        return {"tokens": tokens, "examples": len(roll["gens"].texts)}

    def _update(self, loss: Tensor) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()  # clipped in on_before_optimizer_step, after AMP's unscaling
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip here: under 16-mixed, Lightning unscales the gradients inside ``opt.step()``,
        just before this hook (and after the callbacks read ``train/grad_norm``), as it does
        before its own clipping under automatic optimization."""
        if self.clip_val:
            clip_gradients(self, optimizer, self.clip_val, self.clip_algorithm)

    def _out_of_steps(self) -> bool:
        """``trainer.max_steps`` reached inside a batch (PPO's updates): stop there."""
        trainer = self._trainer
        return trainer is not None and 0 < trainer.max_steps <= trainer.global_step

    def _rloo(self, roll: dict[str, Any]) -> dict[str, float]:
        logps, mask, _ = self._token_logps(self.policy, roll["seqs"])
        ref = roll["ref"]
        rewards = token_rewards(roll["scores"], logps.detach(), ref, mask, self.beta).sum(-1)
        advantages = rloo_advantages(rewards, self.k)
        loss = -(advantages * (logps * mask).sum(-1)).mean()
        self._update(loss)
        return self._rollout_metrics(logps.detach(), ref, mask) | {
            "rl/loss": loss.detach().item(),
            "rl/reward": rewards.mean().item(),
        }

    def _ppo(self, roll: dict[str, Any]) -> dict[str, float]:
        a, seqs, gens = self.algo, roll["seqs"], roll["gens"]
        with torch.no_grad():
            old, mask, old_values = self._token_logps(self.policy, seqs, values=True)
        ref = roll["ref"]
        rewards = token_rewards(roll["scores"], old, ref, mask, self.beta)
        advantages, returns = gae(rewards, old_values, mask, float(a["gamma"]), float(a["lam"]))
        if a["whiten_advantages"]:
            advantages = whiten(advantages, mask)
        N = len(gens.texts)
        stats: dict[str, list[float]] = {
            "clipfrac": [],
            "approx_kl": [],
            "value_loss": [],
            "policy_loss": [],
        }
        for _ in range(int(a["epochs"])):
            for chunk in torch.randperm(N).tensor_split(int(a["num_minibatches"])):
                rows = chunk.tolist()
                if not rows or self._out_of_steps():  # a batch shorter than the minibatches
                    continue
                mb = self._sequences(
                    [gens.prompt_ids[i] for i in rows], [gens.completion_ids[i] for i in rows]
                )
                logps, m, values = self._token_logps(self.policy, mb, values=True)
                C = m.shape[1]
                idx = torch.tensor(rows, device=self.device)
                pg, clipfrac, approx_kl = ppo_policy_loss(
                    logps, old[idx, :C], advantages[idx, :C], m, float(a["clip_range"])
                )
                vf = value_loss(
                    values, old_values[idx, :C], returns[idx, :C], m, float(a["clip_range_value"])
                )
                self._update(pg + float(a["vf_coef"]) * vf)
                for name, v in (
                    ("clipfrac", clipfrac),
                    ("approx_kl", approx_kl),
                    ("value_loss", vf),
                    ("policy_loss", pg),
                ):
                    stats[name].append(v.detach().item())
        out = self._rollout_metrics(old, ref, mask)
        out |= {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()}
        out["ppo/explained_variance"] = explained_variance(old_values, returns, mask)
        out["rl/reward"] = rewards.sum(-1).mean().item()
        return out

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return _optimizers(self, params, self.updates_per_batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dpo_lab"] = {"rng": rng_state(), "samples_total": self.samples_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("dpo_lab", {})
        if "rng" in extra:  # exact: the data loaders draw from their own generators
            set_rng_state(extra["rng"])
        self.samples_total = int(extra.get("samples_total", 0))
