"""The user cache directory for artifacts the package builds (the embedded task, tokenized data,
the converted SmolLM2), how an artifact is named by its settings, and how it is put in place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$DPO_LAB_CACHE``, else ``$XDG_CACHE_HOME/dpo_lab``, else ``~/.cache/dpo_lab``."""
    if os.environ.get("DPO_LAB_CACHE"):
        return Path(os.environ["DPO_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo_lab"


def settings_key(version: int, settings: dict[str, Any]) -> str:
    """16 hex digits naming an artifact built by builder ``version`` from ``settings``."""
    blob = json.dumps({"v": version, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def build_into(root: Path, done: str) -> Iterator[Path]:
    """A temporary directory beside ``root`` to build in, renamed to ``root`` when the block
    ends, so that no reader sees a half-written artifact; ``done`` is the file a finished one
    holds. Where another process renamed its own build into place first, that one stands (the
    same settings, the same artifact); any other failure to rename is raised. The directory is
    made readable by other users of the cache (``mkdtemp`` creates it 0700), and removed if the
    block fails."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
