"""Logger factories that need more than ``_target_`` can say."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def wandb_credentials() -> bool:
    """True when W&B has an API key (environment or ~/.netrc); never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(*, mode: str = "auto", **kwargs: Any):
    """A Lightning ``WandbLogger``. ``mode=auto``: online with credentials, else offline.

    Offline runs are written under ``save_dir/wandb`` and uploaded later with ``wandb sync``.
    """
    from lightning.pytorch.loggers import WandbLogger

    from dpo_lab.errors import ConfigError

    if mode not in ("auto", "online", "offline"):
        raise ConfigError(f"logger.wandb.mode={mode!r}: expected auto, online or offline")
    offline = mode == "offline" or (mode == "auto" and not wandb_credentials())
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(offline=offline, **kwargs)
