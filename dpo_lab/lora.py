"""LoRA through peft, with the reference as the same base seen with the adapters switched off.

``model.lora.enabled=true`` wraps the policy in a ``PeftModel``. A loss that needs a reference
then gets a ``PeftReference``: a view of the very same modules run inside
``peft_model.disable_adapter()`` (or, when training continues an existing SFT adapter, with a
frozen copy of that adapter active), so no second copy of the weights exists. It registers no
parameters of its own, so it adds nothing to the optimizer, the checkpoint or ``.to()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpo_lab.errors import ConfigError

TRAINED = "default"  # the adapter being trained
REFERENCE = "reference"  # a frozen copy of a starting SFT adapter, when there is one


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def wrap(model: nn.Module, lora: dict[str, Any], *, reference: bool) -> nn.Module:
    """The policy as a ``PeftModel``: a new LoRA adapter, or an existing one to go on training
    (``lora.adapter``; with ``reference``, a frozen copy is loaded as the reference's adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.get("adapter"):
        path = Path(str(lora["adapter"])).expanduser()
        if not (path / "adapter_config.json").exists():
            raise ConfigError(
                f"model.lora.adapter={str(path)!r}: no adapter_config.json there "
                "(expected a peft save_pretrained directory)"
            )
        policy = PeftModel.from_pretrained(
            model, str(path), adapter_name=TRAINED, is_trainable=True
        )
        if reference:
            policy.load_adapter(str(path), adapter_name=REFERENCE, is_trainable=False)
            policy.set_adapter(TRAINED)
        return policy
    target = lora.get("target_modules", "all-linear")
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=target if isinstance(target, str) else list(target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class _Decoder:
    """The base decoder, called inside the reference's adapter context (for the lean path)."""

    def __init__(self, ref: PeftReference, decoder: nn.Module):
        self.ref, self.decoder = ref, decoder

    def __call__(self, **kwargs: Any) -> Any:
        with self.ref.context():
            return self.decoder(**kwargs)


class PeftReference(nn.Module):
    """The frozen reference of a LoRA policy: the policy's own modules, adapters off."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not is_peft(policy):
            raise TypeError("PeftReference needs a peft model")
        object.__setattr__(self, "peft", policy)  # not a submodule: nothing stored twice
        self.adapter = REFERENCE if REFERENCE in policy.peft_config else None
        self.config = policy.get_base_model().config

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Adapters off, or the frozen starting adapter on; the trained adapter after."""
        training = self.peft.training
        self.peft.eval()  # the reference never runs dropout, whatever mode the policy is in
        try:
            if self.adapter is None:
                with self.peft.disable_adapter():
                    yield
                return
            grads = {n: p.requires_grad for n, p in self.peft.named_parameters()}
            self.peft.set_adapter(self.adapter)
            try:
                yield
            finally:
                self.peft.set_adapter(TRAINED)
                for n, p in self.peft.named_parameters():  # set_adapter changes requires_grad
                    p.requires_grad_(grads[n])
        finally:
            self.peft.train(training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.context():
            return self.peft(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.context():
            return self.peft.generate(*args, **kwargs)

    def lean_parts(self) -> tuple[Any, nn.Module] | None:
        """(decoder, head) for ``logps``' lean path: the base's, run in this context."""
        from dpo_lab.logps import _lean_parts

        parts = _lean_parts(self.peft.get_base_model())
        if parts is None:
            return None
        decoder, head = parts
        return _Decoder(self, decoder), head

    def fingerprint_state(self) -> dict[str, torch.Tensor]:
        """The weights the reference computes with (for the reference-log-prob cache key):
        the base's, plus the frozen starting adapter's when there is one."""
        keep = f".{self.adapter}." if self.adapter else None
        return {
            k: v
            for k, v in self.peft.state_dict().items()
            if "lora_" not in k or (keep is not None and keep in k)
        }

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The base's weights (for device/dtype queries); the adapters are not the reference's."""
        for name, p in self.peft.named_parameters():
            if "lora_" not in name:
                yield p

    def train(self, mode: bool = True) -> PeftReference:
        return self  # the policy's mode is the policy's; the reference runs under no_grad

    def requires_grad_(self, requires_grad: bool = True) -> PeftReference:
        return self  # the base is frozen by peft already; never touch the adapters
