"""Per optimizer step: learning rate, gradient norm, throughput and peak memory.

Logged with the step's other ``train/*`` metrics (one row per logged step in ``metrics.csv``):

- ``train/lr``: the learning rate this step used (the first parameter group's);
- ``train/grad_norm``: the total 2-norm of the gradients before clipping (after AMP unscaling);
- ``train/tokens_per_sec``, ``train/examples_per_sec``: non-padding tokens the policy processed
  (chosen and rejected, or KTO's completions and KL rows) and pairs (or unpaired examples) per
  second of the step, summed over processes; from the start of the step's first micro-batch to
  the end of its last (data loading before a batch and the probe after it are outside);
- ``train/peak_memory_mib``: peak memory so far, the largest over processes: CUDA memory
  allocated by tensors on a GPU, the process's peak resident set size on CPU.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch

from dpo_lab.callbacks.nonfinite import grad_norm


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or on CPU the process's peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class StepStats(L.Callback):
    """See the module docstring. Reads each micro-batch's ``tokens`` and ``examples`` from the
    training step's output (so online DPO counts the pairs it generated, not the dataset's)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens: Any = 0
        self._examples: Any = 0
        self._stepped = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *_: Any) -> None:
        if self._start is None:  # the step's first micro-batch
            self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        pl_module.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True)
        norm = grad_norm(optimizer, trainer)
        if norm is not None:  # DeepSpeed keeps gradients in its own buffers: not logged there
            pl_module.log("train/grad_norm", norm, on_step=True)
        self._stepped = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *_: Any):
        if isinstance(outputs, dict) and "tokens" in outputs:
            self._tokens = self._tokens + outputs["tokens"]
            self._examples = self._examples + outputs["examples"]
        if not self._stepped:  # accumulating: the optimizer steps after a later micro-batch
            return
        seconds = time.perf_counter() - self._start
        kw = dict(on_step=True, sync_dist=trainer.world_size > 1, reduce_fx="sum")
        for name, count in (("tokens", self._tokens), ("examples", self._examples)):
            count = torch.as_tensor(count, dtype=torch.float32, device=pl_module.device)
            pl_module.log(f"train/{name}_per_sec", count / seconds, **kw)
        pl_module.log(
            "train/peak_memory_mib",
            peak_memory_mib(pl_module.device),
            on_step=True,
            sync_dist=trainer.world_size > 1,
            reduce_fx="max",
        )
        self._start, self._tokens, self._examples, self._stepped = None, 0, 0, False
