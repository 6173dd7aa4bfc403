"""Lightning callbacks, each on Lightning's own hooks; ``conf/callbacks/default.yaml`` lists the
ones every run has (``~callbacks.<name>`` removes one, ``+callbacks.<name>._target_=...`` adds one).

- ``probe.py``: the displacement probe (chosen/rejected log-prob trajectories of fixed pairs);
- ``nonfinite.py``: the non-finite guard (stop or skip a step on a NaN/inf loss or gradient);
- ``step_stats.py``: learning rate, gradient norm, throughput and peak memory per step;
- ``reference_update.py``: TR-DPO's reference updates (``callbacks=[default,tr_dpo]``).

Checkpointing callbacks live with the rest of fault tolerance in ``dpo_lab/faults.py``.
"""

from __future__ import annotations

from typing import Any

from dpo_lab.callbacks.nonfinite import NonFiniteGuard
from dpo_lab.callbacks.probe import DisplacementProbe
from dpo_lab.callbacks.reference_update import ReferenceUpdate
from dpo_lab.callbacks.step_stats import StepStats

__all__ = [
    "DisplacementProbe", "NonFiniteGuard", "ReferenceUpdate", "StepStats", "progress_bar"
]  # fmt: skip


def progress_bar() -> Any:
    """The bar Lightning itself would pick: Rich where it is installed, else tqdm."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return RichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
