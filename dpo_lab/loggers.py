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


def log_wandb_media(
    logger: Any, out_dir: Path, step: int, samples: list[dict[str, Any]] | None
) -> list[str]:
    """W&B content beyond scalars, for one run; returns the keys logged.

    - ``eval/samples``: a table of the end-of-run samples (prompt, policy and reference
      completions and, with a ground-truth reward, their rewards);
    - ``probe/trajectories``: ``probe.csv`` as a table (step, example, token counts, policy and
      reference log-probs, log-ratios), to plot any example's chosen/rejected trajectory in W&B;
    - ``probe/plot``: ``probe.png``, the mean trajectories.
    """
    import csv

    keys = []
    if samples:
        columns = [c for c in ("prompt", "sample", "policy", "reference") if c in samples[0]]
        columns += [
            c
            for c in ("policy_reward", "reference_reward", "policy_logratio", "policy_capped")
            if c in samples[0]
        ]
        data = [
            [r[c] if isinstance(r[c], (int, float)) else str(r[c]) for c in columns]
            for r in samples
        ]
        logger.log_table(key="eval/samples", columns=columns, data=data, step=step)
        keys.append("eval/samples")
    probe_csv = out_dir / "probe.csv"
    if probe_csv.exists():
        with open(probe_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            columns = list(rows[0]) + ["logratio_chosen", "logratio_rejected"]
            data = []
            for r in rows:
                pc, pr = float(r["policy_chosen_logps"]), float(r["policy_rejected_logps"])
                rc, rr = float(r["reference_chosen_logps"]), float(r["reference_rejected_logps"])
                data.append(
                    [
                        int(r["step"]),
                        r["example_id"],
                        int(r["chosen_tokens"]),
                        int(r["rejected_tokens"]),
                        pc,
                        pr,
                        rc,
                        rr,
                        pc - rc,
                        pr - rr,
                    ]
                )
            logger.log_table(key="probe/trajectories", columns=columns, data=data, step=step)
            keys.append("probe/trajectories")
    if (out_dir / "probe.png").exists():
        logger.log_image(key="probe/plot", images=[str(out_dir / "probe.png")], step=step)
        keys.append("probe/plot")
    return keys
