"""The loss registry: every preference loss is one pure function of per-sequence log-probs.

A loss never sees a model, a batch dict or a config object. It takes the policy's (and, where it
needs one, the reference's) per-sequence log-probs in a small container, plus keyword-only
hyperparameters, and returns per-example losses with detached implicit rewards.

Adding a loss is one decorated function here plus one ``conf/loss/<name>.yaml``; the yaml's keys
are checked against the function's keyword-only parameters at start-up (``bind_loss_kwargs``).

Conventions: ``logps`` are summed over completion tokens, ``tokens`` are completion-token counts,
so ``logps / tokens`` is the per-token average. Shapes are ``(B,)`` throughout.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.errors import ConfigError


@dataclass(frozen=True)
class PairedLogps:
    """Per-sequence log-probs of a batch of preference pairs under one model.

    Attributes:
        chosen: (B,) summed log-probs of the chosen completions' tokens.
        rejected: (B,) summed log-probs of the rejected completions' tokens.
        chosen_tokens: (B,) number of completion tokens of each chosen completion.
        rejected_tokens: (B,) likewise for rejected.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass(frozen=True)
class UnpairedLogps:
    """Per-sequence log-probs of a batch of single completions with binary feedback (KTO).

    Attributes:
        completion: (B,) summed log-probs of each example's completion.
        tokens: (B,) completion-token counts.
        desirable: (B,) bool, True for a thumbs-up example.
        kl: (B,) summed log-probs of mismatched pairs (prompt i with the completion of another
            example), used to estimate KL(π‖π_ref) for KTO's reference point.
    """

    completion: Tensor
    tokens: Tensor
    desirable: Tensor
    kl: Tensor


