"""``PreferenceDataModule``: rows from a source → tokenized pairs → padded batches."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from dpo_lab.data.collate import PreferenceCollator, UnpairedCollator, encode_example
from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import DataError

REQUIRED = ("prompt", "chosen", "rejected")


def check_rows(rows: list[dict[str, Any]], split: str) -> None:
    """Every row has non-empty string prompt/chosen/rejected; else a DataError naming the row."""
    for i, row in enumerate(rows):
        where = f"{split} row {i}" + (f" (id {row['id']!r})" if "id" in row else "")
        for key in REQUIRED:
            if key not in row:
                raise DataError(f"{where}: missing column {key!r}; columns present: {sorted(row)}")
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")


def tokenize_pairs(
    rows: list[dict[str, Any]], tokenizer: Any, *, max_length: int, max_prompt_length: int
) -> tuple[list[dict[str, Any]], int]:
    """Tokenized items and the number of rows dropped because they cannot fit ``max_length``.

    The prompt is cut from the left to ``max_prompt_length`` tokens (the end of a prompt matters
    most); a pair whose prompt plus longer completion still exceeds ``max_length`` is dropped and
    counted, never truncated into a different response.
    """
    items, dropped = [], 0
    for i, row in enumerate(rows):
        prompt_ids, chosen_ids = encode_example(tokenizer, row["prompt"], row["chosen"])
        _, rejected_ids = encode_example(tokenizer, row["prompt"], row["rejected"])
        prompt_ids = prompt_ids[-max_prompt_length:]
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
            dropped += 1
            continue
        items.append(
            {
                "index": i,
                "id": str(row.get("id", i)),
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids,
                "rejected_ids": rejected_ids,
            }
        )
    return items, dropped


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


class PreferenceDataModule(L.LightningDataModule):
    """Tokenized train/val pairs, a fixed probe set and the held-out prompts for evaluation.

    Args:
        data: the source's rows and (optional) ground-truth reward.
        tokenizer: a transformers tokenizer with a pad token.
        batch_size: pairs per training batch (B; the policy sees 2B sequences).
        eval_batch_size: pairs per validation batch.
        max_length: prompt + completion tokens at most.
        max_prompt_length: prompt tokens kept (cut from the left).
        probe_size: held-out pairs in the displacement probe (the first ones of val).
        seed: shuffling seed.
        unpaired: serve single labelled completions (for unpaired losses such as KTO): each pair
            is split into a desirable and an undesirable example. The probe stays paired.
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
    ):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set one (e.g. the EOS token)")
        check_rows(data.train, "train")
        check_rows(data.val, "val")
        if not data.train or not data.val:
            raise DataError(
                f"need train and val rows, got {len(data.train)} train and {len(data.val)} val"
            )
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.collate = PreferenceCollator(tokenizer.pad_token_id)
        self.unpaired = unpaired
        self.loader_collate = UnpairedCollator(tokenizer.pad_token_id) if unpaired else self.collate
        kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        self.train_items, drop_train = tokenize_pairs(data.train, tokenizer, **kw)
        self.val_items, drop_val = tokenize_pairs(data.val, tokenizer, **kw)
        self.dropped_too_long = {"train": drop_train, "val": drop_val}
        if not self.train_items or not self.val_items:
            raise DataError(
                f"no pair fits max_length={max_length} (dropped {self.dropped_too_long})"
            )
        self.probe_items = self.val_items[:probe_size]
        if unpaired:
            self.train_items, self.val_items = (
                split_pairs(self.train_items),
                split_pairs(self.val_items),
            )

    @property
    def reward_fn(self):
        return self.data.reward_fn

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_items,
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            collate_fn=self.loader_collate,
            num_workers=self.num_workers,
            drop_last=self._lone_last(len(self.train_items), self.batch_size, "train"),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_items,
            batch_size=self.eval_batch_size,
            collate_fn=self.loader_collate,
            num_workers=self.num_workers,
            drop_last=self._lone_last(len(self.val_items), self.eval_batch_size, "val"),
        )

    def _lone_last(self, n: int, batch_size: int, split: str) -> bool:
        """Unpaired losses need ≥ 2 examples a batch: drop a last batch of one, and say so."""
        if self.unpaired and n % batch_size == 1:
            import warnings

            warnings.warn(
                f"{split}: the last batch would hold 1 example, too few for an unpaired loss's KL "
                f"estimate; it is left out of each epoch ({n} examples, batch size {batch_size})",
                stacklevel=2,
            )
            return True
        return False

    def probe_batch(self) -> dict[str, torch.Tensor]:
        """The probe set as one paired batch (whatever the loss's data kind)."""
        return self.collate(self.probe_items)
