"""TR-DPO: the reference model updated toward the policy during training.

Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656, Sec. 3: every τ optimizer steps, soft, π_ref ← α·π + (1 − α)·π_ref (TR-DPO^α),
or hard, π_ref ← π (α = 1, TR-DPO^τ). The paper's values are α = 0.6 and τ = 512 for runs of
thousands of steps. Any loss with a reference model trains against the moving reference; TRL's
``sync_ref_model`` (``ref_model_mixup_alpha``, ``ref_model_sync_steps``) is the same update.

The loss, and so the ``train/*`` and ``val/*`` rewards, margins and ``ref_logps``, use the moving
reference, as the method does. The probe and the end-of-run evaluation measure against the
starting model, so TR-DPO runs sit on the same axes as every other: the probe scored the
reference once before training, and at the end of fitting the reference is put back to its
starting weights (kept on the CPU) before the evaluation samples it and reports KL(π‖π_ref).
The moving reference is saved in the callback's checkpoint state (one more copy of the model),
the final checkpoint included, so a resumed or extended run continues from it. The callback
runs before the other callbacks at each step's end, so a checkpoint written at that step holds
the step's update.

Refused, each as one ConfigError at setup: a reference-free loss (no reference), a precomputed
reference (no model to update), LoRA (the reference is the policy's own base with the adapters
off, so it cannot move apart from it) and sharded strategies (FSDP, DeepSpeed: the policy's
parameters are shards there).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dpo_lab.errors import ConfigError

NAME = "callbacks.reference_update"


class ReferenceUpdate(L.Callback):
    """π_ref ← α·π + (1 − α)·π_ref every ``every_n_steps`` optimizer steps (α = 1: hard)."""

    def __init__(self, every_n_steps: int = 512, alpha: float = 0.6):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(
                f"{NAME}.every_n_steps must be an integer >= 1, got {every_n_steps!r}"
            )
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"{NAME}.alpha must be in (0, 1] (1: hard update), got {alpha!r}")
        self.every_n_steps, self.alpha = every_n_steps, alpha
        self.last_step = 0
        self.updates = 0
        self._start: dict[str, torch.Tensor] | None = None
        self._resume: dict[str, torch.Tensor] | None = None
        self._module: Any = None
        self._final: dict[str, torch.Tensor] | None = None

    def _model(self, pl_module: Any) -> torch.nn.Module:
        from dpo_lab.lora import PeftReference

        reference = getattr(pl_module, "reference", None)
        if reference is None:
            raise ConfigError(f"{NAME} (TR-DPO) needs a reference model; this loss has none")
        model = reference.model
        if model is None:
            raise ConfigError(
                f"{NAME} (TR-DPO) updates the reference model, and reference.precompute=true "
                "has none; drop one of the two"
            )
        if isinstance(model, PeftReference):
            raise ConfigError(
                f"{NAME} (TR-DPO) cannot move a LoRA run's reference: it is the policy's own "
                "base with the adapters off; train without model.lora or drop the callback"
            )
        return model

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"{NAME} (TR-DPO) is not available under {type(trainer.strategy).__name__}: "
                "the policy's parameters are shards there; use DDP or one device"
            )
        model = self._model(pl_module)
        ours = {k: tuple(p.shape) for k, p in model.named_parameters()}
        theirs = {k: tuple(p.shape) for k, p in pl_module.policy.named_parameters()}
        if ours != theirs:
            raise ConfigError(
                f"{NAME} (TR-DPO) moves the reference toward the policy, parameter by parameter; "
                "they differ (reference.name_or_path names another architecture): "
                f"{sorted(set(ours.items()) ^ set(theirs.items()))[:3]}"
            )
        # first at each step's end, so a checkpoint written at this step holds the update
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)
        self._module, self._final = pl_module, None
        self._start = self._copy(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._resume is not None:  # a resumed run continues from the moved reference
            self._model(pl_module).load_state_dict(self._resume)
            self._resume = None
        total = trainer.estimated_stepping_batches
        if total != float("inf") and self.every_n_steps >= total:
            rank_zero_warn(
                f"{NAME}.every_n_steps={self.every_n_steps}, but the run has {int(total)} "
                "optimizer steps: no training step sees a moved reference (TR-DPO is plain DPO "
                "here)"
            )

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every_n_steps:
            return  # not an optimizer step (gradient accumulation), or not yet time
        self.last_step = step
        reference = dict(self._model(pl_module).named_parameters())
        for name, p in pl_module.policy.named_parameters():
            ref = reference[name]
            ref.mul_(1 - self.alpha).add_(p.detach().to(ref.dtype), alpha=self.alpha)
        self.updates += 1
        pl_module.log("train/reference_updates", float(self.updates), on_step=True, batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """The starting reference back, for the evaluation and anything after fitting; the moved
        one kept for the final checkpoint (written after this)."""
        if self._start is not None:  # only the process that writes checkpoints keeps a copy
            self._final = self._copy(pl_module) if trainer.is_global_zero else None
            self._model(pl_module).load_state_dict(self._start)
        self._module, self._start = None, None

    def _copy(self, pl_module: Any) -> dict[str, torch.Tensor]:
        model = self._model(pl_module)
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        current = self._copy(self._module) if self._module is not None else self._final
        return {"last_step": self.last_step, "updates": self.updates, "reference": current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.updates = state["last_step"], state["updates"]
        self._resume = state.get("reference")
