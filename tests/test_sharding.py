"""The code paths a sharding strategy needs that CPU can check without the strategy itself
(DeepSpeed needs CUDA: its real run belongs to the GPU tests): Lightning's own optimizer loop
(the closure DeepSpeed and the GradScaler need), DeepSpeed's directory checkpoints for
``resume=auto``, the ZeRO-3 LM head read through a module call, and sharding detection."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import tiny_llama

from dpo_lab.errors import ConfigError
from dpo_lab.faults import resolve_resume
from dpo_lab.logps import completion_logps
from dpo_lab.module import PreferenceModule
from dpo_lab.sharding import shards_gradients, shards_parameters, synced_generation


def test_the_module_leaves_the_optimizer_loop_to_lightning():
    """Overriding optimizer_step to run the closure itself made Lightning's AMP plugin see a
    skipped backward (no scaler.step: fp16 never updated) and DeepSpeed's plugin raise."""
    assert PreferenceModule.optimizer_step is L.LightningModule.optimizer_step


def test_resume_finds_a_deepspeed_checkpoint_directory(tmp_path):
    """DeepSpeed writes last.ckpt as a directory of shards with a `latest` tag file; resume=auto
    took only files, so a DeepSpeed run silently started over."""
    out = tmp_path / "run"
    assert resolve_resume("auto", out) is None  # nothing yet: a fresh start
    last = out / "checkpoints" / "last.ckpt"
    (last / "checkpoint").mkdir(parents=True)
    (last / "latest").write_text("checkpoint")
    assert resolve_resume("auto", out) == str(last)
    assert resolve_resume(str(out), out) == str(last)  # a run dir
    assert resolve_resume(str(last), out) == str(last)  # the checkpoint directory itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "empty"), out)


def test_a_zero3_partitioned_head_is_called_not_read():
    """Under ZeRO-3 a weight is gathered only when its module is called: the lean path must call
    the head rather than read head.weight, and gives the same values and gradients."""
    torch.manual_seed(0)
    model = tiny_llama(vocab=40)
    ids = torch.randint(0, 40, (3, 12))
    att = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 6:] = 1

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logps, _ = completion_logps(model, ids, att, comp, chunk_size=8)
        logps.sum().backward()
        return logps.detach(), model.lm_head.weight.grad.clone()

    plain = run()
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    model.lm_head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its parameters with
    try:
        zero3 = run()
    finally:
        del model.lm_head.weight.ds_id
        hook.remove()
    assert calls  # the head was called (chunk by chunk), so DeepSpeed would gather it
    torch.testing.assert_close(zero3[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(zero3[1], plain[1], rtol=1e-4, atol=1e-6)


def test_sharding_is_told_from_the_strategy():
    plain = SimpleNamespace(strategy=SimpleNamespace(model=torch.nn.Linear(1, 1)), world_size=2)
    zero3 = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), world_size=2)
    zero2 = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=False), world_size=2)
    assert not shards_parameters(plain) and not shards_gradients(plain)
    assert shards_parameters(zero3) and synced_generation(zero3)
    assert not shards_parameters(zero2) and not shards_parameters(None)
