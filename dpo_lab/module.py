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

from dpo_lab.errors import ConfigError, NonFiniteError
from dpo_lab.faults import rng_state, set_rng_state
from dpo_lab.logps import completion_logps
from dpo_lab.losses import LossOutput, LossSpec, PairedLogps, UnpairedLogps


def paired_logps(model: torch.nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> PairedLogps:
    """Chosen and rejected log-probs from one forward over the concatenated (2B, T) block:
    rows [0, B) are chosen, [B, 2B) rejected. ``kwargs`` go to ``completion_logps``."""
    logps, tokens = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs
    )
    B = logps.shape[0] // 2
    return PairedLogps(logps[:B], logps[B:], tokens[:B], tokens[B:])


class PreferenceModule(L.LightningModule):
    """Preference optimization of ``policy`` against a frozen ``reference``.

    Args:
        policy: the causal LM being trained.
        reference: the frozen reference LM, or None for reference-free losses.
        loss: the registered loss.
        loss_kwargs: its hyperparameters (already checked against its signature).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` stepped every step, or None.
        logps_kwargs: ``chunk_size`` and ``recompute`` for ``completion_logps``.
        on_nonfinite: ``error`` stops at a non-finite loss or gradient, naming the step and the
            batch's example ids; ``skip`` skips that update and counts it
            (``train/skipped_nonfinite``).
        online: an ``OnlinePairs``: each training batch's prompts are answered by the current
            policy, judged and paired, and those pairs are trained on (``algo=online``).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        loss: LossSpec,
        loss_kwargs: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logps_kwargs: dict[str, Any] | None = None,
        on_nonfinite: str = "error",
        online: Any = None,
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
        self.logps_kwargs = dict(logps_kwargs or {})
        if on_nonfinite not in ("error", "skip"):
            raise ConfigError(f"trainer.on_nonfinite={on_nonfinite!r}: expected error or skip")
        self.on_nonfinite = on_nonfinite
        self.skipped_nonfinite = 0
        self._batch_ids: list[str] = []
        self._loss_finite = True
        self.online = online
        self._step_started: float | None = None
        self._gen_seconds = 0.0
        self.online_pairs_total = 0  # pairs trained on so far (online)
        self._val_sums: dict[str, Tensor] = {}  # multi-process validation sums (Σ v·n, Σ n)

    def train(self, mode: bool = True) -> PreferenceModule:
        """Lightning puts the module in train mode at fit start; the reference stays in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- log-probs ------------------------------------------------------------------------------

    def paired_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> PairedLogps:
        """Chosen and rejected log-probs of ``batch`` under ``model`` (see ``paired_logps``)."""
        return paired_logps(model, batch, **self.logps_kwargs)

    def reference_paired_logps(
        self, batch: dict[str, Tensor], policy: PairedLogps
    ) -> PairedLogps | None:
        """The reference's log-probs: precomputed ones carried by the batch, or a forward."""
        if "ref_chosen_logps" in batch:
            return PairedLogps(
                batch["ref_chosen_logps"],
                batch["ref_rejected_logps"],
                policy.chosen_tokens,
                policy.rejected_tokens,
            )
        if self.reference is None:
            return None
        with torch.inference_mode():
            ref = self.paired_logps(self.reference, batch)
        # leave inference mode: the loss combines these with tensors that need grad
        return PairedLogps(
            *(t.clone() for t in (ref.chosen, ref.rejected, ref.chosen_tokens, ref.rejected_tokens))
        )

    def unpaired_logps(
        self, model: torch.nn.Module, batch: dict[str, Tensor], grad: bool
    ) -> UnpairedLogps:
        """Completions with grad (if asked); mismatched KL rows never (z₀ is detached)."""
        kw = self.logps_kwargs
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            logps, tokens = completion_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kw
            )
        with torch.no_grad():
            kl, _ = completion_logps(
                model,
                batch["kl_input_ids"],
                batch["kl_attention_mask"],
                batch["kl_completion_mask"],
                **kw,
            )
        return UnpairedLogps(logps, tokens, batch["desirable"], kl)

    # -- steps ----------------------------------------------------------------------------------

    def _forward_loss(self, batch: dict[str, Tensor]) -> tuple[Any, Any, LossOutput]:
        if self.loss.data == "unpaired":
            policy = self.unpaired_logps(self.policy, batch, grad=True)
            reference = (
                self.unpaired_logps(self.reference, batch, grad=False)
                if self.reference is not None
                else None
            )
        else:
            policy = self.paired_logps(self.policy, batch)
            reference = self.reference_paired_logps(batch, policy)
        return policy, reference, self.loss(policy, reference, **self.loss_kwargs)

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        policy, reference, out = self._forward_loss(batch)
        loss = out.losses.mean()
        train = split == "train"
        # (value, batch size) per metric, so epoch means weight every example equally
        metrics: dict[str, tuple[Tensor, int]] = {"loss": (loss.detach(), len(out.losses))}
        metrics.update({k: (v, len(out.losses)) for k, v in out.metrics.items()})
        if isinstance(policy, PairedLogps):
            chosen_r, rejected_r = out.chosen_rewards, out.rejected_rewards
            B = len(chosen_r)
            metrics.update(
                {
                    "rewards/chosen": (chosen_r.mean(), B),
                    "rewards/rejected": (rejected_r.mean(), B),
                    "rewards/margins": ((chosen_r - rejected_r).mean(), B),
                    "rewards/accuracies": ((chosen_r > rejected_r).float().mean(), B),
                    "logps/chosen": (policy.chosen.detach().mean(), B),
                    "logps/rejected": (policy.rejected.detach().mean(), B),
                }
            )
            if reference is not None:
                metrics["ref_logps/chosen"] = (reference.chosen.mean(), B)
                metrics["ref_logps/rejected"] = (reference.rejected.mean(), B)
        else:  # unpaired: "chosen" = desirable examples, "rejected" = undesirable ones
            for name, sel in (("chosen", policy.desirable), ("rejected", ~policy.desirable)):
                n = int(sel.sum())  # may be 0: kept, so every process logs the same keys
                zero = policy.completion.new_zeros(())
                metrics[f"rewards/{name}"] = (out.chosen_rewards[sel].mean() if n else zero, n)
                metrics[f"logps/{name}"] = (
                    policy.completion.detach()[sel].mean() if n else zero,
                    n,
                )
                if reference is not None:
                    metrics[f"ref_logps/{name}"] = (
                        reference.completion[sel].mean() if n else zero,
                        n,
                    )
        self._log_metrics(metrics, split)
        # the progress bar: short names, kept out of the logs
        bar = {"loss": "loss", "acc": "rewards/accuracies"}
        for short, k in bar.items():
            if k in metrics:
                v, n = metrics[k]
                self.log(short, v, prog_bar=True, logger=False, batch_size=n, on_epoch=not train)
        return loss

    def _log_metrics(self, metrics: dict[str, tuple[Tensor, int]], split: str) -> None:
        """Log per-example means. Across processes, metrics are reduced here as (Σ value·n, Σ n)
        over every rank, so uneven shards are weighted by their examples, not averaged as rank
        means: a training step's at once, validation's summed over the epoch and reduced in
        ``on_validation_epoch_end``. (Lightning's own sync_dist is not used for validation: it
        averages the integer example counts over ranks with integer division, which skews the
        mean when the shards are uneven — found by the DDP test with 47 validation pairs.)"""
        train = split == "train"
        world = self.trainer.world_size if self._trainer is not None else 1
        if not train and world > 1:
            for k, (v, n) in metrics.items():
                acc = self._val_sums.setdefault(k, torch.zeros(2, device=self.device))
                acc += torch.stack([v.detach().float() * n, v.new_tensor(float(n)).float()])
            return
        if train and world > 1:
            keys = sorted(metrics)
            packed = torch.stack(
                [
                    torch.stack(
                        [
                            metrics[k][0].detach().float() * metrics[k][1],
                            torch.tensor(float(metrics[k][1]), device=self.device),
                        ]
                    )
                    for k in keys
                ]
            )
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
            metrics = {
                k: (packed[i, 0] / packed[i, 1], int(packed[i, 1]))
                for i, k in enumerate(keys)
                if packed[i, 1] > 0
            }
        for k, (v, n) in metrics.items():
            if n == 0 and world == 1:
                continue  # e.g. no undesirable example in this batch
            self.log(f"{split}/{k}", v, batch_size=n, on_step=train, on_epoch=not train)

    def on_validation_epoch_end(self) -> None:
        """Multi-process validation: reduce the epoch's (Σ value·n, Σ n) over ranks and log the
        per-example means (every rank logged the same keys: unpaired keys are always present)."""
        if not self._val_sums:
            return
        keys = sorted(self._val_sums)
        packed = self.trainer.strategy.reduce(
            torch.stack([self._val_sums[k] for k in keys]), reduce_op="sum"
        )
        self._val_sums = {}
        for i, k in enumerate(keys):
            if packed[i, 1] > 0:
                self.log(f"val/{k}", packed[i, 0] / packed[i, 1])

    def _online_batch(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Replace the batch's fixed pairs by pairs sampled from the policy and judged."""
        import time

        now = time.perf_counter()
        metrics: dict[str, float] = {}
        if self._step_started is not None:  # the previous step's share spent generating
            metrics["online/gen_time_share"] = self._gen_seconds / (now - self._step_started)
        self._step_started = now
        batch, step_metrics = self.online(self.policy, self.reference, batch)
        self._gen_seconds = step_metrics["online/gen_seconds"]
        self.online_pairs_total += int(step_metrics["online/pairs"])
        metrics.update(step_metrics)
        metrics["online/pairs_total"] = float(self.online_pairs_total)
        self.log_dict(metrics, on_step=True, batch_size=1)
        return batch

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.online is not None:
            batch = self._online_batch(batch)
            if batch is None:  # every prompt's samples tied: nothing to learn from this step
                self._batch_ids, self._loss_finite = [], True
                return None
        loss = self._step(batch, "train")
        self._batch_ids = list(batch.get("ids", []))
        self._loss_finite = bool(torch.isfinite(loss))
        if not self._loss_finite and self.on_nonfinite == "error":
            raise self._nonfinite_error(f"loss {loss.item()}")
        return loss

    def _nonfinite_error(self, what: str) -> NonFiniteError:
        ids = ", ".join(self._batch_ids[:16]) + (" ..." if len(self._batch_ids) > 16 else "")
        return NonFiniteError(
            f"non-finite {what} at step {self.global_step} (batch examples: {ids}); "
            "trainer.on_nonfinite=skip skips such updates instead"
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure=None):
        """Run forward and backward, then step only if loss and gradients are finite."""
        optimizer_closure()
        bad = next(
            (
                name
                for name, p in self.policy.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ),
            None,
        )
        if self._loss_finite and bad is None:
            optimizer.step(closure=lambda: None)  # the closure has run: step on its gradients
            return
        if self.on_nonfinite == "error":
            raise self._nonfinite_error(f"gradient (first: {bad})")
        self.skipped_nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True)

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
        checkpoint["dpo_lab"] = {
            "rng": rng_state(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "online_pairs_total": self.online_pairs_total,
        }
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("dpo_lab", {})
        if "rng" in extra:
            set_rng_state(extra["rng"])
        self.skipped_nonfinite = extra.get("skipped_nonfinite", 0)
        self.online_pairs_total = extra.get("online_pairs_total", 0)
        if self.reference is not None:  # keep the reference this module was built with
            checkpoint["state_dict"].update(
                {f"reference.{k}": v for k, v in self.reference.state_dict().items()}
            )
