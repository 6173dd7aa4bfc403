"""``PreferenceModule``: the trainable policy, the frozen reference and a registered loss.

The module never branches on a loss's name. It reads what the loss declares: whether it needs a
reference (a reference-free loss is built without one, so none is loaded or run) and whether it
takes paired or unpaired data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dpo_lab.logps import completion_logps
from dpo_lab.losses import LossSpec, PairedLogps


class PreferenceModule(L.LightningModule):
    """Preference optimization of ``policy`` against a frozen ``reference``.

    Args:
        policy: the causal LM being trained.
        reference: the frozen reference LM, or None for reference-free losses.
        loss: the registered loss.
        loss_kwargs: its hyperparameters (already checked against its signature).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` stepped every step, or None.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        loss: LossSpec,
        loss_kwargs: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ):
        super().__init__()
        if loss.reference and reference is None:
            raise ValueError(f"loss {loss.name!r} needs a reference model")
        if not loss.reference and reference is not None:
            raise ValueError(f"loss {loss.name!r} is reference-free; do not load a reference")
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.loss, self.loss_kwargs = loss, loss_kwargs
        self._optimizer, self._scheduler = optimizer, scheduler

    def train(self, mode: bool = True) -> PreferenceModule:
        """Lightning puts the module in train mode at fit start; the reference stays in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- log-probs ------------------------------------------------------------------------------

    @staticmethod
    def paired_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> PairedLogps:
        """One forward over the concatenated (2B, T) block; rows [0, B) chosen, [B, 2B) rejected."""
        logps, tokens = completion_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        B = logps.shape[0] // 2
        return PairedLogps(logps[:B], logps[B:], tokens[:B], tokens[B:])

    def reference_paired_logps(self, batch: dict[str, Tensor]) -> PairedLogps | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            return self.paired_logps(self.reference, batch)

    # -- steps ----------------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        policy = self.paired_logps(self.policy, batch)
        reference = self.reference_paired_logps(batch)
        out = self.loss(policy, reference, **self.loss_kwargs)
        loss = out.losses.mean()
        chosen_r, rejected_r = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/margins": (chosen_r - rejected_r).mean(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
            **{k: v for k, v in out.metrics.items()},
        }
        if reference is not None:
            metrics["ref_logps/chosen"] = reference.chosen.mean()
            metrics["ref_logps/rejected"] = reference.rejected.mean()
        B = policy.chosen.shape[0]
        train = split == "train"
        self.log_dict(
            {f"{split}/{k}": v for k, v in metrics.items()},
            batch_size=B,
            on_step=train,
            on_epoch=not train,
        )
        # the progress bar: short names, no duplicates in the logs
        self.log(
            "loss", loss.detach(), prog_bar=True, logger=False, batch_size=B, on_epoch=not train
        )
        self.log(
            "acc",
            metrics["rewards/accuracies"],
            prog_bar=True,
            logger=False,
            batch_size=B,
            on_epoch=not train,
        )
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        if self._scheduler is None:
            return optimizer
        scheduler = self._scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints: the reference is rebuilt from its source, never stored --------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:  # keep the reference this module was built with
            checkpoint["state_dict"].update(
                {f"reference.{k}": v for k, v in self.reference.state_dict().items()}
            )
