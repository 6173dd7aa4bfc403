"""The user cache directory for artifacts the package builds (the embedded task, tokenized data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$DPO_LAB_CACHE``, else ``$XDG_CACHE_HOME/dpo_lab``, else ``~/.cache/dpo_lab``."""
    if os.environ.get("DPO_LAB_CACHE"):
        return Path(os.environ["DPO_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo_lab"
