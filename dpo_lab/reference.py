"""The frozen reference as the training step sees it: per-sequence log-probs of a batch.

A loss that needs a reference gets one of two objects, chosen once when the run is built:

- ``LiveReference``: a frozen model run on each batch under ``inference_mode``. The model is a
  copy of the policy's starting weights, a named model (``reference.name_or_path``), or under LoRA
  the policy's own base with the adapters off (``dpo_lab.lora.PeftReference``).
- ``CachedReference``: log-probs scored once before training (``reference.precompute=true``,
  ``dpo_lab.refcache.precompute``) and looked up by each batch's row indices; no model at all.

Both answer ``paired(batch, split)`` and ``unpaired(batch, split)``, so the module never asks
which kind it has. ``model`` is the live model where there is one (online sampling and the
end-of-run evaluation need a model), else None.

Neither is a submodule of the LightningModule: the reference is frozen, so nothing about it
belongs in the optimizer, the checkpoint, DDP's gradient sync or FSDP's flat parameters (FSDP
flattens a unit's weights into one tensor of one dtype: a bf16 reference beside an fp32 policy
could not share a unit). Under FSDP and DeepSpeed each process holds the whole reference, in its
own dtype; ``reference.precompute=true`` removes it altogether. The module moves it to the
training device at fit start (``to``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lab.logps import completion_tokens, paired_logps, unpaired_logps
from dpo_lab.losses import PairedLogps, UnpairedLogps

SPLITS = ("train", "val")


def _leave_inference_mode(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Inference tensors cannot meet tensors that need grad in the loss: normal copies."""
    return tuple(None if t is None else t.clone() for t in tensors)


class LiveReference:
    """A frozen model scored on every batch.

    Args:
        model: the reference LM; put in eval mode (no dropout: the reference is a fixed function)
            and frozen here. Not a submodule of anything Lightning manages, so it stays so.
        logps_kwargs: ``chunk_size`` and ``recompute`` for ``completion_logps``.
    """

    def __init__(self, model: nn.Module, logps_kwargs: dict[str, Any] | None = None):
        self.model = model
        model.requires_grad_(False)
        model.eval()
        self.logps_kwargs = dict(logps_kwargs or {})

    def to(self, device: torch.device) -> LiveReference:
        self.model.to(device)  # a LoRA reference (PeftReference) moves with the policy instead
        return self

    def paired(self, batch: dict[str, Any], split: str) -> PairedLogps:
        with torch.inference_mode():
            out = paired_logps(self.model, batch, **self.logps_kwargs)
        fields = [getattr(out, f.name) for f in dataclasses.fields(out)]
        return PairedLogps(*_leave_inference_mode(*fields))

    def unpaired(self, batch: dict[str, Any], split: str) -> UnpairedLogps:
        with torch.inference_mode():
            out = unpaired_logps(self.model, batch, **self.logps_kwargs)
        completion, tokens, kl = _leave_inference_mode(out.completion, out.tokens, out.kl)
        return UnpairedLogps(completion, tokens, out.desirable, kl)


class CachedReference:
    """Reference log-probs computed once, looked up by each batch's ``index`` (row position in
    its split, ``PreferenceCollator``); the model they came from is gone.

    Args:
        values: ``{split}_chosen`` and ``{split}_rejected`` (N,) per split, aligned with
            ``indices``.
        indices: ``{split}``: (N,) the row index of each value.
        record: what the cache is and where it came from (``reference_cache.json``).
    """

    model = None  # no model: online sampling and live evaluation need a LiveReference

    def __init__(
        self, values: dict[str, Tensor], indices: dict[str, Tensor], record: dict[str, Any]
    ):
        self.record = record
        self.tables: dict[str, Tensor] = {}
        for split in SPLITS:
            idx = indices[split].long()
            size = int(idx.max()) + 1 if idx.numel() else 0
            for side in ("chosen", "rejected"):
                table = torch.full((size,), float("nan"), dtype=torch.float32)
                table[idx] = values[f"{split}_{side}"].float()
                self.tables[f"{split}_{side}"] = table

    def to(self, device: torch.device) -> CachedReference:
        self.tables = {k: v.to(device) for k, v in self.tables.items()}
        return self

    def paired(self, batch: dict[str, Any], split: str) -> PairedLogps:
        idx = batch["index"].to(self.tables[f"{split}_chosen"].device)
        chosen = self.tables[f"{split}_chosen"][idx]
        rejected = self.tables[f"{split}_rejected"][idx]
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            raise KeyError(f"{split} rows {idx.tolist()} are not in the reference cache")
        tokens = completion_tokens(batch)
        B = len(idx)
        device = batch["input_ids"].device
        return PairedLogps(chosen.to(device), rejected.to(device), tokens[:B], tokens[B:])

    def unpaired(self, batch: dict[str, Any], split: str) -> UnpairedLogps:
        raise NotImplementedError(
            "precomputed reference log-probs exist for paired data only (KTO's KL rows change "
            "with the batch)"
        )
