"""Normalize rows of any accepted layout into one shape, and apply the data-level options.

Accepted layouts (``dataset.format``, or ``auto`` to tell from the first row's columns):

- ``explicit``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``implicit`` (Anthropic hh-rlhf): ``chosen`` and ``rejected`` full transcripts sharing a
  prefix; the prompt is everything up to and including the last ``\\n\\nAssistant:`` inside the
  shared prefix.
- ``conversational``: message lists (``{"role", "content"}``). Either ``prompt`` is a message
  list and ``chosen``/``rejected`` are the assistant turns, or (UltraFeedback-binarized) both
  ``chosen`` and ``rejected`` hold the whole conversation and the prompt is their shared leading
  messages. Rendered later with the tokenizer's chat template.
- ``unpaired``: ``prompt``, ``completion``, ``label`` (bool; KTO's thumbs-up/down).

Normalized paired rows have ``id``, ``prompt``, ``chosen``, ``rejected`` (strings, or message
lists for conversational rows) and keep every other column as metadata; unpaired rows have
``id``, ``prompt``, ``completion``, ``desirable``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import ConfigError, DataError

FORMATS = ("auto", "explicit", "implicit", "conversational", "unpaired")
ASSISTANT = "\n\nAssistant:"
KEYS = {
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}


class RowError(ValueError):
    """One row is malformed; ``prepare`` reports it (naming the row) or counts and skips it."""


def detect_format(row: Mapping[str, Any], where: str) -> str:
    cols = set(row) - {"_where", "_error"}
    if {"completion", "label"} <= cols:
        return "unpaired"
    if {"chosen", "rejected"} <= cols:
        if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
            return "conversational"
        return "explicit" if "prompt" in cols else "implicit"
    raise DataError(
        f"{where}: cannot tell the data format from columns {sorted(cols)}; expected "
        "prompt/chosen/rejected, chosen/rejected (hh-rlhf transcripts), or prompt/completion/label;"
        " map your column names with dataset.columns"
    )


def _text(row: Mapping[str, Any], key: str, *, response: bool = False) -> str:
    """The string in ``row[key]``. A response may be empty (its completion is then the end
    token alone, as in TRL: real data has them, e.g. 4 of hh-rlhf's 2,312 harmless-base test
    rows); a prompt may not."""
    v = row[key]
    if not isinstance(v, str):
        raise RowError(f"{key!r} must be a string, got {type(v).__name__} {v!r:.60}")
    if not response and not v.strip():
        raise RowError(f"{key!r} is empty")
    return v


def is_empty_response(response: Any) -> bool:
    """A response with no text: an empty or blank string, or messages with no content."""
    if isinstance(response, str):
        return not response.strip()
    return all(not m["content"].strip() for m in response)


def _messages(v: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise RowError(f"{key!r} must be a non-empty list of messages, got {v!r:.60}")
    for m in v:
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RowError(
                f"{key!r}: each message needs string 'role' and 'content', got {m!r:.60}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in v]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of two hh-rlhf transcripts.

    The prompt ends with the last ``\\n\\nAssistant:`` that lies wholly inside the transcripts'
    common prefix, so multi-turn dialogues keep every earlier turn in the prompt.
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    while cut != -1 and cut + len(ASSISTANT) > n:  # the marker must lie inside the shared part
        cut = chosen.rfind(ASSISTANT, 0, cut)
    if cut == -1:
        raise RowError(f"no shared {ASSISTANT.strip()!r} turn to split the prompt at")
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]  # a response may be empty


def normalize(row: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """One raw record → the normalized row (see module docstring), or RowError."""
    if "_error" in row:
        raise RowError(row["_error"])
    missing = [k for k in KEYS[fmt] if k not in row or row[k] is None]
    if missing:
        present = sorted(k for k in row if not k.startswith("_"))
        raise RowError(f"missing column(s) {missing}; columns present: {present}")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "completion")}
    if fmt == "unpaired":
        label = row["label"]
        if isinstance(label, str) and label.strip().lower() in ("true", "1", "false", "0"):
            label = label.strip().lower() in ("true", "1")
        if label not in (True, False) or isinstance(label, float):
            raise RowError(f"'label' must be a boolean (or 0/1, true/false), got {label!r}")
        meta.pop("label")
        return {
            **meta,
            "prompt": _text(row, "prompt"),
            "completion": _text(row, "completion", response=True),
            "desirable": bool(label),
        }
    if fmt == "explicit":
        prompt, chosen, rejected = (
            _text(row, "prompt"),
            _text(row, "chosen", response=True),
            _text(row, "rejected", response=True),
        )
    elif fmt == "implicit":
        prompt, chosen, rejected = split_hh(
            _text(row, "chosen", response=True), _text(row, "rejected", response=True)
        )
    else:  # conversational
        chosen, rejected = (
            _messages(row["chosen"], "chosen"),
            _messages(row["rejected"], "rejected"),
        )
        if isinstance(row.get("prompt"), list):
            prompt = _messages(row["prompt"], "prompt")
            k = len(prompt)
            if chosen[:k] == prompt and rejected[:k] == prompt:  # whole conversations given
                chosen, rejected = chosen[k:], rejected[k:]
        else:  # UltraFeedback-binarized: the prompt is the shared leading messages
            k = 0
            while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            if not prompt:
                raise RowError("chosen and rejected share no leading messages to use as prompt")
        if not chosen or not rejected:
            raise RowError("no assistant response after the prompt messages")
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise RowError("the response messages must start with an 'assistant' turn")
    return {**meta, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def remap(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Rename the user's columns to ours: ``columns`` maps our name → theirs."""
    if not columns:
        return row
    theirs = {v: k for k, v in columns.items()}
    return {theirs.get(k, k): v for k, v in row.items()}


