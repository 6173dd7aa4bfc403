"""Per-example means of a split's metrics, correct across micro-batches and ranks.

Every metric is a torchmetrics ``MeanMetric`` fed per-example values (a loss's batch scalar
counts once per example of its batch), so a mean weights each example once, whatever the batch
sizes, the gradient-accumulation micro-batches or the processes it was spread over: ``compute``
reduces Σ value and Σ count over ranks before dividing. A subset that held no example anywhere
(e.g. no undesirable KTO example in a step) has weight 0 and is left out rather than logged as 0.

Names (without the split prefix) are those of the README's metrics table:
``loss``, the loss's own extras (``kl``, ``penalty``, ``nll``, ...), ``rewards/{chosen,rejected}``,
``logps/{chosen,rejected}``, ``ref_logps/{chosen,rejected}`` and, for paired data,
``rewards/{margins,accuracies}``. For unpaired data "chosen" means the desirable examples and
"rejected" the undesirable ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from dpo_lab.losses import LossOutput, PairedLogps, UnpairedLogps


class _WeightedSum(MeanMetric):
    """A ``MeanMetric`` whose ``compute`` gives (Σ value·weight, Σ weight) over every rank, so that
    an empty subset is told apart from a mean that is really NaN."""

    def compute(self) -> Tensor:
        return torch.stack([self.mean_value, self.weight])


class PreferenceMetrics(nn.Module):
    """The metrics of one split; ``paired`` says once which kind of data it describes."""

    def __init__(self, paired: bool):
        super().__init__()
        self.means = nn.ModuleDict()  # one metric per name, made at its first update
        self._keep = True
        self._update = self._paired if paired else self._unpaired

    def update(
        self, policy: PairedLogps | UnpairedLogps, reference, out: LossOutput, weight: float = 1.0
    ) -> None:
        """Add one micro-batch: the policy's and reference's log-probs and the loss's output.
        ``weight=0`` adds no example but still makes every name (a process with nothing to add
        must take part in the same reductions as the others)."""
        self._keep = weight != 0
        B = len(out.losses)
        self._add("loss", out.losses.detach())
        for name, value in out.metrics.items():  # batch scalars: one value per example
            self._add(name, value.detach().reshape(()).expand(B))
        self._update(policy, reference, out)
        self._keep = True

    def _paired(self, policy: PairedLogps, reference: PairedLogps | None, out: LossOutput) -> None:
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        self._add("rewards/chosen", chosen)
        self._add("rewards/rejected", rejected)
        self._add("rewards/margins", chosen - rejected)
        self._add("rewards/accuracies", (chosen > rejected).float())
        self._add("logps/chosen", policy.chosen.detach())
        self._add("logps/rejected", policy.rejected.detach())
        if reference is not None:
            self._add("ref_logps/chosen", reference.chosen)
            self._add("ref_logps/rejected", reference.rejected)

    def _unpaired(
        self, policy: UnpairedLogps, reference: UnpairedLogps | None, out: LossOutput
    ) -> None:
        for name, sel in (("chosen", policy.desirable), ("rejected", ~policy.desirable)):
            self._add(f"rewards/{name}", out.chosen_rewards[sel])  # may be empty: weight 0
            self._add(f"logps/{name}", policy.completion.detach()[sel])
            if reference is not None:
                self._add(f"ref_logps/{name}", reference.completion[sel])

    def _add(self, name: str, values: Tensor) -> None:
        key = name.replace("/", "__")  # module names cannot hold "."; "/" is kept readable
        if key not in self.means:
            # nan_strategy="disable": a non-finite loss is reported as it is, never dropped.
            # (torchmetrics 1.9 then ignores any `weight` argument, so none is ever passed:
            # every value is one example's)
            self.means[key] = _WeightedSum(nan_strategy="disable").to(values.device)
        self.means[key].update(values.float() if self._keep else values.float()[:0])

    def compute(self) -> dict[str, Tensor]:
        """Per-example means over everything added since the last reset, reduced over ranks
        (every rank must call this). Names whose examples numbered 0 everywhere are left out."""
        keys = [k for k, m in self.means.items() if m._update_count]  # e.g. a skipped step
        if not keys:
            return {}
        sums = torch.stack([self.means[k].compute() for k in keys]).cpu()  # one device sync
        return {
            k.replace("__", "/"): total / weight
            for k, (total, weight) in zip(keys, sums, strict=True)
            if weight > 0
        }

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()