@dataclass
class LossOutput:
    """What a loss returns.

    Attributes:
        losses: (B,) per-example losses (the module averages them).
        chosen_rewards: (B,) detached implicit reward of the chosen completion (paired losses), or
            of every example (unpaired losses; split by label for logging).
        rejected_rewards: (B,) detached implicit reward of the rejected completion; None for
            unpaired losses.
        metrics: extra detached scalars, logged under the same split prefix (e.g. ``kl``).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it declares about itself."""

    name: str
    fn: Callable[..., LossOutput]
    reference: bool  # needs a reference model (or cached reference log-probs)
    data: str  # "paired" or "unpaired"
    params: Mapping[str, inspect.Parameter]  # keyword-only hyperparameters

    def __call__(self, policy: Any, reference: Any, **kwargs: Any) -> LossOutput:
        return self.fn(policy, reference, **kwargs)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, reference: bool, data: str = "paired") -> Callable:
    """Register ``fn(policy, reference, *, **hyperparameters) -> LossOutput`` under ``name``."""
    if data not in ("paired", "unpaired"):
        raise ValueError(f"data must be 'paired' or 'unpaired', got {data!r}")

    def wrap(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        sig = inspect.signature(fn)
        params = {
            k: p for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        LOSSES[name] = LossSpec(name, fn, reference, data, params)
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``, or a ConfigError listing the registered names."""
    if name not in LOSSES:
        raise ConfigError(
            f"loss.name={name!r} is not a registered loss; registered: {', '.join(sorted(LOSSES))}"
        )
    return LOSSES[name]


def bind_loss_kwargs(spec: LossSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check config keys against the loss's keyword-only parameters and return the kwargs.

    Raises:
        ConfigError: naming the unknown or missing key and the accepted keys.
    """
    accepted = sorted(spec.params)
    unknown = sorted(set(given) - set(spec.params))
    if unknown:
        raise ConfigError(
            f"loss={spec.name}: unknown key(s) {', '.join('loss.' + k for k in unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    missing = [
        k for k, p in spec.params.items() if p.default is inspect.Parameter.empty and k not in given
    ]
    if missing:
        raise ConfigError(
            f"loss={spec.name}: missing key(s) {', '.join('loss.' + k for k in missing)}"
        )
    return dict(given)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ConfigError(f"beta must be > 0, got {beta}")


# --------------------------------------------------------------------------------------------
# Paired losses with a reference
# --------------------------------------------------------------------------------------------


def _log_ratios(policy: PairedLogps, reference: PairedLogps) -> tuple[Tensor, Tensor]:
    """(B,) log π(y_c|x) − log π_ref(y_c|x) and the same for y_r."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


@register_loss("dpo", reference=True)
def dpo(
    policy: PairedLogps,
    reference: PairedLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    robust: bool = False,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), Eq. 7, with the two noisy-label variants.

    With h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)] and ε = label_smoothing:

    - ε = 0: ``−log σ(β·h)``.
    - conservative DPO (cDPO, Mitchell 2023): ``−(1−ε)·log σ(β·h) − ε·log σ(−β·h)``, the
      cross-entropy against labels that are right with probability 1−ε.
    - ``robust=True`` (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 10): the unbiased estimate of
      the clean loss under flip rate ε, ``[(1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)``.
      It can be negative per example; needs ε < 1/2.

    Same as TRL's ``sigmoid`` and ``robust`` loss types. Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    logits = beta * (chosen_lr - rejected_lr)  # (B,)
    wrong, right = -F.logsigmoid(-logits), -F.logsigmoid(logits)
    if robust:
        losses = ((1 - label_smoothing) * right - label_smoothing * wrong) / (
            1 - 2 * label_smoothing
        )
    else:
        losses = (1 - label_smoothing) * right + label_smoothing * wrong
    return LossOutput(losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


@register_loss("ipo", reference=True)
def ipo(
    policy: PairedLogps,
    reference: PairedLogps,
    *,
    beta: float,
    average_log_ratios: bool = False,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036), Eq. 17: ``(h − 1/(2β))²``.

    h is the difference of chosen and rejected log-ratios, as in DPO. The paper defines it on
    whole-sequence probabilities, so by default h uses summed log-probs and β keeps the paper's
    meaning (the regression target for h is 1/(2β)). ``average_log_ratios=True`` divides each
    sequence's log-probs by its token count first, which is what TRL's ``ipo`` loss type does; it
    keeps h small for long completions but changes β's scale, so β values do not transfer between
    the two forms. Rewards are β·(log-ratio) in the chosen form, detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    if average_log_ratios:
        chosen_lr = chosen_lr / policy.chosen_tokens
        rejected_lr = rejected_lr / policy.rejected_tokens
    h = chosen_lr - rejected_lr
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOutput(losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


@register_loss("hinge", reference=True)
def hinge(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """Hinge loss on the DPO logit (SLiC, Zhao et al. 2023, arXiv:2305.10425, Eq. 2 calibration).

    ``max(0, 1 − β·h)``, h as in DPO. SLiC-HF's original form uses policy log-probs alone with a
    margin δ; like TRL's ``hinge`` loss type, we use the reference log-ratio form, where 1/β plays
    the role of δ. Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))
    return LossOutput(losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


@register_loss("dpop", reference=True)
def dpop(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, lambda_: float = 50.0
) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228), Eq. 3.

    ``−log σ(β·[h − λ·max(0, log π_ref(y_c) − log π(y_c))])``: DPO plus a penalty that is zero
    while the chosen log-prob stays at or above the reference's and grows as soon as it falls
    below, a direct answer to preference displacement. λ = 50 is the paper's value (and TRL's
    ``dpop_lambda`` default). Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    penalty = torch.clamp(-chosen_lr, min=0)  # max(0, log π_ref(y_c) − log π(y_c))
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr - lambda_ * penalty))
    return LossOutput(
        losses,
        (beta * chosen_lr).detach(),
        (beta * rejected_lr).detach(),
        {"penalty": penalty.detach().mean()},
    )


@register_loss("rpo", reference=True)
def rpo(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, alpha: float = 1.0
) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733).

    ``−log σ(β·h) + α·(−log π(y_c) / |y_c|)``: DPO plus a length-normalized NLL on the chosen
    completion (Eq. 1, α = 1 in the paper). The paper normalizes by prompt + completion length; we
    normalize by completion tokens, as TRL's ``rpo_alpha`` does. Rewards are β·(log-ratio).
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    nll = -policy.chosen / policy.chosen_tokens
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr)) + alpha * nll
    return LossOutput(
        losses,
        (beta * chosen_lr).detach(),
        (beta * rejected_lr).detach(),
        {"nll": nll.detach().mean()},
    )