def prepare(
    data: PreferenceData,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    label_noise: float = 0.0,
    max_samples: int | None = None,
    seed: int = 0,
) -> PreferenceData:
    """Normalize both splits and apply the options; returns new data with ``stats`` filled.

    Args:
        format: one of ``FORMATS``.
        columns: our column name → the source's (``{"prompt": "question", ...}``).
        on_bad_row: ``error`` (stop, naming the row) or ``skip`` (count, warn, go on).
        label_noise: share of training rows whose label is flipped (seeded, exact count).
        max_samples: keep the first N training rows (after normalization).
        seed: seeds the label flips.

    Pairs whose chosen and rejected are identical carry no preference: they are always skipped,
    counted and warned about. Empty responses are valid (trained as the end token alone) and
    counted (``empty_responses``).
    """
    if format not in FORMATS:
        raise ConfigError(f"dataset.format={format!r}: expected one of {', '.join(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"dataset.on_bad_row={on_bad_row!r}: expected error or skip")
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"dataset.label_noise must be in [0, 1], got {label_noise}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"dataset.max_samples must be >= 1 or null, got {max_samples}")
    columns = dict(columns or {})
    stats: dict[str, int] = {}
    splits = {}
    fmt = format
    for split, rows in (("train", data.train), ("val", data.val)):
        rows = [remap(r, columns) for r in rows]
        if fmt == "auto":
            first = next((r for r in rows if "_error" not in r), None)
            if first is None:
                raise DataError(f"{split}: no readable rows")
            fmt = detect_format(first, first.get("_where", f"{split} row 0"))
        out, bad, identical, empty, first_bad = [], 0, 0, 0, None
        for i, row in enumerate(rows):
            where = row.get("_where", f"{split} row {i}")
            try:
                norm = normalize(row, fmt)
            except RowError as e:
                if on_bad_row == "error":
                    hint = " (dataset.on_bad_row=skip skips such rows)"
                    raise DataError(f"{where}: {e}{hint}") from None
                bad += 1
                first_bad = first_bad or f"{where}: {e}"
                continue
            if fmt != "unpaired" and norm["chosen"] == norm["rejected"]:
                identical += 1
                continue
            responses = (
                [norm["completion"]] if fmt == "unpaired" else [norm["chosen"], norm["rejected"]]
            )
            empty += any(is_empty_response(r) for r in responses)
            norm.setdefault("id", f"{split}-{i}")
            norm["id"] = str(norm["id"])
            out.append(norm)
        if bad:
            warnings.warn(
                f"{split}: skipped {bad} bad row(s); the first: {first_bad}", stacklevel=2
            )
        if identical:
            warnings.warn(
                f"{split}: skipped {identical} pair(s) whose chosen == rejected", stacklevel=2
            )
        stats[f"skipped_bad_rows/{split}"] = bad
        stats[f"skipped_identical/{split}"] = identical
        stats[f"empty_responses/{split}"] = empty  # kept: trained as the end token alone
        splits[split] = out
    train, val = splits["train"], splits["val"]
    if max_samples is not None:
        train = train[:max_samples]
    if label_noise > 0:
        train = [dict(r) for r in train]
        k = int(round(label_noise * len(train)))
        for i in random.Random(seed).sample(range(len(train)), k):
            r = train[i]
            if fmt == "unpaired":
                r["desirable"] = not r["desirable"]
            else:
                r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            r["label_flipped"] = True
        stats["label_flipped"] = k
    for split, rows in (("train", train), ("val", val)):
        if not rows:
            bad, same = stats[f"skipped_bad_rows/{split}"], stats[f"skipped_identical/{split}"]
            raise DataError(
                f"{split}: no rows left after filtering (skipped {bad} bad, {same} identical)"
            )
    kind = "unpaired" if fmt == "unpaired" else "paired"
    return PreferenceData(train, val, data.reward_fn, kind, {**data.stats, **stats}, data.oracle)
