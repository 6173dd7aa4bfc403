"""Precomputed reference log-probs: a named artifact, checked against what it was made from.

With ``reference.precompute=true`` the reference model scores every train and val pair once,
before training (``precompute``, an explicit step of ``dpo_lab.train.build``, on the training
device and under the run's precision), and is then freed: training runs the policy alone. The
values live in ``<cache root>/reference_logps/ref_logps-<key>.safetensors`` (or
``reference.cache_path``), where the key is a hash of

- the tokenized pairs (so the data, the tokenizer and the length settings),
- the reference weights (every tensor's bytes) and their dtype,
- the trainer's precision (autocast changes the values),
- the cache format version.

The same fingerprints are stored in the file's metadata and checked on load, so a file copied
from another machine, or named explicitly, is used only if it was made from this data and this
reference; a sweep over losses or β shares one file. The run dir gets ``reference_cache.json``
naming the file, its fingerprints, and whether this run computed or reused it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_lab.cache import cache_root
from dpo_lab.errors import ConfigError
from dpo_lab.logps import paired_logps
from dpo_lab.reference import SPLITS, CachedReference

# 2: the precision (autocast) the values were scored under is part of the key, and values are
# scored under it, as a live reference is
REFCACHE_VERSION = 2


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
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    **logps_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log-probs of chosen and of rejected completions, scored the way a live reference is:
    under the run's precision context (``forward_context``: bf16/fp16 autocast under mixed
    precision), with the same ``completion_logps`` settings."""
    chosen, rejected = [], []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with forward_context():
            out = paired_logps(model, batch, **logps_kwargs)
        chosen.append(out.chosen.float().cpu())
        rejected.append(out.rejected.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def precompute(
    model: torch.nn.Module,
    datamodule: Any,
    *,
    device: torch.device,
    precision: str,
    precision_plugin: str = "",
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    out_dir: str | Path,
    cache_path: str | None = None,
    batch_size: int = 32,
    logps_kwargs: dict[str, Any] | None = None,
    write: bool = True,
) -> CachedReference:
    """Score every train and val pair under the reference ``model`` once (or load the checked
    cache file), and return the values as a ``CachedReference``.

    The caller then drops its last handle on ``model``: training runs the policy alone.

    Args:
        model: the reference LM (``LiveReference.model``).
        datamodule: the run's ``PreferenceDataModule`` (its tokenized train and val pairs).
        device: where to score (the trainer's root device).
        precision: the trainer's precision, part of the cache key (autocast changes the values).
        precision_plugin: the plugin's class name, also in the key: the same precision string
            autocasts under AMP and FSDP but casts the weights under DeepSpeed.
        forward_context: the precision plugin's forward context (autocast), as in training.
        out_dir: the run dir; ``reference_cache.json`` is written there.
        cache_path: an explicit file to use or create; None names it by its key in the cache root.
        batch_size: pairs per reference forward while scoring.
        logps_kwargs: ``completion_logps`` settings, the same as the live reference's.
        write: write the cache file and the record (False on all but one process).
    """
    t0 = time.time()
    dm = datamodule
    meta = {
        "version": str(REFCACHE_VERSION),
        "train_items": items_fingerprint(dm.train_items),
        "val_items": items_fingerprint(dm.val_items),
        "reference_weights": weights_fingerprint(model),
        "reference_dtype": str(next(model.parameters()).dtype),
        "precision": str(precision),  # with the plugin: autocast or cast weights
        "precision_plugin": precision_plugin,
    }
    key = hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=12).hexdigest()
    path = (
        Path(cache_path).expanduser()
        if cache_path
        else cache_root() / "reference_logps" / f"ref_logps-{key}.safetensors"
    )
    values = _load(path, meta, named=bool(cache_path)) if path.exists() else None
    computed = values is None
    if computed:
        holder = getattr(model, "peft", model)  # LoRA: the reference's weights are the policy's
        was_training, was_device = model.training, next(holder.parameters()).device
        model.eval()
        holder.to(device)
        values = {}
        for split in SPLITS:
            items = getattr(dm, f"{split}_items")
            c, r = score(
                model, items, dm.collate, batch_size, device, forward_context,
                **(logps_kwargs or {}),
            )  # fmt: skip
            values[f"{split}_chosen"], values[f"{split}_rejected"] = c, r
        model.train(was_training)
        holder.to(was_device)
        if write:
            _save(path, values, meta)
    indices = {
        split: torch.tensor([it["index"] for it in getattr(dm, f"{split}_items")])
        for split in SPLITS
    }
    record = {
        "path": str(path),
        "key": key,
        "computed": computed,
        "seconds": round(time.time() - t0, 3),
        **meta,
    }
    if write:
        (Path(out_dir) / "reference_cache.json").write_text(json.dumps(record, indent=2))
    return CachedReference(values, indices, record)


def _load(path: Path, meta: dict[str, str], named: bool) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata() or {}
        if {k: stored.get(k) for k in meta} != meta:
            diff = [k for k in meta if stored.get(k) != meta[k]]
            if named:  # the user named this file: using it would be silently wrong
                raise ConfigError(
                    f"reference.cache_path={str(path)!r} was made from different "
                    f"{', '.join(diff)} than this run's; remove it or point elsewhere"
                )
            return None  # a stale file under our key: recompute and replace it
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _save(path: Path, values: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in values.items()}, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: concurrent sweep jobs never read half a file
