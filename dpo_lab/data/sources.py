"""Where preference rows come from. A source is any callable (named by ``_target_`` in
``dataset.source``) that returns a ``PreferenceData``; the embedded task is one such source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class PreferenceData:
    """What a dataset source gives the data module.

    Attributes:
        train: rows with ``id``, ``prompt``, ``chosen``, ``rejected`` (other keys are metadata).
        val: held-out rows, same shape.
        reward_fn: the task's ground-truth ``reward(prompt, completion)``, or None for real data.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    reward_fn: Callable[[str, str], float] | None = None
