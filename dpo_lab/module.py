"""``PreferenceModule``: batch → log-probs → loss → metrics, and nothing else.

The module never branches on a loss's name. It reads what the loss declares, once, here: whether
it needs a reference (a reference-free loss is built without one, so none is loaded or run) and
whether it takes paired or unpaired data. Everything else lives where its name says:

- the reference, live or precomputed: ``reference.py`` (precompute itself: ``refcache.py``);
- per-example metric means across micro-batches and ranks: ``metrics.py``;
- the non-finite guard, the probe, lr / grad-norm / throughput: ``callbacks/``;
- online pair generation: ``online.py``; learning-rate schedules: ``schedules.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dpo_lab.errors import ConfigError
from dpo_lab.faults import rng_state, set_rng_state
from dpo_lab.logps import paired_logps, unpaired_logps
from dpo_lab.losses import LossOutput, LossSpec, UnpairedLogps
from dpo_lab.metrics import PreferenceMetrics, metric_names
from dpo_lab.sharding import all_gather_ragged, shards_gradients, synced_generation


class PreferenceModule(L.LightningModule):
    """Preference optimization of ``policy`` against a frozen ``reference``.

    Args:
        policy: the causal LM being trained.
        reference: a ``LiveReference`` or ``CachedReference`` (``dpo_lab.reference``), or None
            for a reference-free loss.
        loss: the registered loss.
        loss_kwargs: its hyperparameters (already checked against its signature).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer, total_steps=...) -> LRScheduler`` stepped every optimizer step
            (``dpo_lab.schedules``), or None for a constant rate.
        logps_kwargs: ``chunk_size`` and ``recompute`` for ``completion_logps``.
        online: an ``OnlinePairs`` (``algo=online``): each training batch's prompts are answered
            by the current policy, judged and paired, and those pairs are trained on.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: Any,
        loss: LossSpec,
        loss_kwargs: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logps_kwargs: dict[str, Any] | None = None,
        online: Any = None,
    ):
        super().__init__()
        if loss.reference and reference is None:
            raise ValueError(f"loss {loss.name!r} needs a reference model")
        if not loss.reference and reference is not None:
            raise ValueError(f"loss {loss.name!r} is reference-free; do not load a reference")
        self.policy, self.reference = policy, reference
        self.loss, self.loss_kwargs = loss, loss_kwargs
        self._optimizer, self._scheduler = optimizer, scheduler
        self.logps_kwargs = dict(logps_kwargs or {})
        self.online = online
        paired = self._paired = loss.data == "paired"  # decided once for the whole run
        self._policy_logps = paired_logps if paired else unpaired_logps
        # what the loss declares it reads beyond the sums: WPO's aligned log-probs
        self._policy_kwargs = {**self.logps_kwargs, **({"aligned": True} if loss.aligned else {})}
        # the loss's state across steps (BCO's δ): a submodule, so it moves, follows train/eval
        # mode and is checkpointed with the module; never trained (buffers only)
        self.loss_state = loss.state() if loss.state is not None else None
        self._reference_logps = (
            None if reference is None else (reference.paired if paired else reference.unpaired)
        )
        names = metric_names(loss, loss_kwargs, reference is not None)
        self.train_metrics = PreferenceMetrics(paired, names)
        self.val_metrics = PreferenceMetrics(paired, names)

    def on_fit_start(self) -> None:
        """Train mode for the policy: Lightning keeps the modes modules were built in, and
        ``from_pretrained`` builds them in eval mode, where dropout (LoRA's too) and gradient
        checkpointing are off. The reference, not a submodule, stays in eval mode and is moved
        to the training device here."""
        self.train()
        if self.reference is not None:
            self.reference.to(self.device)

    @property
    def _several_processes(self) -> bool:
        return self._trainer is not None and self._trainer.world_size > 1

    def model_step(self, batch: dict[str, Any], split: str) -> tuple[Any, Any, LossOutput]:
        """(policy log-probs, reference log-probs or None, the loss's output) of one batch."""
        policy = self._policy_logps(self.policy, batch, **self._policy_kwargs)
        reference = None if self.reference is None else self._reference_logps(batch, split)
        if not self._paired and split == "train" and self._several_processes:
            policy, reference = _kl_rows_of_every_process(policy, reference)
        out = self.loss(policy, reference, state=self.loss_state, **self.loss_kwargs)
        return policy, reference, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        scale: Any = 1.0
        keep = True
        if self.online is not None:  # the batch's prompts, answered by the policy and judged
            batch, scale, keep = self._online_batch(batch)
            if batch is None:  # every prompt's samples tied: nothing to learn from this step
                return None
        policy, reference, out = self.model_step(batch, "train")
        self.train_metrics.update(policy, reference, out, weight=float(keep))
        self._progress_bar(out, on_epoch=False)
        loss = out.losses.mean() * scale
        return {"loss": loss, "tokens": _tokens(batch), "examples": len(out.losses) * keep}

    def _online_batch(self, batch: dict[str, Any]) -> tuple[Any, Any, bool]:
        """(pairs sampled from the policy and judged, the loss's scale, whether they count).

        Processes form different numbers of pairs, and DDP averages gradients over processes,
        so each process's mean loss is scaled by its share, n·W/N: the step's gradient is then
        the mean over every pair formed anywhere. A process whose prompts all tied trains a
        stand-in pair at scale 0 rather than returning None, which would leave the others
        waiting in DDP's gradient all-reduce and the metric reductions (DeepSpeed, even on one
        process, refuses a None step). If every process tied, the step's gradient is 0.
        """
        from lightning.pytorch.strategies import DeepSpeedStrategy

        model = None if self.reference is None else self.reference.model
        trainer, several = self._trainer, self._several_processes
        deepspeed = trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy)
        batch, metrics = self.online(
            self.policy,
            model,
            batch,
            synced_gpus=synced_generation(trainer),
            placeholder=several or deepspeed,
        )
        self.log_dict(metrics, on_step=True, batch_size=1)
        pairs = metrics["online/pairs"]
        if batch is None or not several:
            return batch, float(pairs > 0), pairs > 0
        n = torch.tensor(float(pairs), device=self.device)
        total = trainer.strategy.reduce(n, reduce_op="sum")
        return batch, n * trainer.world_size / total.clamp(min=1.0), pairs > 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's metrics: means over every micro-batch it accumulated, on every rank."""
        means = self.train_metrics.compute()
        self.train_metrics.reset()
        self.log_dict({f"train/{k}": v for k, v in means.items()}, on_step=True, on_epoch=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        policy, reference, out = self.model_step(batch, "val")
        self.val_metrics.update(policy, reference, out)
        self._progress_bar(out, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        means = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in means.items()})

    def _progress_bar(self, out: LossOutput, on_epoch: bool) -> None:
        """Short names on the progress bar, kept out of the logs (this process's values)."""
        B = len(out.losses)
        self.log("loss", out.losses.detach().mean(), prog_bar=True, logger=False, batch_size=B,
                 on_epoch=on_epoch)  # fmt: skip
        if out.rejected_rewards is not None:
            acc = (out.chosen_rewards > out.rejected_rewards).float().mean()
            self.log("acc", acc, prog_bar=True, logger=False, batch_size=B, on_epoch=on_epoch)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        if self._scheduler is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches  # optimizer steps (inf: unbounded)
        scheduler = self._scheduler(optimizer, total_steps=None if total == float("inf") else total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints: the policy and the RNG; the reference is not a submodule, never stored ---

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dpo_lab"] = {"rng": rng_state()}
        if self.online is not None:
            checkpoint["dpo_lab"]["online"] = self.online.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("dpo_lab", {})
        if "rng" in extra:  # exact: the data loaders draw from their own generators
            set_rng_state(extra["rng"])
        if self.online is not None and "online" in extra:
            self.online.load_state_dict(extra["online"])


def clip_gradients(
    module: L.LightningModule,
    optimizer: Any,
    gradient_clip_val: Any = None,
    gradient_clip_algorithm: Any = None,
) -> None:
    """Norm clipping over the whole gradient: under FSDP each process holds a shard, so the root
    module's ``clip_grad_norm_`` reduces the norm across processes (Lightning's FSDP precision
    plugin refuses norm clipping for that reason). Every module of this package clips so."""
    if gradient_clip_val and shards_gradients(module._trainer):
        if gradient_clip_algorithm not in (None, "norm"):
            raise ConfigError("under FSDP, trainer.gradient_clip_algorithm must be norm")
        module.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _kl_rows_of_every_process(policy: UnpairedLogps, reference: UnpairedLogps | None):
    """Unpaired data's KL rows (mismatched prompt/completion pairs) are a batch statistic (KTO's
    reference point z₀): estimated from every process's rows, as TRL does, not per process. In
    training only, where every process runs the same number of micro-batches; validation shards
    may differ by a batch, and keep their own estimate."""
    policy = dataclasses.replace(policy, kl=all_gather_ragged(policy.kl.detach()))
    if reference is not None:
        reference = dataclasses.replace(reference, kl=all_gather_ragged(reference.kl))
    return policy, reference


def _tokens(batch: dict[str, Any]) -> Tensor:
    """Non-padding tokens the policy's forward processes for ``batch`` (no device sync)."""

    def real(prefix: str) -> Any:  # a packed row has no padding
        mask = batch.get(f"{prefix}attention_mask")
        return batch[f"{prefix}input_ids"].numel() if mask is None else mask.sum()

    tokens = real("")
    if "kl_input_ids" in batch:  # KTO's mismatched rows are a second forward
        tokens = tokens + real("kl_")
    return tokens
