"""Tokenize (prompt, completion) and pad batches into the shape ``completion_logps`` takes.

The prompt and the completion are tokenized separately and concatenated, so the completion's
tokens are exactly the completion's, whatever the tokenizer would merge across the boundary. The
prompt gets the tokenizer's own special tokens (BOS where it adds one); the completion gets none,
and the EOS token is appended so that the policy learns where a response stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def encode_example(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids): BOS per tokenizer on the prompt, EOS on the completion."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and prompt_ids and prompt_ids[-1] == eos:  # tokenizers that append EOS
        prompt_ids = prompt_ids[:-1]
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if eos is not None:
        completion_ids.append(eos)
    return prompt_ids, completion_ids


def pad_sequences(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, length: int | None = None
) -> dict[str, Tensor]:
    """Right-pad (prompt_ids, completion_ids) pairs.

    Returns:
        input_ids: (N, T), attention_mask: (N, T), completion_mask: (N, T) — 1 on completion tokens.
    """
    T = max(len(p) + len(c) for p, c in examples)
    T = max(T, length or 0)
    N = len(examples)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


class PreferenceCollator:
    """Batches tokenized pairs into one concatenated (2B, T) block: chosen rows, then rejected.

    Each item is a dict with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``index`` (its
    position in the split). Chosen and rejected are padded to one length so the policy sees them
    in a single forward.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        chosen = [(it["prompt_ids"], it["chosen_ids"]) for it in items]
        rejected = [(it["prompt_ids"], it["rejected_ids"]) for it in items]
        batch = pad_sequences(chosen + rejected, self.pad_id)
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


class UnpairedCollator:
    """Batches single completions with binary labels (KTO), plus mismatched rows for its KL term.

    Each item has ``prompt_ids``, ``completion_ids``, ``desirable`` and ``index``. Row i of the
    KL block pairs prompt i with the completion of item (i + 1) mod B, so every KL row is a
    prompt/completion mismatch whenever B ≥ 2 (the loss rejects B < 2).
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        B = len(items)
        batch = pad_sequences(
            [(it["prompt_ids"], it["completion_ids"]) for it in items], self.pad_id
        )
        kl = pad_sequences(
            [(items[i]["prompt_ids"], items[(i + 1) % B]["completion_ids"]) for i in range(B)],
            self.pad_id,
        )
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(it["desirable"]) for it in items])
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch
