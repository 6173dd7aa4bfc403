"""Collation into the (2B, T) block, KTO's unpaired batches, row checks and length drops."""

from __future__ import annotations

import pytest
import torch

from dpo_lab.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lab.data.datamodule import PreferenceDataModule, split_pairs, tokenize_pairs
from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import DataError
from dpo_lab.tasks.sentiment import build_tokenizer

ROWS = [
    {"id": "a", "prompt": "moonrise was", "chosen": "great .", "rejected": "a dull film ."},
    {"id": "b", "prompt": "i watched farland and it was", "chosen": "so fun .", "rejected": "bad"},
    {"id": "c", "prompt": "farland was", "chosen": "a truly great film .", "rejected": "awful ."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_preference_collator_layout(tok):
    items, dropped = tokenize_pairs(ROWS, tok, max_length=64, max_prompt_length=32)
    assert dropped == 0
    batch = PreferenceCollator(tok.pad_token_id)(items)
    B = len(ROWS)
    assert batch["input_ids"].shape[0] == 2 * B
    # rows [0, B) chosen, [B, 2B) rejected; completion mask covers completion + EOS exactly
    for i, it in enumerate(items):
        for row, ids in ((i, it["chosen_ids"]), (B + i, it["rejected_ids"])):
            mask = batch["completion_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == ids
            n = len(it["prompt_ids"]) + len(ids)
            assert batch["attention_mask"][row].sum() == n
            assert batch["input_ids"][row, :n].tolist() == it["prompt_ids"] + ids
    assert batch["index"].tolist() == [0, 1, 2]


def test_unpaired_collator_mismatches_kl_rows(tok):
    items = split_pairs(tokenize_pairs(ROWS, tok, max_length=64, max_prompt_length=32)[0])
    assert [it["desirable"] for it in items] == [True, False] * 3
    batch = UnpairedCollator(tok.pad_token_id)(items)
    B = len(items)
    for i in range(B):
        kl_completion = batch["kl_input_ids"][i][batch["kl_completion_mask"][i].bool()].tolist()
        assert kl_completion == items[(i + 1) % B]["completion_ids"]
        kl_prompt_len = int(batch["kl_attention_mask"][i].sum()) - len(kl_completion)
        assert batch["kl_input_ids"][i, :kl_prompt_len].tolist() == items[i]["prompt_ids"]
    assert batch["desirable"].dtype == torch.bool


def test_too_long_pairs_are_dropped_and_counted(tok):
    items, dropped = tokenize_pairs(ROWS, tok, max_length=8, max_prompt_length=32)
    # BOS + prompt + longer completion + EOS: a: 1+2+4+1=8 fits; b: 1+6+3+1=11; c: 1+2+6+1=10
    assert [it["id"] for it in items] == ["a"] and dropped == 2
    # the prompt is cut from the left to max_prompt_length
    items, _ = tokenize_pairs(ROWS[1:2], tok, max_length=64, max_prompt_length=3)
    assert tok.decode(items[0]["prompt_ids"]) == "and it was"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "x", "chosen": "y"}, r"train row 0: missing column 'rejected'.*present"),
        ({"prompt": "x", "chosen": "", "rejected": "z"}, r"train row 0: 'chosen' must be"),
        ({"prompt": None, "chosen": "y", "rejected": "z"}, r"'prompt' must be a non-empty string"),
    ],
)
def test_bad_rows_are_named(tok, row, message):
    with pytest.raises(DataError, match=message):
        PreferenceDataModule(
            PreferenceData([row], ROWS),
            tok,
            batch_size=2,
            eval_batch_size=2,
            max_length=64,
            max_prompt_length=32,
            probe_size=2,
            seed=0,
        )
