"""``PreferenceDataModule``: normalized rows → tokenized items (cached) → padded batches."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dpo_lab.cache import cache_root
from dpo_lab.data.collate import PreferenceCollator, UnpairedCollator, encode_rows
from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import ConfigError, DataError

# bump when tokenization changes: invalidates cached tokenized data. 3: left truncation keeps
# BOS, and truncated prompts are counted
TOKENIZE_VERSION = 4  # 4: a chat response ends at its end-of-turn token
PAIRED_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_FIELDS = ("prompt_ids", "completion_ids")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes its output."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [
        type(tokenizer).__name__,
        tokenizer.chat_template,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.all_special_ids,
    ]
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()


def _rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        key = [r["id"], r["prompt"], r.get("chosen"), r.get("rejected"), r.get("completion")]
        h.update(json.dumps(key, ensure_ascii=False).encode())
    return h.hexdigest()


def truncate_prompt(ids: list[int], max_length: int, keep: set[int]) -> list[int]:
    """The last ``max_length`` prompt tokens, keeping the prompt's BOS in front.

    A prompt is cut from the left (its end, next to the response, matters most), but a model
    trained with BOS must not see prompts without it: the leading tokens in ``keep`` (the
    tokenizer's BOS, which for Llama 3's template is also the template's first token) stay.
    Other special tokens are not kept: a chat header such as ``<|im_start|>`` spliced onto the
    middle of a message would be a turn with no role, no better than the cut itself.
    """
    if len(ids) <= max_length:
        return ids
    head = 0
    while head < len(ids) and ids[head] in keep:
        head += 1
    if head >= max_length:  # no room for both: the end of the prompt wins
        return ids[-max_length:]
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 2048,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenized items (paired or unpaired, by the rows' shape) and counts of what was cut.

    The prompt is cut from the left to ``max_prompt_length`` tokens (``truncate_prompt``: BOS
    kept) and counted (``truncated_prompts``); a row whose prompt plus
    (longer) completion still exceeds ``max_length`` is dropped and counted (``too_long``), never
    truncated into a different response.
    """
    unpaired = bool(rows) and "completion" in rows[0]
    special = {tokenizer.bos_token_id} - {None}
    items, counts = [], {"too_long": 0, "truncated_prompts": 0}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        keys = ("completion",) if unpaired else ("chosen", "rejected")
        prompt_ids_list, comps = encode_rows(
            tokenizer, [r["prompt"] for r in chunk], *[[r[k] for r in chunk] for k in keys]
        )
        for j, row in enumerate(chunk):
            prompt_ids = truncate_prompt(prompt_ids_list[j], max_prompt_length, special)
            counts["truncated_prompts"] += len(prompt_ids) < len(prompt_ids_list[j])
            completions = [c[j] for c in comps]
            if not all(completions):
                raise DataError(
                    f"row {row['id']!r}: a completion has no tokens and the tokenizer has no EOS "
                    "token to end it with; give the tokenizer an EOS token"
                )
            if len(prompt_ids) + max(len(c) for c in completions) > max_length:
                counts["too_long"] += 1
                continue
            item = {"index": start + j, "id": row["id"], "prompt_ids": prompt_ids}
            if unpaired:
                item.update(completion_ids=completions[0], desirable=row["desirable"])
            else:
                item.update(chosen_ids=completions[0], rejected_ids=completions[1])
            items.append(item)
    return items, counts


def _save_items(
    path: str, items: list[dict[str, Any]], fields: tuple[str, ...], counts: dict[str, int]
):
    arrays: dict[str, np.ndarray] = {
        "index": np.array([it["index"] for it in items], dtype=np.int64),
        **{f"count_{k}": np.array([v]) for k, v in counts.items()},
    }
    for f in fields:
        seqs = [it[f] for it in items]
        arrays[f] = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
        arrays[f + "_offsets"] = np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _load_items(path: str, rows: list[dict[str, Any]], fields: tuple[str, ...]):
    z = np.load(path)
    index = z["index"].tolist()
    cols = {}
    for f in fields:
        flat, off = z[f].tolist(), z[f + "_offsets"].tolist()  # python lists: fast slicing
        cols[f] = [flat[off[i] : off[i + 1]] for i in range(len(index))]
    items = []
    for k, i in enumerate(index):
        item = {"index": i, "id": rows[i]["id"], **{f: cols[f][k] for f in fields}}
        if "completion_ids" in fields:
            item["desirable"] = rows[i]["desirable"]
        items.append(item)
    counts = {k[len("count_") :]: int(z[k][0]) for k in z.files if k.startswith("count_")}
    return items, counts


def tokenize_cached(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    cache: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int], bool]:
    """``tokenize_rows`` behind a cache keyed by the rows, the tokenizer and the settings.

    Returns (items, counts, hit). The cache lives in ``<cache root>/tokenized``, so a second run,
    or every job of a sweep over losses or β, skips tokenization.
    """
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    if not cache:
        return (*tokenize_rows(rows, tokenizer, **kw), False)
    fields = UNPAIRED_FIELDS if rows and "completion" in rows[0] else PAIRED_FIELDS
    key = hashlib.sha256(
        json.dumps(
            [TOKENIZE_VERSION, _rows_fingerprint(rows), tokenizer_fingerprint(tokenizer), kw]
        ).encode()
    ).hexdigest()[:24]
    root = cache_root() / "tokenized"
    path = root / f"{key}.npz"
    if path.exists():
        try:
            return (*_load_items(str(path), rows, fields), True)
        except (OSError, ValueError, KeyError):
            pass  # unreadable (e.g. an older format): tokenize again and overwrite
    items, counts = tokenize_rows(rows, tokenizer, **kw)
    root.mkdir(parents=True, exist_ok=True)
    _save_items(str(path), items, fields, counts)
    return items, counts, False


