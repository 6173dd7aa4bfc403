"""Test-only: Lightning's FSDPStrategy on CPU with gloo.

Lightning refuses ``FSDPStrategy`` on CPU by an exact type check (a subclass passes it), and it
builds ``FullyShardedDataParallel(device_id=root_device.index)``, None on CPU, which torch then
refuses ("FSDP needs a non-CPU accelerator device"). torch 2.13's FSDP1 runs forward and backward
on CPU with gloo when given ``device_id=torch.device("cpu")``: this subclass passes that, and is
otherwise Lightning's strategy unchanged."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def lightning_module_state_dict(self) -> dict:
        """The full state dict on every process, not offloaded: with torch 2.13 on CPU,
        Lightning's ``rank0_only=True, offload_to_cpu=True`` segfaults on rank 1 while FSDP
        clones a state-dict entry whose storage was already freed (seen in this test; the
        CUDA path, where offloading moves the tensors, is Lightning's own and unchanged)."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict:
        """As ``lightning_module_state_dict``: gathered on every process, not offloaded. With
        Lightning's ``rank0_only=True, offload_to_cpu=True`` on CPU the saved AdamW state came
        back wrong, silently: a run resumed at step 4 matched a straight run at step 4 and
        diverged from step 5 (loss 0.7305 against 0.7330); with this, it matches exactly."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False),
        ):
            state = FSDP.optim_state_dict(self.model, optimizer)
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
