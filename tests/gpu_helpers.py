"""Callbacks the GPU tests add from the command line (``+callbacks.<name>._target_=...``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class WeightsChanged(L.Callback):
    """Writes to ``path`` the trainable policy parameters that training left unchanged."""

    def __init__(self, path: str):
        self.path, self.start = Path(path), {}

    def on_fit_start(self, trainer, pl_module):
        self.start = {
            n: p.detach().float().cpu().clone()
            for n, p in pl_module.policy.named_parameters()
            if p.requires_grad
        }

    def on_train_end(self, trainer, pl_module):
        params = dict(pl_module.policy.named_parameters())
        same = [
            n for n, s in self.start.items() if torch.equal(params[n].detach().float().cpu(), s)
        ]
        self.path.write_text(json.dumps(same))


class ProbePairs(L.Callback):
    """Writes the probe pairs' texts to ``path`` (one JSON line each), so that a test can score
    them again with the saved ``final/`` model."""

    def __init__(self, path: str):
        self.path = Path(path)

    def setup(self, trainer, pl_module, stage):
        dm = trainer.datamodule
        rows = {r["id"]: r for r in dm.data.val}
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                for it in dm.probe_items:
                    r = rows[it["id"]]
                    keep = {k: r[k] for k in ("id", "prompt", "chosen", "rejected")}
                    f.write(json.dumps(keep) + "\n")
