"""The displacement probe: a fixed held-out set of pairs scored every N steps from step 0.

DPO raises the margin between chosen and rejected, but often by lowering both log-probs (the
chosen one less). The probe shows this directly: mean log-probs of chosen and rejected under the
policy, their change from the reference, and the share of pairs whose chosen log-prob fell below
the reference's; where the task has a ground-truth reward, also how often the implicit reward
ranks the truly better completion higher (``probe/true_accuracies``, clean of label noise).
Per-example values go to ``probe.csv`` in the run dir (one row per example and
probe step), so displacement can be studied per example and per length; ``probe.png`` plots the
mean trajectories at the end of training.

Its cost is logged with it: ``probe/seconds`` (this probe step) and ``probe/time_share`` (every
probe step so far, the reference's scoring included, over the wall time since training started).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpo_lab.logps import paired_logps
from dpo_lab.losses import PairedLogps
from dpo_lab.sharding import full_root_params

log = logging.getLogger("dpo_lab")

PROBE_COLUMNS = (
    "step",
    "example_id",
    "chosen_tokens",
    "rejected_tokens",
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


class DisplacementProbe(L.Callback):
    """Scores the datamodule's probe pairs under the policy every ``every_n_steps`` steps.

    The probe set is the datamodule's (``probe_batches()``: the first ``probe.size`` held-out
    pairs, in batches of ``dataset.eval_batch_size``, packed when the run is); unpaired data has
    none, and the probe is then off. The reference level is the run's reference (live or
    precomputed), or, for reference-free losses (no reference is loaded), the policy's own
    log-probs before its first update, which is the same model. Both are scored in eval mode
    under the run's precision context, as the training step scores them.

    Args:
        every_n_steps: N; step 0 and the last step are always scored.
        out_dir: the run dir (``probe.csv``, ``probe.png``).
    """

    def __init__(self, every_n_steps: int, out_dir: str | Path):
        if every_n_steps < 1:
            from dpo_lab.errors import ConfigError

            raise ConfigError(f"probe.every_n_steps must be >= 1, got {every_n_steps}")
        self.every = every_n_steps
        self.csv_path = Path(out_dir) / "probe.csv"
        self.png_path = Path(out_dir) / "probe.png"
        self.batches: list[dict[str, torch.Tensor]] | None = None
        self.ids: list[str] = []
        self.reference: PairedLogps | None = None
        self.last_step = -1
        self.last_metrics: dict[str, float] = {}
        self.seconds = 0.0  # every scoring so far (this process's wall time)
        self._started: float | None = None
        # r(chosen) − r(rejected) under the task's ground-truth reward, when it has one
        self.true_margins: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or self.batches is not None:
            return
        if not getattr(dm, "probe_items", None):
            log.warning("unpaired data has no pairs: the displacement probe is off for this run")
            return
        self.batches = dm.probe_batches()
        self.ids = [it["id"] for it in dm.probe_items]
        self.true_margins = dm.probe_true_margins()

    @torch.no_grad()
    def _score(self, trainer: L.Trainer, pl_module: Any, model: Any) -> PairedLogps:
        """Under ``model`` (the policy) or, with ``model=None``, the run's reference."""
        parts = []
        was_training = model is not None and model.training
        if model is not None:
            model.eval()
        try:  # under FSDP every process gathers the root unit's weights (embeddings, norm, head)
            with full_root_params(trainer), trainer.precision_plugin.forward_context():
                for batch in self.batches:
                    batch = {
                        k: v.to(pl_module.device) if torch.is_tensor(v) else v
                        for k, v in batch.items()
                    }
                    if model is None:
                        out = pl_module.reference.paired(batch, "val")
                    else:
                        out = paired_logps(model, batch, **pl_module.logps_kwargs)
                    columns = (out.chosen, out.rejected, out.chosen_tokens, out.rejected_tokens)
                    parts.append([t.cpu() for t in columns])
        finally:
            if model is not None:
                model.train(was_training)
        return PairedLogps(*(torch.cat(column) for column in zip(*parts, strict=True)))

    def _record(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self.last_step or self.batches is None:
            return
        self.last_step = step
        t0, before = time.perf_counter(), self.seconds
        pol, ref = self._score(trainer, pl_module, pl_module.policy), self.reference
        metrics = {
            "probe/logps/chosen": pol.chosen.mean().item(),
            "probe/logps/rejected": pol.rejected.mean().item(),
            "probe/logratios/chosen": (pol.chosen - ref.chosen).mean().item(),
            "probe/logratios/rejected": (pol.rejected - ref.rejected).mean().item(),
            "probe/frac_chosen_below_ref": (pol.chosen < ref.chosen).float().mean().item(),
            # implicit-reward accuracy against the starting model, the same for every loss
            "probe/rewards/accuracies": ((pol.chosen - ref.chosen) > (pol.rejected - ref.rejected))
            .float()
            .mean()
            .item(),
        }
        if self.true_margins is not None:
            # the same ranking scored against the true reward instead of the (noisy) labels;
            # pairs whose true rewards tie carry no clean label and are left out
            known = self.true_margins != 0
            implicit = (pol.chosen - ref.chosen) - (pol.rejected - ref.rejected)
            agree = (implicit > 0) == (self.true_margins > 0)
            metrics["probe/true_accuracies"] = agree[known].float().mean().item()
        if trainer.is_global_zero:  # one table and one log per run, not one per process
            columns = (pol.chosen_tokens, pol.rejected_tokens, pol.chosen, pol.rejected,
                       ref.chosen, ref.rejected)  # fmt: skip
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerows(
                    [step, eid, int(ct), int(rt), *(f"{v:.6f}" for v in values)]
                    for eid, ct, rt, *values in zip(
                        self.ids, *(c.tolist() for c in columns), strict=True
                    )
                )
        # the whole probe step: scoring, metrics and its rows in probe.csv
        self.seconds += time.perf_counter() - t0
        metrics["probe/seconds"] = self.seconds - before
        wall = time.perf_counter() - self._started if self._started is not None else 0.0
        metrics["probe/time_share"] = self.seconds / wall if wall > 0 else 0.0
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed, so a resumed run keeps the starting model's scores as its reference level
        (for a reference-free loss, the resumed policy is no longer the start)."""
        ref = self.reference
        return {
            "last_step": self.last_step,
            "reference": None
            if ref is None
            else [ref.chosen, ref.rejected, ref.chosen_tokens, ref.rejected_tokens],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        if state["reference"] is not None:
            self.reference = PairedLogps(*state["reference"])
        self._resumed = True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.batches is None:
            return
        self._started, self.seconds = time.perf_counter(), 0.0
        if self.reference is None:  # the starting model, also for a reference-free loss
            model = None if pl_module.reference is not None else pl_module.policy
            self.reference = self._score(trainer, pl_module, model)
            self.seconds += time.perf_counter() - self._started  # part of the probe's cost
        if trainer.is_global_zero and getattr(self, "_resumed", False) and self.csv_path.exists():
            # rows a killed run wrote after its last checkpoint are written again: drop them
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= self.last_step]
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerows(keep)
        if trainer.is_global_zero and not self.csv_path.exists():
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(PROBE_COLUMNS)
        self._record(trainer, pl_module)  # step 0: the policy before any update

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        # at the first step at or past each multiple of N: a batch may take several optimizer
        # steps (PPO's epochs × minibatches), so the step can pass a multiple without landing on it
        if trainer.global_step // self.every > self.last_step // self.every:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._record(trainer, pl_module)  # the final policy, whatever N divides
        if trainer.is_global_zero and self.batches is not None:
            from dpo_lab.plots import plot_probe

            plot_probe(self.csv_path, self.png_path)
