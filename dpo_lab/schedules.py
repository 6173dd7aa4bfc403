"""Learning-rate schedules: a linear warm-up, then constant, linear or cosine decay.

The multiplier of the base rate at optimizer step s (0-based; the rate step s uses), with W
warm-up steps, T the run's optimizer steps and m = ``min_lr_ratio``:

- warm-up, s < W: ``s / W`` (the DPO paper's warm-up: 0 at the first step);
- ``constant``: 1;
- ``linear``: ``m + (1 − m)·max(0, (T − s) / (T − W))``;
- ``cosine``: ``m + (1 − m)·½·(1 + cos(π·p))`` with p = (s − W)/(T − W), clamped to [0, 1].

With m = 0 these are transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``
(tested against them). T comes from Lightning (``trainer.estimated_stepping_batches``), so a
decay schedule knows the run's length whether it is set by ``max_steps`` or ``max_epochs``;
W is ``warmup_steps``, or ``warmup_ratio`` × T.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from dpo_lab.errors import ConfigError

DECAYS = ("constant", "linear", "cosine")
_UNBOUNDED = (
    "{what} needs the run's length, and this run has none (trainer.max_steps=-1 and "
    "trainer.max_epochs=-1); set one of them"
)


def warmup_steps_of(
    total_steps: int | None, warmup_steps: int | None, warmup_ratio: float | None
) -> int:
    """W from exactly one of ``warmup_steps`` and ``warmup_ratio`` (of ``total_steps``)."""
    if (warmup_steps is None) == (warmup_ratio is None):
        raise ConfigError(
            "optim.scheduler: set exactly one of warmup_steps and warmup_ratio (the other null); "
            f"got warmup_steps={warmup_steps}, warmup_ratio={warmup_ratio}"
        )
    if warmup_ratio is not None:
        if total_steps is None:
            raise ConfigError(_UNBOUNDED.format(what="optim.scheduler.warmup_ratio"))
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ConfigError(f"optim.scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return math.ceil(warmup_ratio * total_steps)
    if warmup_steps < 0:
        raise ConfigError(f"optim.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    return int(warmup_steps)


def warmup_then_decay(
    optimizer: Optimizer,
    *,
    total_steps: int | None,
    decay: str = "constant",
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step (see the module docstring).

    Args:
        optimizer: the optimizer whose rates it scales.
        total_steps: T, the run's optimizer steps (None: unbounded, constant rate only).
        decay: ``constant``, ``linear`` or ``cosine``.
        warmup_steps: W; or None when ``warmup_ratio`` is given.
        warmup_ratio: W as a share of T; or None.
        min_lr_ratio: m, the floor of the decay as a share of the base rate (decays only).
    """
    if decay not in DECAYS:
        raise ConfigError(f"optim.scheduler.decay={decay!r}: expected one of {', '.join(DECAYS)}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if decay == "constant" and min_lr_ratio != 0.0:
        raise ConfigError("optim.scheduler.min_lr_ratio applies to linear and cosine decay only")
    if decay != "constant" and total_steps is None:
        raise ConfigError(_UNBOUNDED.format(what=f"optim.scheduler.decay={decay}"))
    W = warmup_steps_of(total_steps, warmup_steps, warmup_ratio)
    T, m = int(total_steps or 0), float(min_lr_ratio)

    def multiplier(step: int) -> float:
        if step < W:
            return step / max(1, W)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - W) / max(1, T - W))
        if decay == "linear":
            return m + (1 - m) * max(0.0, 1.0 - progress)
        return m + (1 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # a plain function, so LambdaLR keeps it out of the checkpoint: a resumed run that is
    # extended (a larger max_steps) sizes the schedule from its own T
    return LambdaLR(optimizer, multiplier)
