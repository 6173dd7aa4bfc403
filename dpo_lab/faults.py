"""Fault tolerance: atomic checkpoints, resuming, saving on interrupt, RNG state.

- ``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the same directory, syncs it
  and renames it over the target: a write killed midway leaves the previous checkpoint intact.
- ``resolve_resume`` turns ``resume=auto|<run dir>|<file.ckpt>`` into the checkpoint to load.
- ``SaveOnInterrupt`` saves ``last.ckpt`` when a run is stopped by Ctrl-C or SIGTERM (a scheduler's
  preemption), never after a failure such as a non-finite loss: a bad step must not become the
  checkpoint a run resumes from.
- ``MetricsRowsAtCheckpoint``: after a resume, ``metrics.csv`` holds each logged row once.
- ``rng_state``/``set_rng_state``: Python, NumPy and torch (CPU, CUDA) generators, stored in every
  checkpoint by ``PreferenceModule``.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dpo_lab.errors import ConfigError

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp``, fsync, then ``os.replace`` onto ``<name>``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def is_checkpoint(p: Path) -> bool:
    """A Lightning checkpoint: a file, or under DeepSpeed a directory (DeepSpeed writes each
    process's shards into ``<name>.ckpt/`` with a ``latest`` tag file beside them)."""
    return p.is_file() or (p.is_dir() and (p / "latest").is_file())


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """The checkpoint to resume from: None (fresh), ``auto``, a run dir, or a checkpoint.

    ``auto`` continues ``<run dir>/checkpoints/last.ckpt`` when there is one (a file, or a
    DeepSpeed checkpoint directory) and starts fresh otherwise; an explicit path that holds no
    checkpoint is an error.
    """
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        last = out / "checkpoints" / LAST
        return str(last) if is_checkpoint(last) else None
    p = Path(resume).expanduser()
    if p.is_dir() and not is_checkpoint(p):
        p = p / "checkpoints" / LAST
    if not is_checkpoint(p):
        raise ConfigError(f"resume={resume!r}: no checkpoint at {str(p)!r}")
    return str(p)


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, save ``<dir>/last.ckpt`` before the process exits."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / LAST

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            trainer.save_checkpoint(self.path, weights_only=False)


class SaveFinalState(L.Callback):
    """``<dir>/last.ckpt`` holding the state training ended in, so a finished run can be extended
    (``resume=auto`` with a larger ``trainer.max_steps`` or ``max_epochs``) exactly.

    A run stopped by ``max_steps`` mid-epoch is saved right after its last step, from inside the
    loop: a checkpoint taken after ``fit`` returns would record that epoch as completed, and the
    resumed run would start the next epoch, skipping the rest of this one. A run that ends at an
    epoch boundary is saved after ``fit`` (``save_after_fit``).
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / LAST
        self.saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step

    def save_after_fit(self, trainer: L.Trainer) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step


class MetricsRowsAtCheckpoint(L.Callback):
    """After a resume, ``metrics.csv`` holds each logged row once.

    A run killed after its last checkpoint has logged rows the resumed run logs again. Every
    checkpoint records how many rows the file held when it was written (flushed first) and the
    step; on resume, the file keeps those rows, plus the rows written after the
    checkpoint for steps before it (Lightning logs a step's training row just after that step's
    checkpoint, and the resumed run starts at the next step), and drops the rest.
    """

    KEY = "dpo_lab_metrics_csv"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        from lightning.pytorch.loggers import CSVLogger

        rows = 0
        for lg in trainer.loggers:  # rows a CSV logger still holds (flush_logs_every_n_steps > 1)
            if isinstance(lg, CSVLogger):
                lg.save()
        if trainer.is_global_zero and self.path.exists():
            with open(self.path, newline="") as f:
                rows = sum(1 for _ in csv.DictReader(f))
        checkpoint[self.KEY] = {"rows": rows, "step": trainer.global_step}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if state is None or not trainer.is_global_zero or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), list(reader.fieldnames or [])
        n, step = state["rows"], state["step"]
        keep = rows[:n] + [r for r in rows[n:] if r.get("step") and int(r["step"]) < step]
        if len(keep) == len(rows):
            return
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(keep)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain Python values, so checkpoints stay loadable
    with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
