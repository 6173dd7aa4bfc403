"""What the training path needs from a strategy that shards the policy (FSDP, DeepSpeed ZeRO-3)
when it calls the policy outside the strategy's own forward: the probe, the closed-form probe,
online generation and the end-of-run evaluation.

- FSDP (Lightning's ``FSDPStrategy``, one unit per decoder layer): a decoder layer gathers its
  weights whenever it is called, but the root unit's (embeddings, final norm, LM head) are gathered
  only during the root's forward, i.e. inside ``training_step``/``validation_step``. Elsewhere
  ``full_root_params`` gathers them on every process (a collective: every process enters it).
- DeepSpeed ZeRO-3 gathers each module's weights when the module is called; the one weight read
  directly, the LM head's in the lean log-prob path, is read through a module call there
  (``dpo_lab.logps``).
- Generation on sharded weights gathers at every forward, so every process must run as many
  forwards: ``synced_generation`` (transformers' ``synced_gpus``) keeps them in step.
- ``full_policy_state`` gathers the whole trained policy onto process 0 (every process calls it).

``all_gather_ragged`` gathers a batch statistic from every process (KTO's KL rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch


def _fsdp_root(trainer: L.Trainer | None) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, FullyShardedDataParallel) else None


def _zero3(trainer: L.Trainer | None) -> bool:
    strategy = getattr(trainer, "strategy", None)
    return bool(getattr(strategy, "zero_stage_3", False))


def shards_parameters(trainer: L.Trainer | None) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3: no process holds the whole policy."""
    return _fsdp_root(trainer) is not None or _zero3(trainer)


def shards_gradients(trainer: L.Trainer | None) -> bool:
    """True under FSDP: each process's ``p.grad`` holds its shard of the gradient only."""
    return _fsdp_root(trainer) is not None


@contextlib.contextmanager
def full_root_params(trainer: L.Trainer | None) -> Iterator[None]:
    """The policy callable outside the strategy's forward, on every process (see module doc)."""
    root = _fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False):
        yield


def synced_generation(trainer: L.Trainer | None) -> bool:
    """Whether generation must keep every process's forwards in step (sharded weights)."""
    return shards_parameters(trainer) and trainer.world_size > 1


def full_policy_state(trainer: L.Trainer, module: Any) -> dict[str, Any] | None:
    """The trained policy's whole state dict on process 0 (None elsewhere); every process calls
    this. Under FSDP through the strategy's full state dict (``state_dict_type: full``), under
    ZeRO-3 through DeepSpeed's consolidated 16-bit state dict (gathered a module at a time, so
    no process holds every weight on its GPU at once; ``final/`` then holds bf16/fp16 weights)."""
    if _fsdp_root(trainer) is not None:
        state = trainer.strategy.lightning_module_state_dict()
    elif _zero3(trainer):
        # DeepSpeed gathers module by module onto process 0 (CPU), in the engine's 16-bit dtype
        state = trainer.strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
    else:
        state = module.state_dict()
    if not trainer.is_global_zero:
        return None
    prefix = "policy."
    return {k[k.index(prefix) + len(prefix) :]: v for k, v in state.items() if prefix in k}


def all_gather_ragged(values: torch.Tensor) -> torch.Tensor:
    """(Σ N_r,) every process's (N_r,) ``values``, in rank order; lengths may differ between
    processes (two collectives). Without a process group: ``values`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values.reshape(-1)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)])


def compute_dtype(trainer: L.Trainer) -> torch.dtype | None:
    """The dtype the precision plugin or strategy makes the policy compute in, where it casts
    the policy's weights: ``*-true`` precisions, DeepSpeed (its engine casts the model), FSDP's
    ``param_dtype``. None under AMP (``*-mixed`` on one process or DDP: weights kept, matmuls
    autocast) and fp32. The reference, which Lightning does not see, is cast to it (``build``)
    so that policy and reference compute alike: the implicit reward is 0 at step 0."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision, HalfPrecision

    plugin = trainer.precision_plugin
    if isinstance(plugin, HalfPrecision):
        return plugin._desired_input_dtype
    if isinstance(plugin, DeepSpeedPrecision):
        return plugin._desired_dtype
    if isinstance(plugin, FSDPPrecision):
        return plugin.mixed_precision_config.param_dtype
    return None
