"""Per-example means of a split's metrics, correct across micro-batches and ranks.

One torchmetrics ``Metric`` per split holds, for every metric name, the sum of its per-example
values and their count (a loss's batch scalar counts once per example of its batch). ``compute``
reduces both over ranks (torchmetrics' sync: one gather of the two state vectors, whatever the
number of names) and divides, so a mean weights each example once, whatever the batch sizes, the
gradient-accumulation micro-batches or the processes it was spread over. A name with no example
anywhere (e.g. no undesirable KTO example in a step) is left out rather than logged as 0.

The names are fixed when the run is built (``metric_names``: the loss is called once on a
two-example stand-in to learn its own extras), so every process reduces the same vector.
Without the split prefix they are those of the README's metrics table: ``loss``, the loss's
extras (``kl``, ``penalty``, ``nll``, ...), ``rewards/{chosen,rejected}``,
``logps/{chosen,rejected}``, ``ref_logps/{chosen,rejected}`` and, for paired data,
``rewards/{margins,accuracies}``. For unpaired data "chosen" means the desirable examples and
"rejected" the undesirable ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from dpo_lab.losses import LossOutput, LossSpec, PairedLogps, UnpairedLogps

SIDES = ("chosen", "rejected")


def metric_names(loss: LossSpec, loss_kwargs: dict[str, Any], reference: bool) -> list[str]:
    """Every name a step of this loss logs (see the module docstring)."""
    values = torch.tensor([-1.0, -2.0])
    tokens = torch.tensor([3, 3])
    if loss.data == "paired":
        zeros = torch.zeros(2)  # the stand-in has every optional field a loss may read
        policy: Any = PairedLogps(
            values, values.flip(0), tokens, tokens, values, values.flip(0), zeros, zeros
        )
        ref: Any = PairedLogps(
            values - 0.5, values.flip(0) - 0.5, tokens, tokens, values - 0.5, values.flip(0) - 0.5
        )
        names = ["rewards/margins", "rewards/accuracies"]
    else:
        policy = UnpairedLogps(values, tokens, torch.tensor([True, False]), values.flip(0))
        ref = UnpairedLogps(values - 0.5, tokens, torch.tensor([True, False]), values - 0.5)
        names = []
    out = loss(policy, ref if loss.reference else None, **loss_kwargs)
    names += [f"{kind}/{side}" for kind in ("rewards", "logps") for side in SIDES]
    if reference:
        names += [f"ref_logps/{side}" for side in SIDES]
    return ["loss", *out.metrics, *names]


class PerExampleMeans(Metric):
    """Sums and counts of per-example values, one entry per name; reduced by summing."""

    full_state_update = False

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        n = len(self.names)
        # float64 sums: an epoch's worth of log-probs keeps its digits
        self.add_state("totals", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def _apply(self, fn: Any, exclude_state: Any = ()) -> PerExampleMeans:
        """Moves with the module, but stays float64: ``bf16-true`` casts the LightningModule
        with ``.to(bfloat16)``, which torchmetrics would apply to the sums too."""
        this = super()._apply(fn, exclude_state)
        for key in ("totals", "counts"):
            setattr(this, key, getattr(this, key).double())
            this._defaults[key] = this._defaults[key].double()
        return this

    def update(self, values: dict[str, Tensor]) -> None:
        """``values``: name → per-example values (any shape, possibly empty), every name."""
        sums = torch.stack([values[k].detach().double().sum() for k in self.names])
        counts = torch.tensor(
            [float(values[k].numel()) for k in self.names], dtype=torch.float64
        ).to(sums.device)
        self.totals += sums
        self.counts += counts

    def compute(self) -> Tensor:
        return torch.stack([self.totals, self.counts])

    def means(self) -> dict[str, Tensor]:
        """Per-example means over everything added since the last reset, reduced over ranks
        (every rank calls this). Names with no example anywhere are left out."""
        if not self._update_count:  # nothing added (a skipped step): nothing to report
            return {}
        totals, counts = self.compute().cpu()  # the one device sync
        return {
            k: (t / c).float() for k, t, c in zip(self.names, totals, counts, strict=True) if c > 0
        }


class PreferenceMetrics(nn.Module):
    """The metrics of one split; ``paired`` says once which kind of data it describes."""

    def __init__(self, paired: bool, names: list[str]):
        super().__init__()
        self.means = PerExampleMeans(names)
        self._values = self._paired if paired else self._unpaired

    def update(
        self, policy: PairedLogps | UnpairedLogps, reference, out: LossOutput, weight: float = 1.0
    ) -> None:
        """Add one micro-batch: the policy's and reference's log-probs and the loss's output.
        ``weight=0`` adds no example (a stand-in batch: see ``PreferenceModule.training_step``)."""
        B = len(out.losses)
        values = {"loss": out.losses}
        for name, value in out.metrics.items():  # batch scalars: one value per example
            values[name] = value.reshape(()).expand(B)
        values.update(self._values(policy, reference, out))
        if weight == 0:
            values = {k: v[:0] for k, v in values.items()}
        self.means.update(values)

    @staticmethod
    def _paired(policy: PairedLogps, reference: PairedLogps | None, out: LossOutput):
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "logps/chosen": policy.chosen,
            "logps/rejected": policy.rejected,
        }
        if reference is not None:
            values |= {
                "ref_logps/chosen": reference.chosen,
                "ref_logps/rejected": reference.rejected,
            }
        return values

    @staticmethod
    def _unpaired(policy: UnpairedLogps, reference: UnpairedLogps | None, out: LossOutput):
        values = {}
        for side, sel in zip(SIDES, (policy.desirable, ~policy.desirable), strict=True):
            values[f"rewards/{side}"] = out.chosen_rewards[sel]  # may be empty: count 0
            values[f"logps/{side}"] = policy.completion[sel]
            if reference is not None:
                values[f"ref_logps/{side}"] = reference.completion[sel]
        return values

    def compute(self) -> dict[str, Tensor]:
        """``PerExampleMeans.means``: per-example means, reduced over ranks."""
        return self.means.means()

    def reset(self) -> None:
        self.means.reset()
