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

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lab.errors import ConfigError


@dataclass(frozen=True)
class PairedLogps:
    """Per-sequence log-probs of a batch of preference pairs under one model.

    Attributes:
        chosen: (B,) summed log-probs of the chosen completions' tokens.
        rejected: (B,) summed log-probs of the rejected completions' tokens.
        chosen_tokens: (B,) number of completion tokens of each chosen completion.
        rejected_tokens: (B,) likewise for rejected.
        chosen_shared: (B,) summed log-probs of the chosen completion's first
            min(|y_c|, |y_r|) tokens, the length both completions share (LD-DPO); None where only
            sums are known (a precomputed reference).
        rejected_shared: (B,) likewise for rejected.
        chosen_aligned: (B,) detached, the mean over the chosen completion's tokens of
            log π(y_t) − log Σ_v π(v)², WPO's log-weight; None unless the loss declares
            ``aligned`` (it costs one more LM-head pass without gradient).
        rejected_aligned: (B,) likewise for rejected.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_shared: Tensor | None = None
    rejected_shared: Tensor | None = None
    chosen_aligned: Tensor | None = None
    rejected_aligned: Tensor | None = None


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
    state: Callable[[], nn.Module] | None = None  # makes the loss's state across steps
    batchwise: bool = False  # losses[i] is not example i's (AOT sorts the batch)
    token_split: bool = False  # reads chosen_shared/rejected_shared: no precomputed reference
    aligned: bool = False  # reads chosen_aligned/rejected_aligned: the policy computes them

    def __call__(
        self, policy: Any, reference: Any, state: nn.Module | None = None, **kwargs: Any
    ) -> LossOutput:
        """``state``: the run's ``self.state()`` for a loss that declares one (a fresh one, in
        eval mode so it is only read, where None is given); ignored otherwise."""
        if self.state is not None:
            kwargs["state"] = state if state is not None else self.state().eval()
        return self.fn(policy, reference, **kwargs)


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    reference: bool,
    data: str = "paired",
    state: Callable[[], nn.Module] | None = None,
    batchwise: bool = False,
    token_split: bool = False,
) -> Callable:
    """Register ``fn(policy, reference, *, **hyperparameters) -> LossOutput`` under ``name``.

    What a loss needs beyond its log-probs it declares here, and the module reads it, never the
    name: ``reference`` (a reference model or its cached log-probs), ``data`` (paired or
    unpaired), ``state`` (a factory of an ``nn.Module`` whose buffers carry the loss's state
    across steps, such as BCO's running reward mean: the module owns one, so it moves with the
    model, follows train/eval mode, and is saved in checkpoints; the function takes it as the
    keyword ``state``, which is not a config key), ``batchwise`` (the per-row losses are not
    per-example, so no per-example weighting applies) and ``token_split`` (it needs each
    completion's shared-length prefix, which a precomputed reference does not keep).
    """
    if data not in ("paired", "unpaired"):
        raise ValueError(f"data must be 'paired' or 'unpaired', got {data!r}")

    def wrap(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        sig = inspect.signature(fn)
        params = {
            k: p
            for k, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "state"
        }
        if (state is None) == ("state" in sig.parameters):
            raise ValueError(f"loss {name!r}: declare state= exactly when fn takes `state`")
        LOSSES[name] = LossSpec(name, fn, reference, data, params, state, batchwise, token_split)
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


MIX = "mix"
WEIGHTINGS = ("wpo",)


def resolve(name: str, given: Mapping[str, Any]) -> tuple[LossSpec, dict[str, Any]]:
    """The loss a ``loss`` config names and its bound kwargs: a registered loss, ``mix`` (a
    weighted sum of registered losses, ``mixture``), either one under ``weighting: wpo``
    (``wpo_weighted``). Unknown keys, names and options are ConfigErrors naming the key."""
    given = dict(given)
    weighting = given.pop("weighting", None)
    if name == MIX:
        spec, kwargs = mixture(given)
    else:
        spec = get_loss(name)
        kwargs = bind_loss_kwargs(spec, given)
    if weighting is None:
        return spec, kwargs
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"loss.weighting={weighting!r}: expected null or one of {WEIGHTINGS}")
    return wpo_weighted(spec), kwargs


def wpo_weighted(spec: LossSpec) -> LossSpec:
    """``spec`` with each pair's loss weighted as in WPO (Zhou et al. 2024, "WPO: Enhancing RLHF
    with Weighted Preference Optimization", arXiv:2406.11827, Eq. 3 with the sampled alignment
    of Sec. 3.2): by w(y_c)·w(y_r), with
    w(y) = exp((1/|y|)·Σ_t [log π(y_t) − log Σ_v π(v)²]), under the current policy and detached.
    A pair the policy would itself be likely to produce counts more, simulating on-policy data;
    the alignment term makes a completion sampled from the policy weigh about 1 whatever the
    policy's entropy. Same as TRL's ``use_weighting``. Any paired loss except the batchwise ones
    (AOT sorts the batch, so its rows are not pairs); the weights are logged as
    ``wpo_weight``."""
    if spec.data != "paired" or spec.batchwise:
        raise ConfigError(
            f"loss.weighting=wpo weights pairs; loss={spec.name} "
            + (
                "takes unpaired data"
                if spec.data != "paired"
                else "sorts the batch (its losses are per quantile, not per pair)"
            )
        )

    def fn(policy: PairedLogps, reference: Any, **kwargs: Any) -> LossOutput:
        if policy.chosen_aligned is None or policy.rejected_aligned is None:
            raise ValueError("loss.weighting=wpo needs the policy's aligned log-probs")
        out = spec(policy, reference, **kwargs)
        weights = torch.exp(policy.chosen_aligned + policy.rejected_aligned).detach()
        out.losses = out.losses * weights.to(out.losses.dtype)
        out.metrics["wpo_weight"] = weights.mean()
        return out

    return dataclasses.replace(spec, fn=fn, aligned=True)


def mixture(given: Mapping[str, Any]) -> tuple[LossSpec, dict[str, Any]]:
    """``loss=mix``: a weighted sum of registered paired losses, Σ_k w_k·L_k per pair.

    ``given``: ``beta`` (the run's β, passed to every component that takes one) and
    ``components``, a list of ``{name, weight, <that loss's own keys>}``; each component's keys
    are checked against its function as a single loss's are. MPO (Wang et al. 2024,
    arXiv:2411.10442) is dpo 0.8 + bco_pair 0.2 + sft 1.0 (``conf/loss/mix.yaml``). The mixture
    needs a reference where any component does, and carries each component's state. Each
    component's per-pair loss is logged as ``loss/<name>`` and its extras as ``<name>/<key>``;
    the rewards are the first component's.
    """
    given = dict(given)
    beta = given.pop("beta", None)
    components = given.pop("components", None)
    if given:
        raise ConfigError(
            f"loss=mix: unknown key(s) {', '.join('loss.' + k for k in sorted(given))}; "
            "accepted: beta, components, weighting"
        )
    if not components or not isinstance(components, (list, tuple)):
        raise ConfigError(
            f"loss=mix needs loss.components: a list of {{name, weight, ...}}, got {components!r}"
        )
    parts: list[tuple[str, float, LossSpec, dict[str, Any]]] = []
    for i, comp in enumerate(components):
        where = f"loss.components[{i}]"
        if not isinstance(comp, Mapping) or "name" not in comp:
            raise ConfigError(
                f"{where}: expected {{name: <loss>, weight: <number>, ...}}, got {comp!r}"
            )
        comp = dict(comp)
        name, weight = comp.pop("name"), comp.pop("weight", 1.0)
        if name == MIX or name not in LOSSES:
            raise ConfigError(
                f"{where}.name={name!r} is not a registered loss; registered: "
                f"{', '.join(sorted(LOSSES))}"
            )
        spec = LOSSES[name]
        if spec.data != "paired":
            raise ConfigError(f"{where}.name={name}: a mixture takes paired losses only")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{where}.weight must be a number >= 0, got {weight!r}")
        if name in {p[0] for p in parts}:
            raise ConfigError(f"{where}.name={name} appears twice; merge their weights")
        if "beta" in spec.params:
            if "beta" in comp:
                raise ConfigError(f"{where}.beta: every component takes the run's beta")
            comp["beta"] = beta
        try:
            kwargs = bind_loss_kwargs(spec, comp)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        parts.append((name, float(weight), spec, kwargs))
    stateful = [(name, spec.state) for name, _, spec, _ in parts if spec.state is not None]

    def make_state() -> nn.Module:
        return nn.ModuleDict({n: factory() for n, factory in stateful})

    def fn(policy: PairedLogps, reference: Any, *, state: Any = None, **_: Any) -> LossOutput:
        total: Tensor | None = None
        first: LossOutput | None = None
        metrics: dict[str, Tensor] = {}
        for name, weight, spec, kwargs in parts:
            sub = None if state is None or name not in state else state[name]
            out = spec(policy, reference if spec.reference else None, state=sub, **kwargs)
            total = weight * out.losses if total is None else total + weight * out.losses
            metrics[f"loss/{name}"] = out.losses.detach().mean()
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
            first = first or out
        assert total is not None and first is not None
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards, metrics)

    takes_beta = any("beta" in p[2].params for p in parts)
    params = (
        {"beta": inspect.Parameter("beta", inspect.Parameter.KEYWORD_ONLY)} if takes_beta else {}
    )
    spec = LossSpec(
        MIX,
        fn,
        reference=any(p[2].reference for p in parts),
        data="paired",
        params=params,
        state=make_state if stateful else None,
        batchwise=any(p[2].batchwise for p in parts),
        token_split=any(p[2].token_split for p in parts),
        aligned=any(p[2].aligned for p in parts),
    )
    return spec, ({"beta": beta} if takes_beta else {})


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
    divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), Eq. 7, with the two noisy-label variants
    and the f-divergence family.

    With h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)] and ε = label_smoothing:

    - ε = 0: ``−log σ(β·h)``.
    - conservative DPO (cDPO, Mitchell 2023): ``−(1−ε)·log σ(β·h) − ε·log σ(−β·h)``, the
      cross-entropy against labels that are right with probability 1−ε.
    - ``robust=True`` (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 10): the unbiased estimate of
      the clean loss under flip rate ε, ``[(1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)``.
      It can be negative per example; needs ε < 1/2.

    ``divergence`` (f-DPO, Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240, Table 1):
    the KL(π‖π_ref) of the RLHF objective replaced by another f-divergence, which puts f′ of the
    density ratio u = π/π_ref where DPO has log u: h = f′(u_c) − f′(u_r), with
    ``reverse_kl`` f′(u) = log u (DPO itself), ``forward_kl`` f′(u) = 1 − 1/u,
    ``js_divergence`` f′(u) = log(2u/(1+u)) and ``alpha_divergence`` (α = divergence_alpha in
    (0, 1)) f′(u) = (1 − u^(−α))/α. The normalizer β·log Z(x) of the optimal policy cancels
    only in the chosen − rejected difference, so the f-divergence enters through h alone; the
    implicit rewards logged stay β·(log-ratio).
    TRL's ``f_divergence_type`` writes the α-divergence as (u^(α−1) − 1)/(α − 1), the same
    function with α ↦ 1 − α: our α = 0.5 is theirs too, in general ours = 1 − theirs.

    Same as TRL's ``sigmoid`` and ``robust`` loss types (TRL 1.16's ``sigmoid`` no longer
    applies ``label_smoothing``: cDPO is ours alone there). Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    f = _f_prime(divergence, divergence_alpha)
    logits = beta * (f(chosen_lr) - f(rejected_lr))  # (B,)
    wrong, right = -F.logsigmoid(-logits), -F.logsigmoid(logits)
    if label_smoothing == 0:
        losses = right  # (ε·wrong would be 0·inf = NaN where a logit is +inf)
    elif robust:
        losses = ((1 - label_smoothing) * right - label_smoothing * wrong) / (
            1 - 2 * label_smoothing
        )
    else:
        losses = (1 - label_smoothing) * right + label_smoothing * wrong
    return LossOutput(losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_EXP_MAX = 80.0


def _f_prime(divergence: str, alpha: float) -> Callable[[Tensor], Tensor]:
    """f′(u) as a function of log u, for the f-divergences of f-DPO (see ``dpo``)."""
    if divergence == "reverse_kl":
        return lambda lr: lr
    # exp(−log u) and u^−α = exp(−α·log u) are clamped at exp(80) (TRL clamps its α-divergence
    # alone): a log-ratio below −88.7 nats (−88.7/α), common in long runs, would overflow fp32
    # to inf and the loss to NaN; past the clamp that side's gradient is 0
    if divergence == "forward_kl":
        return lambda lr: -torch.expm1(torch.clamp(-lr, max=_EXP_MAX))  # 1 − 1/u
    if divergence == "js_divergence":
        return lambda lr: math.log(2) + F.logsigmoid(lr)
    if divergence == "alpha_divergence":
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"loss.divergence_alpha must be in (0, 1), got {alpha}")
        return lambda lr: -torch.expm1(torch.clamp(-alpha * lr, max=_EXP_MAX)) / alpha
    raise ConfigError(f"loss.divergence={divergence!r}: expected one of {', '.join(DIVERGENCES)}")


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


def _output(losses: Tensor, beta: float, chosen_lr: Tensor, rejected_lr: Tensor) -> LossOutput:
    """``losses`` with the usual detached implicit rewards, β·(log-ratio)."""
    return LossOutput(losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach())


@register_loss("exo_pair", reference=True)
def exo_pair(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, label_smoothing: float = 1e-3
) -> LossOutput:
    """EXO, pair form (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 16 with K = 2).

    The reverse KL from the policy's distribution over the pair, q = softmax(β·log-ratio) over
    {y_c, y_r} (so q_c = σ(β·h)), to the labels' p = (1 − ε, ε):
    ``q_c·(log q_c − log(1−ε)) + q_r·(log q_r − log ε)``. Where DPO minimizes the forward
    cross-entropy (mean-seeking), EXO is mode-seeking. ε > 0 is required (ε = 0 makes log ε
    infinite); 1e-3 is the paper's value. Same as TRL's ``exo_pair`` (which uses the one β the
    paper splits into β_π and β_r). Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    if not 0.0 < label_smoothing < 0.5:
        raise ConfigError(
            f"loss.label_smoothing must be in (0, 0.5) for exo_pair, got {label_smoothing}"
        )
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    z = beta * (chosen_lr - rejected_lr)
    log_qc, log_qr = F.logsigmoid(z), F.logsigmoid(-z)
    losses = log_qc.exp() * (log_qc - math.log1p(-label_smoothing)) + log_qr.exp() * (
        log_qr - math.log(label_smoothing)
    )
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("nca_pair", reference=True)
def nca_pair(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """NCA, pair form (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369, Eq. 11 with K = 2 and binary preference labels).

    With r = β·(log-ratio): ``−log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)``. It scores each
    completion's reward on its own, not only their difference, so (unlike DPO) it keeps the
    chosen completion's likelihood from falling. Same as TRL's ``nca_pair``. Rewards are r,
    detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    rc, rr = beta * chosen_lr, beta * rejected_lr
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return _output(losses, beta, chosen_lr, rejected_lr)


class RunningMean(nn.Module):
    """A running mean of every finite value seen in training, over every process: BCO's δ.

    Kept as Python floats (float64) in the module's extra state, not in tensor buffers: the
    module is saved in (and restored from) checkpoints with the rest of the LightningModule, but
    no precision cast reaches it (``bf16-true`` casts every floating buffer, FSDP casts the
    root's buffers to its ``buffer_dtype``, and a resumed run loads the checkpoint before the
    cast). In train mode ``update`` gathers the batch's values from every process (so every
    process keeps the same δ), folds the finite ones in and returns the new mean; in eval mode it
    returns the mean unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mean, self.count = 0.0, 0

    def get_extra_state(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])

    def update(self, values: Tensor) -> float:
        if self.training:
            from dpo_lab.sharding import all_gather_ragged

            values = all_gather_ragged(values.detach().double())
            values = values[torch.isfinite(values)]  # a NaN/inf reward never enters δ
            n = values.numel()
            if n:
                self.count += n
                self.mean += (values.mean().item() - self.mean) * n / self.count
        return self.mean


@register_loss("bco_pair", reference=True, state=RunningMean)
def bco_pair(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, state: RunningMean
) -> LossOutput:
    """BCO, pair form (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656, Eqs. 6–9).

    The implicit reward r = β·(log-ratio) trained as a binary classifier's logit, chosen as
    class 1 and rejected as class 0, around a reward shift δ:
    ``−log σ(r_c − δ) − log σ(−(r_r − δ))``. δ is the running mean of every reward (chosen and
    rejected) seen in training so far, this batch included, over every process (``RunningMean``,
    kept in the checkpoint); validation reads δ without moving it. The paper's δ is a moving
    average of the rewards; here it is the plain running mean, updated before the batch's loss
    (as TRL's former BCO trainer's running moments were). TRL 1.16's DPO ``bco_pair`` loss type
    leaves δ out (δ = 0). Rewards are r, detached; δ is logged as ``delta``.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    rc, rr = beta * chosen_lr, beta * rejected_lr
    delta = state.update(torch.cat([rc, rr]))
    losses = -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))
    out = _output(losses, beta, chosen_lr, rejected_lr)
    out.metrics["delta"] = torch.tensor(delta, device=rc.device)
    return out


@register_loss("sppo_hard", reference=True)
def sppo_hard(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", arXiv:2405.00675, Eq. 4.7 with P(y_c ≻ y_r) set to 1 and P(y_r ≻ y_c) to 0).

    ``(log-ratio_c − 1/(2β))² + (log-ratio_r + 1/(2β))²``: each completion's log-ratio is
    regressed to its own target, ±1/(2β) (the paper's η = 1/β and its P − ½). The paper's soft
    version takes P from a preference model over several samples; the hard one is what a pair
    dataset allows. Same as TRL's ``sppo_hard``. Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    return _output(losses, beta, chosen_lr, rejected_lr)


def _aot(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    z = beta * delta
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register_loss("aot", reference=True, batchwise=True)
def aot(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, label_smoothing: float = 0.0
) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882, Eq. 9 with the logistic loss).

    Alignment as first-order stochastic dominance of the policy's chosen-over-rejected margins
    over the reference's, checked quantile by quantile: sort the batch's policy margins
    m = log π(y_c) − log π(y_r) and the reference's, and apply DPO's (cDPO's, with ε =
    label_smoothing) loss to each sorted difference: ``−(1−ε)·log σ(β·Δ_(i)) − ε·log σ(−β·Δ_(i))``
    with Δ_(i) = m_(i) − m_ref,(i). ``losses[i]`` belongs to the i-th quantile, not to example
    i, so the batch (one process's micro-batch, as in TRL) is what is sorted. Same as TRL's
    ``aot``. Rewards are β·(log-ratio) per example, detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    margins = torch.sort(policy.chosen - policy.rejected).values
    ref_margins = torch.sort(reference.chosen - reference.rejected).values
    losses = _aot(margins - ref_margins, beta, label_smoothing)
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("aot_unpaired", reference=True, batchwise=True)
def aot_unpaired(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, label_smoothing: float = 0.0
) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882, Eq. 8 with the logistic loss).

    The chosen log-ratios' distribution should dominate the rejected ones': sort each side's
    log-ratios over the batch on its own and apply the (c)DPO loss to each sorted difference,
    Δ_(i) = log-ratio_c,(i) − log-ratio_r,(i). The pairing is not used, so it also fits data
    where chosen and rejected answers come from different prompts. ``losses[i]`` is the i-th
    quantile's. Same as TRL's ``aot_unpaired``. Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    delta = torch.sort(chosen_lr).values - torch.sort(rejected_lr).values
    losses = _aot(delta, beta, label_smoothing)
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("apo_zero", reference=True)
def apo_zero(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, Eq. 7).

    ``(1 − σ(β·log-ratio_c)) + σ(β·log-ratio_r)``: each completion anchored to the reference on
    its own, the chosen one pushed up and the rejected one down, for data whose chosen answers
    are better than the model's own. Same as TRL's ``apo_zero``. Rewards are β·(log-ratio).
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    losses = (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("apo_down", reference=True)
def apo_down(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8).

    ``σ(β·log-ratio_c) + (1 − σ(β·(log-ratio_c − log-ratio_r)))``: the chosen completion is pushed
    down and the rejected one further, for data whose chosen answers are worse than the model's
    own (the gradient on the chosen log-prob may take either sign). Same as TRL's
    ``apo_down``. Rewards are β·(log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    losses = torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(beta * (chosen_lr - rejected_lr)))
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("discopop", reference=True)
def discopop(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, tau: float = 0.05
) -> LossOutput:
    """DiscoPOP (Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models", arXiv:2406.08414, Eq. 5: the log-ratio modulated loss, "LRML").

    With ρ = β·h (h as in DPO) and the mixing weight m = σ(ρ/τ):
    ``(1 − m)·(−log σ(ρ)) + m·exp(−ρ)``, a blend of the logistic (DPO) and exponential losses
    that leans logistic where the policy disagrees with the label and exponential where it
    agrees. τ = 0.05 is the paper's value. Same as TRL's ``discopop``. Rewards are β·(log-ratio).
    """
    _check_beta(beta)
    if not tau > 0:
        raise ConfigError(f"loss.tau must be > 0, got {tau}")
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    rho = beta * (chosen_lr - rejected_lr)
    m = torch.sigmoid(rho / tau)
    losses = (1 - m) * -F.logsigmoid(rho) + m * torch.exp(-rho)
    return _output(losses, beta, chosen_lr, rejected_lr)


@register_loss("sigmoid_norm", reference=True)
def sigmoid_norm(policy: PairedLogps, reference: PairedLogps, *, beta: float) -> LossOutput:
    """Length-normalized DPO (LN-DPO: the SimPO paper's ablation, Meng et al. 2024,
    arXiv:2405.14734, Sec. 4; TRL's ``sigmoid_norm``).

    DPO on per-token average log-ratios: ``−log σ(β·(log-ratio_c/|y_c| − log-ratio_r/|y_r|))``.
    It removes DPO's pull toward longer chosen completions; β's scale is per token, so its
    values do not transfer from DPO (the default is 10× DPO's). Same as TRL. Rewards are
    β·(per-token log-ratio), detached.
    """
    _check_beta(beta)
    chosen_lr, rejected_lr = _log_ratios(policy, reference)
    chosen_lr, rejected_lr = chosen_lr / policy.chosen_tokens, rejected_lr / policy.rejected_tokens
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    return _output(losses, beta, chosen_lr, rejected_lr)


def _length_desensitized(logps: PairedLogps, alpha: float) -> tuple[Tensor, Tensor]:
    if logps.chosen_shared is None or logps.rejected_shared is None:
        raise ValueError(
            "ld_dpo needs each completion's shared-length prefix log-probs, which a precomputed "
            "reference does not keep; set reference.precompute=false"
        )
    chosen = logps.chosen_shared + alpha * (logps.chosen - logps.chosen_shared)
    rejected = logps.rejected_shared + alpha * (logps.rejected - logps.rejected_shared)
    return chosen, rejected


@register_loss("ld_dpo", reference=True, token_split=True)
def ld_dpo(
    policy: PairedLogps, reference: PairedLogps, *, beta: float, alpha: float = 0.5
) -> LossOutput:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411, Eq. 13).

    DPO where each completion's log-prob counts its first l = min(|y_c|, |y_r|) tokens in full
    and the rest, the longer completion's "verbose excess", with weight α:
    log π̂(y) = Σ_{t≤l} log π(y_t) + α·Σ_{t>l} log π(y_t), for the policy and the reference alike;
    α = 1 is DPO, α = 0 compares only the shared length. Same as TRL's ``ld_alpha`` (TRL applies
    it to any loss type; here it is its own loss, DPO's). Rewards are β·(log-ratio) of the
    desensitized log-probs, detached.
    """
    _check_beta(beta)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"loss.alpha must be in [0, 1] for ld_dpo, got {alpha}")
    pc, pr = _length_desensitized(policy, alpha)
    rc, rr = _length_desensitized(reference, alpha)
    chosen_lr, rejected_lr = pc - rc, pr - rr
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    return _output(losses, beta, chosen_lr, rejected_lr)


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


@register_loss("cpo", reference=False)
def cpo(policy: PairedLogps, reference: None, *, beta: float, alpha: float = 1.0) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417, Eq. 3–6).

    DPO with the reference dropped (its uniform-reference limit) plus a behaviour-cloning NLL on
    the chosen completion: ``−log σ(β·(log π(y_c) − log π(y_r))) + α·(−log π(y_c)/|y_c|)``. The
    NLL is per token, as RPO's here; TRL's CPO trainer averages it over every chosen token of
    the batch instead (the same where completions have equal lengths) and calls α
    ``cpo_alpha``. Rewards are β·log π, detached; the NLL is logged as ``nll``.
    """
    _check_beta(beta)
    nll = -policy.chosen / policy.chosen_tokens
    losses = -F.logsigmoid(beta * (policy.chosen - policy.rejected)) + alpha * nll
    return LossOutput(
        losses,
        (beta * policy.chosen).detach(),
        (beta * policy.rejected).detach(),
        {"nll": nll.detach().mean()},
    )


@register_loss("alphapo", reference=False)
def alphapo(
    policy: PairedLogps,
    reference: None,
    *,
    beta: float,
    alpha: float = 0.25,
    gamma_beta_ratio: float = 0.25,
) -> LossOutput:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment",
    arXiv:2501.03884, Eq. 5).

    SimPO with the reward's shape set by α: with ā = log π(y)/|y| the per-token average,
    r_α = (1 − exp(−α·ā))/α = (1 − π(y)^(−α/|y|))/α, and the loss is
    ``−log σ(β·(r_α,c − r_α,r − γ/β))``. α → 0 gives r = ā, SimPO; α > 0 makes the reward
    steeper where ā is low (dr/dā = exp(−α·ā) > 1 for ā < 0), so unlikely completions are
    pushed harder, and flatter toward ā = 0. The margin is set as γ/β (``gamma_beta_ratio``),
    as ``simpo``'s. Same as TRL's CPO trainer with ``loss_type=simpo`` and ``alpha`` (there γ
    itself is ``simpo_gamma``). Rewards are β·r_α, detached.
    """
    _check_beta(beta)
    avg_c = policy.chosen / policy.chosen_tokens
    avg_r = policy.rejected / policy.rejected_tokens
    if alpha == 0:
        rc, rr = avg_c, avg_r
    else:
        rc, rr = -torch.expm1(-alpha * avg_c) / alpha, -torch.expm1(-alpha * avg_r) / alpha
    losses = -F.logsigmoid(beta * (rc - rr - gamma_beta_ratio))
    return LossOutput(losses, (beta * rc).detach(), (beta * rr).detach())


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
