"""The non-finite guard: no optimizer step is ever taken on a non-finite loss or gradient.

It works on Lightning's own hooks, so the precision plugin and the strategy keep their loop:
``on_before_backward`` keeps each micro-batch's loss, and ``on_before_optimizer_step`` (after
the backward passes and, under AMP, after the GradScaler has unscaled the gradients, before
clipping) checks the step's losses and the total gradient norm with one device sync.

- ``mode=error`` (default): the run stops with one line naming the step and the batch's example
  ids; nothing is stepped or checkpointed from that batch.
- ``mode=skip``: the gradients are dropped (the optimizer then leaves every weight and its state
  as they were), the run goes on, and ``train/skipped_nonfinite`` counts such steps.

Under fp16 with a GradScaler, non-finite gradients from a finite loss are the scaler's ordinary
overflow: the scaler skips that step and lowers its scale. They are counted
(``train/skipped_overflow``), never an error. Under FSDP the gradient norm is reduced over the
processes' shards, and every process takes the same decision. DeepSpeed keeps gradients in its
own buffers (``p.grad`` is None), so there only the loss is checked; its fp16 loss scaler handles
overflow itself.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from dpo_lab.errors import ConfigError, NonFiniteError
from dpo_lab.sharding import shards_gradients

MODES = ("error", "skip")


def grad_norm(
    optimizer: torch.optim.Optimizer, trainer: L.Trainer | None = None
) -> torch.Tensor | None:
    """The total 2-norm of the gradients the optimizer would step on, or None where no parameter
    holds a gradient (DeepSpeed keeps them in its own buffers; a skipped step).

    Squares are summed in float64 (no overflow short of a norm of 1e154) and, under FSDP, where
    each process holds a shard of the gradient, over processes (a collective: every process calls
    this). Computed once an optimizer step: the guard and ``StepStats`` share it. No device sync:
    the caller decides when to read it.
    """
    if trainer is None:
        return _grad_norm(optimizer, None)
    cached = getattr(optimizer, "_dpo_lab_grad_norm", None)  # (step, norm) of this optimizer
    if cached is not None and cached[0] == trainer.global_step:
        return cached[1]
    norm = _grad_norm(optimizer, trainer)
    optimizer._dpo_lab_grad_norm = (trainer.global_step, norm)
    return norm


def _grad_norm(optimizer: torch.optim.Optimizer, trainer: L.Trainer | None) -> torch.Tensor | None:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    sharded = shards_gradients(trainer)
    if not grads and not sharded:
        return None
    if grads:  # one norm per tensor, in each gradient's dtype, then their squares in fp64
        squares = torch.stack([n.double() for n in torch._foreach_norm(grads)]).square().sum()
    else:  # this process's shards are empty; it still takes part in the reduction
        squares = torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device)
    if sharded:
        squares = trainer.strategy.reduce(squares, reduce_op="sum")
    return squares.sqrt()


class NonFiniteGuard(L.Callback):
    """See the module docstring. ``mode``: ``error`` or ``skip``."""

    MAX_OVERFLOWS = 30  # consecutive fp16 overflows: the scale is then 2^-14 of its start

    def __init__(self, mode: str = "error"):
        if mode not in MODES:
            raise ConfigError(
                f"callbacks.nonfinite_guard.mode={mode!r}: expected {' or '.join(MODES)}"
            )
        self.mode = mode
        self._consecutive_overflows = 0
        self.skipped = 0  # steps skipped for a non-finite loss or gradient (mode=skip)
        self.overflows = 0  # fp16 steps the GradScaler skipped
        self._losses: list[torch.Tensor] = []
        self._ids: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if self.mode == "skip" and isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ConfigError(
                "callbacks.nonfinite_guard.mode=skip under DeepSpeed: its engine keeps the "
                "gradients and steps on its own, so a step cannot be skipped from here; use "
                "mode=error (DeepSpeed's fp16 loss scaler skips overflowing steps itself)"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *_: Any):
        self._ids += list(batch.get("ids", [])) if isinstance(batch, dict) else []

    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        losses, ids = self._losses, self._ids
        self._losses, self._ids = [], []
        norm, none = grad_norm(optimizer, trainer), torch.zeros((), device=pl_module.device)
        bad_grad = none if norm is None else ~torch.isfinite(norm.to(none.device))
        bad_loss = torch.stack([~torch.isfinite(x).all() for x in losses]).any() if losses else none
        flags = torch.stack([bad_loss.to(none.device), bad_grad]).float()
        if trainer.world_size > 1:  # every process takes the same decision
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        bad_loss, bad_grad = (bool(v) for v in flags.cpu() > 0)  # the step's one device sync
        if not (bad_loss or bad_grad):
            self._consecutive_overflows = 0
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not bad_loss:  # fp16 overflow: the scaler skips this step
            self.overflows += 1
            self._consecutive_overflows += 1
            pl_module.log("train/skipped_overflow", float(self.overflows), on_step=True)
            if self._consecutive_overflows < self.MAX_OVERFLOWS:
                return
            # not an overflow any more: a NaN that no loss scale removes (e.g. in a weight)
            raise NonFiniteError(
                f"non-finite gradients at {self.MAX_OVERFLOWS} steps in a row up to step "
                f"{trainer.global_step} under fp16, the GradScaler's scale down to "
                f"{scaler.get_scale():.3g}: not an overflow the scaler can skip"
            )
        if self.mode == "error":
            raise self._error(trainer, pl_module, optimizer, losses, ids, bad_loss)
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW leaves weights and moments
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True)

    def _error(self, trainer, pl_module, optimizer, losses, ids, bad_loss) -> NonFiniteError:
        """The message; never raises itself (a StopIteration escaping a hook would end the
        epoch silently, and under FSDP leave the other processes waiting)."""
        if bad_loss:
            value = next((x for x in losses if not torch.isfinite(x).all()), None)
            what = "loss" + (f" {value.float().mean().item()}" if value is not None else "")
            where = "" if value is not None else " (on another process)"
        else:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            first = next(
                (
                    names.get(id(p), "?")
                    for g in optimizer.param_groups
                    for p in g["params"]
                    if p.grad is not None and not torch.isfinite(p.grad).all()
                ),
                None,
            )
            what = "gradient" + (f" (first: {first})" if first else "")
            # a finite gradient whose norm overflows, or another process's shard
            where = "" if first else " (norm only: no single gradient here is non-finite)"
        what += where
        shown = ", ".join(ids[:16]) + (" ..." if len(ids) > 16 else "")
        return NonFiniteError(
            f"non-finite {what} at step {trainer.global_step} (batch examples: {shown}); "
            "callbacks.nonfinite_guard.mode=skip skips such updates instead"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = state.get("skipped", 0)
        self.overflows = state.get("overflows", 0)
