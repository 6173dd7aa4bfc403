"""Shared fixtures: a private cache dir, a shrunk embedded task, and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# The embedded task, shrunk so its one-time build takes seconds; every test shares one build.
SMALL = [
    "dataset.source.n_sft=800",
    "dataset.source.n_train=96",
    "dataset.source.n_val=48",
    "dataset.source.max_new_tokens=12",
    "dataset.source.generator.hidden_size=32",
    "dataset.source.generator.intermediate_size=64",
    "dataset.source.generator.sft_steps=80",
    "dataset.batch_size=16",
    "dataset.eval_batch_size=48",
    "probe.size=16",
    "probe.every_n_steps=2",
    "eval.num_prompts=16",
    "eval.samples_per_prompt=2",
    "eval.max_new_tokens=12",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No test touches the user's cache: builds go to a session-private directory."""
    d = tmp_path_factory.mktemp("dpo_lab_cache")
    os.environ["DPO_LAB_CACHE"] = str(d)
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["WANDB_MODE"] = "offline"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return d


def run_cli(
    *args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m dpo_lab.train`` on the shrunk task, ``args`` after the shrinking overrides
    (flags such as ``-m`` first, as Hydra wants); with ``check`` the exit status must be 0."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_lab.train", *flags, *SMALL, *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def env_with_tests() -> dict[str, str]:
    """An environment for ``run_cli`` in which tests/ is importable: a test's own callback or
    strategy as a ``_target_``."""
    tests = str(Path(__file__).parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}


def make_cfg(output_dir: Path | str, *overrides: str, small: bool = True) -> DictConfig:
    """Compose the real ``conf/train.yaml`` with ``overrides`` (after the shrinking ones)."""
    base = SMALL if small else []
    if any(o.startswith("dataset=") and o != "dataset=sentiment" for o in overrides):
        base = [o for o in base if not o.startswith("dataset.source.")]  # the task's settings
    with initialize_config_module("dpo_lab.conf", version_base="1.3"):
        return compose("train", overrides=[*base, f"output_dir={output_dir}", *overrides])


@pytest.fixture
def cfg_factory(tmp_path: Path):
    return lambda *overrides, small=True: make_cfg(tmp_path / "run", *overrides, small=small)


def tiny_llama(vocab: int = 40, seed: int = 0):
    """A random-init 2-layer Llama for log-prob tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