# --------------------------------------------------------------------------------------------
# Paired, reference-free
# --------------------------------------------------------------------------------------------


@register_loss("simpo", reference=False)
def simpo(
    policy: PairedLogps, reference: None, *, beta: float, gamma_beta_ratio: float = 0.25
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), Eq. 6: ``−log σ(β·ā_c − β·ā_r − γ)``.

    ā is the per-token average log-prob of the completion; no reference model. The target reward
    margin is given as γ/β (``gamma_beta_ratio``, as the paper tunes it and its code takes it),
    so γ = ratio·β moves with β and a β sweep keeps the margin's share of the reward scale:
    ``−log σ(β·(ā_c − ā_r − γ/β))``. (TRL's CPO trainer takes ``simpo_gamma`` = γ itself; the
    two agree where γ = ratio·β.) Rewards are β·ā, detached.
    """
    _check_beta(beta)
    chosen = beta * policy.chosen / policy.chosen_tokens  # (B,)
    rejected = beta * policy.rejected / policy.rejected_tokens  # (B,)
    losses = -F.logsigmoid(chosen - rejected - gamma_beta_ratio * beta)
    return LossOutput(losses, chosen.detach(), rejected.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("orpo", reference=False)
def orpo(policy: PairedLogps, reference: None, *, beta: float) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), Eqs. 6–8.

    With ā the per-token average log-prob and odds(y) = p/(1−p) for p = exp(ā):
    ``−ā_c − β·log σ(log odds(y_c) − log odds(y_r))``, the SFT term plus β (the paper's λ) times
    the odds-ratio term. No reference model. Same as TRL's ORPO trainer. Rewards are β·ā, detached.
    """
    _check_beta(beta)
    avg_c = policy.chosen / policy.chosen_tokens
    avg_r = policy.rejected / policy.rejected_tokens
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    losses = -avg_c - beta * ratio
    return LossOutput(
        losses,
        (beta * avg_c).detach(),
        (beta * avg_r).detach(),
        {"log_odds_ratio": log_odds.detach().mean(), "nll": (-avg_c).detach().mean()},
    )


@register_loss("sft", reference=False)
def sft(policy: PairedLogps, reference: None) -> LossOutput:
    """Supervised fine-tuning on the chosen completion: ``−log π(y_c|x) / |y_c|``.

    The per-token negative log-likelihood of each chosen completion (the rejected one is scored
    but not trained on). No β, no reference. Its "rewards" are the summed log-probs log π(y|x) of
    chosen and rejected, so ``rewards/margins`` reads as the log-likelihood margin.
    """
    losses = -policy.chosen / policy.chosen_tokens
    return LossOutput(losses, policy.chosen.detach(), policy.rejected.detach())


# --------------------------------------------------------------------------------------------
# Unpaired
# --------------------------------------------------------------------------------------------


@register_loss("kto", reference=True, data="unpaired")
def kto(
    policy: UnpairedLogps,
    reference: UnpairedLogps,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306), Eq. 8.

    With r = log π(y|x) − log π_ref(y|x) and the reference point
    z₀ = max(0, mean over mismatched pairs (x_i, y_j) of log π(y_j|x_i) − log π_ref(y_j|x_i)),
    detached (no gradient flows through z₀):

    - desirable: ``λ_D·(1 − σ(β·(r − z₀)))``
    - undesirable: ``λ_U·(1 − σ(β·(z₀ − r)))``

    As in the paper and TRL, z₀ is a batch estimate from mismatched pairs; a batch of fewer than
    two examples has no mismatched pair and is an error, not a silent z₀ = 0. Rewards are β·r.
    """
    _check_beta(beta)
    if policy.completion.numel() < 2:
        raise ValueError(
            "kto: a batch needs at least 2 examples to estimate the KL reference point z0 from "
            "mismatched prompt/completion pairs; raise the batch size"
        )
    z0 = (policy.kl - reference.kl).mean().clamp(min=0).detach()
    r = policy.completion - reference.completion  # (B,)
    desirable = policy.desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return LossOutput(losses, (beta * r).detach(), None, {"kl": z0})
