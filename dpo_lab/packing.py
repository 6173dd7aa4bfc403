"""Padding-free batches: a step's sequences packed end to end into one row.

``dataset.padding_free=true`` makes the collators emit ``input_ids (1, L)`` with ``position_ids``
that restart at 0 for each sequence and ``cu_seq_lens (N+1,)``, the sequences' boundaries, and no
attention mask. No decoder position is spent on padding, and attention must never cross a
boundary. Who keeps the sequences apart, in transformers 5 (``masking_utils``):

- ``eager``, ``flex_attention``: the causal mask builder finds the restarts in ``position_ids``
  (``find_packed_sequence_indices``, only when no KV cache is passed: every forward here passes
  ``use_cache=False``) and builds a block-diagonal mask. Correct, but eager materializes an
  (L, L) mask and (heads, L, L) scores over the whole row; sdpa given that mask would compute
  every masked block too.
- ``flash_attention_2/3``: variable-length kernels fed ``cu_seq_lens_q/k`` (passed explicitly).
- ``sdpa``: switched to ``SDPA_VARLEN`` (registered here), which runs sdpa on each packed
  sequence on its own with ``is_causal`` (and the model's sliding window where it has one), so no
  masked block is computed. Every input that is not a packed row (padded batches, generation)
  goes to transformers' own sdpa unchanged.

Other model types are refused, and so is a model of a listed type whose code is not
transformers' own (``trust_remote_code``): packing is exact only where the model feeds
``position_ids`` to its positions, its mask builder and its attention, which the tests check type
by type (``PACKED_MODEL_TYPES``). Only the model's class is checked: a library that patches
transformers' own attention modules in place (kernels replacing ``forward``) is not detected.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lab.errors import ConfigError

log = logging.getLogger("dpo_lab")

SDPA_VARLEN = "dpo_lab_sdpa_varlen"

# model types whose packed log-probs tests/test_packing.py checks against the padded ones
PACKED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "smollm3", "gpt2"}
)
# attention implementations that keep packed sequences apart (see the module docstring)
PACKED_ATTENTION = frozenset(
    {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", SDPA_VARLEN}
)


def _segments(cu: Tensor) -> list[int]:
    """The boundaries as Python ints: set once per forward by ``completion_logps`` (one host
    read, not one per layer), else read here."""
    bounds = getattr(cu, "bounds", None)
    return list(bounds) if bounds is not None else cu.tolist()


def _boundaries_from_positions(position_ids: Tensor | None) -> list[int] | None:
    """A packed row's boundaries from its restarting positions (a forward given ``position_ids``
    without ``cu_seq_lens``), or None if they do not restart: one row, one sequence."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()
    return [0, *starts, pos.shape[0]] if starts else None


