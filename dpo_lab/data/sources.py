"""Where preference rows come from: local files, the hub (through ``datasets``), or a task.

A source is any callable named by ``dataset.source._target_`` that returns ``PreferenceData``.
Sources only read: every row keeps where it came from (``_where``: file and line, or hub split
and row) so that ``dpo_lab.data.formats.prepare`` can name it in an error. Formats, column names,
bad rows, label noise and sample caps are handled there, the same for every source.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_lab.errors import DataError

FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class PreferenceData:
    """What a dataset source gives the data module.

    Attributes:
        train: rows (dicts). Before ``prepare``: raw records; after: normalized rows with ``id``,
            ``prompt``, and ``chosen``/``rejected`` (paired) or ``completion``/``desirable``
            (unpaired). Other keys are metadata.
        val: held-out rows, same shape.
        reward_fn: the task's ground-truth ``reward(prompt, completion)``, or None for real data.
        kind: ``"paired"`` or ``"unpaired"`` (set by ``prepare``).
        stats: counts of what ``prepare`` skipped or changed, logged under ``data/``.
        oracle: task-specific ground truth beyond the reward, or None. An oracle with a
            ``callback(tokenizer=, beta=, every_n_steps=, out_dir=)`` method adds that callback to
            the run (the closed-form task's exact checks against π*).
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    reward_fn: Callable[[str, str], float] | None = None
    kind: str = "paired"
    stats: dict[str, int] = field(default_factory=dict)
    oracle: Any = None


def read_file(path: str | Path) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, each with ``_where``.

    A malformed JSON line is not fatal here: it becomes a record with ``_error``, which
    ``prepare`` reports or skips like any other bad row.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"dataset path {str(p)!r} is not a file")
    suffix = p.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"dataset file {str(p)!r}: unknown format {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(FILE_FORMATS)}"
        )
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{p}: not a readable parquet file ({e})") from None
        return [{**r, "_where": f"{p} row {i}"} for i, r in enumerate(rows)]
    if suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            return [{**r, "_where": f"{p} line {i + 2}"} for i, r in enumerate(csv.DictReader(f))]
    text = p.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # many ".json" files are JSON lines
                raise DataError(f"{p}: malformed JSON ({e})") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
            return [
                {**r, "_where": f"{p} item {i}"}
                if isinstance(r, dict)
                else {"_where": f"{p} item {i}", "_error": f"expected an object, got {r!r}"}
                for i, r in enumerate(data)
            ]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(
                {"_where": where, "_error": f"malformed JSON ({e.msg} at column {e.colno})"}
            )
            continue
        if isinstance(rec, dict):
            rows.append({**rec, "_where": where})
        else:
            rows.append({"_where": where, "_error": f"expected a JSON object, got {rec!r}"})
    return rows


def split_off(rows: list[dict[str, Any]], val_size: float | int, seed: int, where: str):
    """(train, val): a seeded random ``val_size`` share (or count) of ``rows`` held out."""
    n = len(rows)
    if not val_size > 0:
        raise DataError(
            f"{where}: val_size must be a share in (0, 1) or a count >= 1, got {val_size}"
        )
    k = int(val_size) if val_size >= 1 else int(round(val_size * n))
    if not 1 <= k < n:
        raise DataError(
            f"{where}: val_size={val_size} leaves {k} held-out and {n - k} training rows of {n}; "
            "both must be at least 1"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def from_file(
    *, path: str, val_path: str | None = None, val_size: float | int = 0.05, seed: int = 0
) -> PreferenceData:
    """Rows of a local file; the held-out rows from ``val_path``, or ``val_size`` split off."""
    train = read_file(path)
    if val_path:
        return PreferenceData(train, read_file(val_path))
    return PreferenceData(*split_off(train, val_size, seed, str(path)))


def from_hub(
    *,
    name: str,
    subset: str | None = None,
    split: str = "train",
    val_split: str | None = None,
    revision: str | None = None,
    val_size: float | int = 0.05,
    seed: int = 0,
) -> PreferenceData:
    """Rows of a ``datasets`` dataset: a hub id, or a local directory of data files.

    ``val_split`` names the source's held-out split; without one, ``val_size`` is split off.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("hub datasets need the `datasets` package: pip install datasets") from None

    def load(which: str) -> list[dict[str, Any]]:
        try:
            ds = datasets.load_dataset(name, subset, split=which, revision=revision)
        except Exception as e:  # datasets raises many types (not found, offline, bad split)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(
                f"dataset.source.name={name!r} (subset {subset!r}, split {which!r}): could not "
                f"load it ({first})"
            ) from None
        return [{**r, "_where": f"{name}[{which}] row {i}"} for i, r in enumerate(ds.to_list())]

    train = load(split)
    if val_split:
        return PreferenceData(train, load(val_split))
    return PreferenceData(*split_off(train, val_size, seed, f"{name}[{split}]"))