def split_pairs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired items → unpaired ones: each chosen completion desirable, each rejected not."""
    out = []
    for it in items:
        for ids, desirable in ((it["chosen_ids"], True), (it["rejected_ids"], False)):
            out.append(
                {
                    "index": len(out),
                    "id": f"{it['id']}/{'chosen' if desirable else 'rejected'}",
                    "prompt_ids": it["prompt_ids"],
                    "completion_ids": ids,
                    "desirable": desirable,
                }
            )
    return out


def item_length(it: dict[str, Any]) -> int:
    """Padded length an item needs: prompt plus its longest completion."""
    comps = [it[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in it]
    return len(it["prompt_ids"]) + max(len(c) for c in comps)


class EpochSampler(DistributedSampler):
    """A seeded order per epoch that can start part-way, so a run can resume mid-epoch exactly.

    Epoch e's order is the one a ``DataLoader(shuffle=True, generator=Generator().manual_seed(
    seed))`` gives in its e-th pass (the same draws are replayed), so results match a plain
    shuffled DataLoader's exactly. Lightning calls ``set_epoch`` at each epoch start. ``skip`` drops
    the first k indices of the next pass only (set by ``ResumableDataLoader.load_state_dict``).

    Across ``num_replicas`` processes, rank r takes every W-th index of the epoch's order from r
    (the order cut to a multiple of W, so every rank has as many batches), so W processes with
    batch b see, step by step, exactly the examples one process with batch W·b sees. It is a
    ``DistributedSampler`` so that Lightning leaves it in place rather than wrapping it (its
    wrapper would not pass ``set_epoch`` on); ``skip`` then counts this rank's indices.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0):
        # not DistributedSampler.__init__: it needs a process group and a dataset; this class
        # only shares its type and interface
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # the draws one pass of a shuffled DataLoader makes
            self._base_seed_draw(g)
            torch.randperm(self.n, generator=g)
            torch.randperm(self.n, generator=g)  # RandomSampler's draw for a (here empty) tail
        self._base_seed_draw(g)
        return torch.randperm(self.n, generator=g).tolist()

    @staticmethod
    def _base_seed_draw(g: torch.Generator) -> None:
        """The worker base seed a DataLoader draws from its generator at each ``iter()``."""
        torch.empty((), dtype=torch.int64).random_(generator=g)

    def __iter__(self) -> Iterator[int]:
        order, skip = self.order(), self.skip
        if self.num_replicas > 1:
            W = self.num_replicas
            order = order[: len(order) // W * W][self.rank :: W]
        self.skip = 0
        yield from order[skip:]


class ShardSampler(DistributedSampler):
    """Evaluation across processes: rank r takes a contiguous block of the indices, each example
    once (no padding with repeats, so means over every rank are exact per-example means).

    Blocks, not every W-th index: paired data split for KTO comes as chosen₀, rejected₀, ...,
    and every W-th index would give one process only desirable examples and the other only
    undesirable ones (and each its own KL reference point from them)."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        size, extra = divmod(n, num_replicas)
        self.start = rank * size + min(rank, extra)
        self.stop = self.start + size + (rank < extra)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


class LengthGroupedSampler(EpochSampler):
    """Shuffled, then sorted by length within mega-batches of ``mega`` batches, so each batch
    holds similar lengths (less padding) while the order stays random across mega-batches."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        mega: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(len(lengths), seed, num_replicas, rank)
        self.lengths, self.batch_size, self.mega = lengths, batch_size, mega

    def order(self) -> list[int]:
        perm, size = super().order(), self.mega * self.batch_size
        return [
            i
            for start in range(0, len(perm), size)
            for i in sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
        ]


def true_margins(rows: list[dict[str, Any]], reward_fn: Any) -> torch.Tensor | None:
    """(N,) float64 r(x, y_c) − r(x, y_r) of paired ``rows`` under the task's true reward, or
    None for data without one."""
    if reward_fn is None:
        return None
    return torch.tensor(
        [reward_fn(r["prompt"], r["chosen"]) - reward_fn(r["prompt"], r["rejected"]) for r in rows],
        dtype=torch.float64,
    )


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints with the run (it implements ``state_dict``).

    Its state is the number of batches of the current epoch that training has *processed*,
    read from the trainer's own progress counter, not how many this loader has yielded (the
    trainer prefetches one batch ahead). On load, the sampler skips those batches' examples.
    """

    def __init__(self, *args: Any, progress: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        return {"batches": int(self._progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = state.get("batches", 0)
        if 0 < batches < len(self):  # a finished epoch resumes at the next one's start
            self.sampler.skip = batches * self.batch_size


class PreferenceDataModule(L.LightningDataModule):
    """Tokenized train/val data, a fixed probe set of held-out pairs, and batching.

    Args:
        data: prepared (normalized) rows; paired or unpaired.
        tokenizer: a transformers tokenizer with a pad token.
        batch_size: rows per training batch (paired: B pairs, so 2B sequences in the forward).
        eval_batch_size: rows per validation batch.
        max_length: prompt + completion tokens at most.
        max_prompt_length: prompt tokens kept (cut from the left).
        probe_size: held-out pairs in the displacement probe (the first ones of val; none for
            unpaired data, which has no pairs).
        seed: shuffling seed.
        unpaired: serve single labelled completions (for unpaired losses such as KTO); paired
            data is split into a desirable and an undesirable example per pair.
        group_by_length: batch similar lengths together (``LengthGroupedSampler``).
        padding_free: pack each batch's sequences into one row (``dpo_lab.packing``), the probe's
            and validation's too.
        cache: keep tokenized data in the cache dir.
    """

    def __init__(
        self,
        data: PreferenceData,
        tokenizer: Any,
        *,
        batch_size: int,
        eval_batch_size: int,
        max_length: int,
        max_prompt_length: int,
        probe_size: int,
        seed: int,
        num_workers: int = 0,
        unpaired: bool = False,
        group_by_length: bool = False,
        padding_free: bool = False,
        cache: bool = True,
    ):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set one (e.g. the EOS token)")
        if data.kind == "unpaired" and not unpaired:
            raise ConfigError(
                "this dataset is unpaired (prompt, completion, label); the loss needs pairs. "
                "Use an unpaired loss (loss=kto) or paired data"
            )
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.unpaired, self.group_by_length = unpaired, group_by_length
        self.collate = PreferenceCollator(tokenizer.pad_token_id, padding_free)
        self.loader_collate = (
            UnpairedCollator(tokenizer.pad_token_id, padding_free) if unpaired else self.collate
        )
        kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, cache=cache)
        self.train_items, counts_train, hit_train = tokenize_cached(data.train, tokenizer, **kw)
        self.val_items, counts_val, hit_val = tokenize_cached(data.val, tokenizer, **kw)
        self.counts = {"train": counts_train, "val": counts_val}  # too long, truncated prompts
        self.cache_hits = {"train": hit_train, "val": hit_val}
        if not self.train_items or not self.val_items:
            too_long = {split: c["too_long"] for split, c in self.counts.items()}
            raise DataError(
                f"no row fits max_length={max_length} (dropped as too long: {too_long})"
            )
        self.probe_items = self.val_items[:probe_size] if data.kind == "paired" else []
        if unpaired and data.kind == "paired":
            self.train_items = split_pairs(self.train_items)
            self.val_items = split_pairs(self.val_items)

    @property
    def reward_fn(self):
        return self.data.reward_fn

    def stats(self) -> dict[str, int]:
        """``data/*`` counts (README metrics table): rows skipped, dropped and cut, per split."""
        out = {f"data/dropped_too_long/{s}": c["too_long"] for s, c in self.counts.items()}
        out |= {
            f"data/truncated_prompts/{s}": c["truncated_prompts"] for s, c in self.counts.items()
        }
        out |= {f"data/{k}": v for k, v in self.data.stats.items()}
        return out

    def probe_true_margins(self) -> torch.Tensor | None:
        """r(chosen) − r(rejected) of the probe pairs under the task's true reward, where the
        data has one and it tells some pair apart."""
        if not self.probe_items:
            return None
        rows = {r["id"]: r for r in self.data.val}
        margins = true_margins([rows[it["id"]] for it in self.probe_items], self.data.reward_fn)
        if margins is None or not bool((margins != 0).any()):
            return None
        return margins

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if self.group_by_length:
            lengths = [item_length(it) for it in self.train_items]
            # each process's batch is one slice of a global batch of world × batch_size
            sampler: EpochSampler = LengthGroupedSampler(
                lengths, self.batch_size * world, self.seed, num_replicas=world, rank=rank
            )
        else:
            sampler = EpochSampler(len(self.train_items), self.seed, world, rank)
        return ResumableDataLoader(
            self.train_items,
            sampler=sampler,
            batch_size=self.batch_size,
            collate_fn=self.loader_collate,
            num_workers=self.num_workers,
            generator=self._generator(),
            drop_last=self._lone_last(len(self.train_items), self.batch_size, "train"),
            progress=lambda: (
                trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0
            ),
        )

    def val_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer else 1
        if world > len(self.val_items):  # a process without a batch would miss the reductions
            raise DataError(
                f"{len(self.val_items)} validation examples for {world} processes: every process "
                "needs at least one; add held-out data or use fewer processes"
            )
        sampler = (
            ShardSampler(len(self.val_items), world, trainer.global_rank) if world > 1 else None
        )
        return DataLoader(
            self.val_items,
            sampler=sampler,
            batch_size=self.eval_batch_size,
            collate_fn=self.loader_collate,
            num_workers=self.num_workers,
            generator=self._generator(),
            drop_last=self._lone_last(len(self.val_items), self.eval_batch_size, "val"),
        )

    def _generator(self) -> torch.Generator:
        """Each loader's own generator: a new iterator (each epoch, each validation) draws its
        workers' base seed from it rather than from the global one, so the global RNG the
        training step samples from (online DPO, RL, LoRA dropout) moves only with the steps,
        and a checkpoint's RNG state resumes exactly, mid-epoch or at an epoch's end."""
        return torch.Generator().manual_seed(self.seed)

    def _lone_last(self, n: int, batch_size: int, split: str) -> bool:
        """Unpaired losses need ≥ 2 examples a batch: drop a last batch of one, and say so."""
        if self.unpaired and n % batch_size == 1:
            warnings.warn(
                f"{split}: the last batch would hold 1 example, too few for an unpaired loss's KL "
                f"estimate; it is left out of each epoch ({n} examples, batch size {batch_size})",
                stacklevel=2,
            )
            return True
        return False

    def probe_batches(self) -> list[dict[str, torch.Tensor]]:
        """The probe set as paired batches of ``eval_batch_size`` pairs (whatever the loss's data
        kind), packed when the run is."""
        n, items = self.eval_batch_size, self.probe_items
        return [self.collate(items[s : s + n]) for s in range(0, len(items), n)]
