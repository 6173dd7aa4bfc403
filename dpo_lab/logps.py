"""Per-sequence log-probs of completion tokens, the one quantity every loss is built from.

Inputs are right-padded rows ``input_ids (N, T)`` with ``attention_mask (N, T)`` and
``completion_mask (N, T)`` (1 on completion tokens, 0 on prompt and padding). Token t's log-prob
comes from the logits at position t−1, so only positions followed by a completion token matter.

The lean path runs the decoder once, gathers the hidden states at those positions only (M of
them, M ≪ N·T when prompts are long), and applies the LM head to them in chunks, so no
``(N, T, V)`` logits tensor and no full-vocabulary fp32 copy of it is ever made. Models whose head
is not a plain linear layer (logit soft-capping, logit scaling) take the naive path instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Architectures whose logits are exactly ``lm_head(decoder(x).last_hidden_state)``.
LEAN_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "smollm3", "gpt2"}
)


def _lean_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when the lean path is exact for this model, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return None
    return decoder, head


def _gather_logps(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """(M,) log softmax(head(hidden))[targets], computed ``chunk_size`` rows at a time in fp32."""
    out = []
    for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        logits = head(h).float()  # (m, V)
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int = 1024,
    lean: bool = True,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's completion tokens and their count.

    Args:
        model: a causal LM (transformers ``*ForCausalLM`` or compatible).
        input_ids: (N, T) right-padded token ids.
        attention_mask: (N, T) 1 on real tokens.
        completion_mask: (N, T) 1 on completion tokens (never on the first position).
        chunk_size: completion positions per LM-head chunk on the lean path.
        lean: use the lean path where the model allows it (``False`` forces the naive path).

    Returns:
        logps: (N,) fp32, sum over completion tokens of log π(token | preceding tokens).
        tokens: (N,) number of completion tokens.
    """
    targets = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].bool()  # (N, T-1) position t predicts token t+1
    parts = _lean_parts(model) if lean else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (N, T, H)
        token_logps = _gather_logps(head, hidden[:, :-1][mask], targets[mask], chunk_size)  # (M,)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logprobs = logits[:, :-1].float().log_softmax(-1)  # (N, T-1, V)
        token_logps = logprobs.gather(-1, targets[..., None]).squeeze(-1)[mask]  # (M,)
    rows = mask.nonzero(as_tuple=True)[0]  # (M,) row of each completion token
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, mask.sum(-1)
