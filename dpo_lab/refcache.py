"""Precomputed reference log-probs: a named artifact, checked against what it was made from.

With ``reference.precompute=true`` the reference model scores every train and val pair once, at
fit start (on the training device), and is then freed: training runs the policy alone. The
values live in ``<cache root>/reference_logps/ref_logps-<key>.safetensors`` (or
``reference.cache_path``), where the key is a hash of

- the tokenized pairs (so the data, the tokenizer and the length settings),
- the reference weights (every tensor's bytes) and their dtype,
- the cache format version.

The same fingerprints are stored in the file's metadata and checked on load, so a file copied
from another machine, or named explicitly, is used only if it was made from this data and this
reference; a sweep over losses or β shares one file. The run dir gets ``reference_cache.json``
naming the file, its fingerprints, and whether this run computed or reused it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from dpo_lab.cache import cache_root
from dpo_lab.errors import ConfigError

REFCACHE_VERSION = 1
SPLITS = ("train", "val")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    state = getattr(model, "fingerprint_state", model.state_dict)()  # LoRA: see PeftReference
    for name, t in sorted(state.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def items_fingerprint(items: list[dict[str, Any]]) -> str:
    """A hash of the tokenized pairs, in order."""
    h = hashlib.blake2b(digest_size=16)
    for it in items:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(np.asarray(it[key], dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def score(
    model: torch.nn.Module,
    items: list[dict[str, Any]],
    collate,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) reference log-probs of chosen and of rejected completions."""
    from dpo_lab.module import paired_logps

    chosen, rejected = [], []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = paired_logps(model, batch)
        chosen.append(out.chosen.float().cpu())
        rejected.append(out.rejected.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


class PrecomputedReference(L.Callback):
    """At fit start: load or compute the cache, attach it to the data, free the reference.

    Args:
        out_dir: the run dir (``reference_cache.json`` is written there).
        cache_path: an explicit file to use or create; None names it by its key in the cache root.
        batch_size: pairs per reference forward while computing.
    """

    def __init__(self, out_dir: str | Path, cache_path: str | None = None, batch_size: int = 32):
        self.out_dir, self.cache_path, self.batch_size = Path(out_dir), cache_path, batch_size
        self.record: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        dm = trainer.datamodule
        reference = pl_module.reference
        if reference is None:  # already attached (a second fit on the same module)
            return
        t0 = time.time()
        meta = {
            "version": str(REFCACHE_VERSION),
            "train_items": items_fingerprint(dm.train_items),
            "val_items": items_fingerprint(dm.val_items),
            "reference_weights": weights_fingerprint(reference),
            "reference_dtype": str(next(reference.parameters()).dtype),
        }
        key = hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=12).hexdigest()
        path = (
            Path(self.cache_path).expanduser()
            if self.cache_path
            else cache_root() / "reference_logps" / f"ref_logps-{key}.safetensors"
        )
        values = self._load(path, meta) if path.exists() else None
        computed = values is None
        if computed:
            values = {}
            for split in SPLITS:
                items = getattr(dm, f"{split}_items")
                c, r = score(reference, items, dm.collate, self.batch_size, pl_module.device)
                values[f"{split}_chosen"], values[f"{split}_rejected"] = c, r
            if trainer.is_global_zero:
                self._save(path, values, meta)
        for split in SPLITS:
            items = getattr(dm, f"{split}_items")
            for it, c, r in zip(
                items,
                values[f"{split}_chosen"].tolist(),
                values[f"{split}_rejected"].tolist(),
                strict=True,
            ):
                it["ref_chosen_logps"], it["ref_rejected_logps"] = c, r
        pl_module.reference = None  # training needs the policy alone from here on
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.record = {
            "path": str(path),
            "key": key,
            "computed": computed,
            "seconds": round(time.time() - t0, 3),
            **meta,
        }
        if trainer.is_global_zero:
            (self.out_dir / "reference_cache.json").write_text(json.dumps(self.record, indent=2))

    def _load(self, path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if {k: stored.get(k) for k in meta} != meta:
                diff = [k for k in meta if stored.get(k) != meta[k]]
                if self.cache_path:  # the user named this file: using it would be silently wrong
                    raise ConfigError(
                        f"reference.cache_path={str(path)!r} was made from different "
                        f"{', '.join(diff)} than this run's; remove it or point elsewhere"
                    )
                return None  # a stale file under our key: recompute and replace it
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    @staticmethod
    def _save(path: Path, values: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in values.items()}, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: concurrent sweep jobs never read half a file
