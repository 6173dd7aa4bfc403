"""Past one process: DDP for real on CPU (two gloo processes) against one process with the same
global batch, the submitit launcher running a sweep, and the cluster presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as cli

# Tolerance of the DDP equivalence: the two runs differ only in the order of floating-point
# sums (gradients averaged by all-reduce, metrics reduced across ranks).
DDP_ATOL = 1e-4


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
        }


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights in ``final/``: the whole model, or under LoRA the adapter."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    lora = final / "adapter_model.safetensors"
    return load_file(lora if lora.exists() else final / "model.safetensors")


# LoRA under DDP: the adapter-disabled reference runs inside DDP's forward on every rank
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0", "model.lr=5e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, extra):
    common = [
        "dataset.source.n_val=47",  # odd: the two processes validate 24 and 23 pairs
        "trainer.max_epochs=1",  # 96 pairs / 16 a step = 6 steps, then validation
        "trainer.log_every_n_steps=1",
        "optim.scheduler=null",
        "eval.num_prompts=8",
        *extra,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    cli(*common, "dataset.batch_size=16", f"hydra.run.dir={one}", cwd=tmp_path)
    cli(
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "dataset.batch_size=8",
        f"hydra.run.dir={two}",
        cwd=tmp_path,
    )
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["global_batch_size"] == s2["global_batch_size"] == 16
    assert s1["steps"] == s2["steps"] == 6
    # the same examples each step: the same losses and the same final weights
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) and len(l1) == 6
    for step in l1:
        assert abs(l1[step] - l2[step]) < DDP_ATOL, (step, l1[step], l2[step])
    w1, w2 = weights(one), weights(two)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < DDP_ATOL, worst
    # validation split unevenly over the two processes, reduced as per-example means (not a mean
    # of the two ranks' means): equal to one pass over all 47
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen"):
        assert abs(s1[key] - s2[key]) < DDP_ATOL, (key, s1[key], s2[key])
    assert not (two / "final_rank1").exists() and "eval/kl" in s2  # one report, from rank 0


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "beta=0.1,0.2",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    summaries = sorted(
        (json.loads(p.read_text()) for p in sweep.glob("*/summary.json")), key=lambda s: s["beta"]
    )
    assert [s["beta"] for s in summaries] == [0.1, 0.2]
    assert all(s["steps"] == 2 for s in summaries)
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit


def test_cluster_presets_compose():
    from hydra import compose, initialize_config_module

    with initialize_config_module("dpo_lab.conf", version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        ddp = compose("train", overrides=["trainer=ddp"])
        fsdp = compose("train", overrides=["trainer=fsdp"])
        ds = compose("train", overrides=["trainer=deepspeed"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "gpus_per_node", "nodes", "timeout_min", "tasks_per_node"):
        assert key in launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.precision == "bf16-mixed"
    assert fsdp.trainer.strategy._target_.endswith("FSDPStrategy")
    assert (
        ds.trainer.strategy._target_.endswith("DeepSpeedStrategy")
        and ds.trainer.strategy.stage == 3
    )

    from hydra.utils import instantiate

    from dpo_lab.models import _is_decoder_layer

    policy = instantiate(fsdp.trainer.strategy.auto_wrap_policy)
    assert callable(policy)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    assert sum(_is_decoder_layer(x) for x in m.modules()) == 2


@pytest.mark.slow
def test_ddp_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    """Each rank's loader skips its own processed batches: stop two processes at step 4 of a
    6-step epoch, resume to step 8 (crossing the epoch end), compare with 8 steps straight."""
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "dataset.batch_size=8",
        "trainer.max_epochs=5",
        "trainer.log_every_n_steps=1",
        "optim.scheduler=null",
        "eval.num_prompts=0",
        "checkpoint.every_n_steps=2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli(*ddp, "trainer.max_steps=8", f"hydra.run.dir={straight}", cwd=tmp_path)
    cli(*ddp, "trainer.max_steps=4", f"hydra.run.dir={resumed}", cwd=tmp_path)
    cli(*ddp, "trainer.max_steps=8", "resume=auto", f"hydra.run.dir={resumed}", cwd=tmp_path)
    l1, l2 = train_losses(straight), train_losses(resumed)
    w1, w2 = weights(straight), weights(resumed)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < DDP_ATOL, worst
    assert sorted(l1) == sorted(l2) == list(range(8))
    for step in l1:
        assert abs(l1[step] - l2[step]) < DDP_ATOL, (step, l1[step], l2[step])