def _sdpa_varlen(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """sdpa on each sequence of a packed (1, heads, L, d) row; anything else to transformers'
    sdpa. Sequence s sees its own keys only, causally (and within the module's sliding window).
    The boundaries come from ``cu_seq_lens_q`` (``completion_logps`` passes them), else from
    restarting ``position_ids`` (a row transformers itself treats as packed only without a KV
    cache and without an attention mask: pass ``use_cache=False``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    # the window as the model passes it to its attention (Mistral, Phi-3, Qwen's sliding layers)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    L = query.shape[2]
    if attention_mask is None and query.shape[0] == 1 and L == key.shape[2]:
        cu = kwargs.get("cu_seq_lens_q")
        bounds = _segments(cu) if cu is not None else _boundaries_from_positions(
            kwargs.get("position_ids")
        )  # fmt: skip
        if bounds is None and window is not None and L > window:
            bounds = [0, L]  # one sequence: its window is applied below, never dropped
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    out = []
    # split, not slicing: split's backward is one concatenation, where each slice's backward
    # would write its gradient into a zeroed copy of the whole row
    for q, k, v in zip(*(t.split(sizes, dim=2) for t in (query, key, value)), strict=True):
        n = q.shape[2]
        if n == 0:
            continue
        mask, causal, gqa = None, True, groups > 1
        if window is not None and n > window:  # causal and q − kv < window (transformers')
            i = torch.arange(n, device=query.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            causal = False
            if gqa:  # with a mask, enable_gqa leaves only the math kernel on CUDA
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                gqa = False
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                enable_gqa=gqa,
            )
        )  # fmt: skip
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None  # (1, L, heads, d)


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No (L, L) mask for a packed row (transformers found restarting positions in a forward
    without cache or padding mask, and so forbids the causal skip): ``_sdpa_varlen`` keeps its
    sequences apart by their boundaries. Every other input gets sdpa's own mask (a padding mask,
    a sliding window, or None where plain causal attention is exact)."""
    from transformers.masking_utils import sdpa_mask

    packed = (
        kwargs.get("attention_mask") is None
        and not kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and kwargs.get("batch_size") == 1  # several packed rows: sdpa's block mask
    )
    return None if packed else sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make ``SDPA_VARLEN`` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_VARLEN, _sdpa_varlen)
    AttentionMaskInterface.register(SDPA_VARLEN, _varlen_mask)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper or a LoRA reference."""
    model = getattr(model, "peft", model)  # dpo_lab.lora.PeftReference
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def prepare_model(model: nn.Module, *, what: str = "model") -> None:
    """Check that ``model`` keeps packed sequences apart, or refuse with one line; an sdpa model
    is switched to ``SDPA_VARLEN``."""
    import transformers.masking_utils as masking

    if not hasattr(masking, "find_packed_sequence_indices"):
        raise ConfigError(
            "dataset.padding_free=true needs transformers >= 4.56, whose attention masks keep "
            "packed sequences apart"
        )
    base = _base(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        raise ConfigError(
            f"dataset.padding_free=true: the {what}'s model type {model_type!r} is not one whose "
            f"packed attention dpo_lab checks ({', '.join(sorted(PACKED_MODEL_TYPES))}); set "
            "dataset.padding_free=false"
        )
    module = type(base).__module__
    if not module.startswith(f"transformers.models.{model_type}."):
        raise ConfigError(
            f"dataset.padding_free=true: the {what} runs its own code ({module}), not "
            f"transformers' {model_type}, whose packing dpo_lab checks; set "
            "dataset.padding_free=false"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        raise ConfigError(
            f"dataset.padding_free=true: model.attn_implementation={impl!r} (the {what}'s) may "
            f"attend across packed sequences; use sdpa, eager, flex_attention or "
            "flash_attention_2/3"
        )
    if impl == "sdpa":
        register()
        base.set_attn_implementation(SDPA_VARLEN)
        if base.config._attn_implementation != SDPA_VARLEN:  # transformers declined the switch
            raise ConfigError(
                f"dataset.padding_free=true: the {what} could not switch to per-sequence sdpa; "
                "set model.attn_implementation=flash_attention_2 or dataset.padding_free=false"
            )
    elif impl == "eager":
        log.warning(
            "dataset.padding_free=true with eager attention: each packed row (a batch's tokens, "
            "L) gets a dense (L, L) mask and (heads, L, L) scores per layer; sdpa runs each "
            "sequence on its own instead"
        )


def pack(examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    """(prompt_ids, completion_ids) pairs end to end in one row.

    Returns:
        input_ids: (1, L), position_ids: (1, L) restarting at 0 per sequence,
        completion_mask: (1, L) 1 on completion tokens, cu_seq_lens: (N+1,) int32 boundaries.
    """
    ids: list[int] = []
    positions: list[int] = []
    completion: list[int] = []
    cu = [0]
    for p, c in examples:
        n = len(p) + len(c)
        ids += list(p) + list(c)
        positions += range(n)
        # a sequence's first token has no predecessor in it (the padded path drops position 0 the
        # same way): never scored from the end of the sequence before
        marks = [0] * len(p) + [1] * len(c)
        completion += [0] + marks[1:] if marks else []
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "completion_mask": torch.tensor([completion], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
    }
