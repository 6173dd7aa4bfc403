"""Load a tokenizer and causal LM from a hub id, a local directory or the embedded task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpo_lab.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_SOURCES = {"sentiment": "dpo_lab.tasks.sentiment.load"}


def resolve_name_or_path(name_or_path: str, source_cfg: dict[str, Any]) -> str:
    """A ``builtin:<task>`` name becomes the task's built SFT base directory; others pass through.

    The embedded model is the SFT base of the embedded task, so it is built from the dataset's
    task settings (``dataset.source``) and needs that dataset.
    """
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    task = name_or_path.split(":", 1)[1]
    if task not in BUILTIN_SOURCES:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: unknown builtin; known: "
            + ", ".join(f"builtin:{t}" for t in BUILTIN_SOURCES)
        )
    target = source_cfg.get("_target_")
    if target != BUILTIN_SOURCES[task]:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is the SFT base of the embedded {task} task and "
            f"needs dataset={task}; this config's dataset.source._target_ is {target!r}"
        )
    from dpo_lab.tasks import sentiment

    kwargs = {k: v for k, v in source_cfg.items() if k != "_target_"}
    return str(sentiment.build(**kwargs) / "model")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(tokenizer, model) through ``Auto*.from_pretrained``, with one-line errors for user mistakes.

    A tokenizer without a pad token gets its EOS token as pad (padding is always masked).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no such model directory")
    if looks_local and not (path / "config.json").exists():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: directory has no config.json "
            "(expected a save_pretrained model)"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path) if looks_local else name_or_path, **kwargs
        )
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if looks_local else name_or_path, dtype=DTYPES[dtype], **kwargs
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: could not load it as a local directory or a hub "
            f"id ({first})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
