"""Per-sequence log-probs of completion tokens, the one quantity every loss is built from.

Inputs are right-padded rows ``input_ids (N, T)`` with ``attention_mask (N, T)`` and
``completion_mask (N, T)`` (1 on completion tokens, 0 on prompt and padding), or N sequences
packed into one row (``dpo_lab.packing``: ``position_ids`` restarting per sequence and
``cu_seq_lens``, no attention mask). Token t's log-prob comes from the logits at position t−1, so
only positions followed by a completion token matter.

The lean path runs the decoder once, gathers the hidden states at those positions only (M of
them, M ≪ N·T when prompts are long), and applies the LM head to them in chunks, so no
``(N, T, V)`` logits tensor and no full-vocabulary fp32 copy of it is ever made. Models whose head
is not a plain linear layer (logit soft-capping, logit scaling) take the naive path instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dpo_lab.losses import PairedLogps, UnpairedLogps

# Architectures whose logits are exactly ``lm_head(decoder(x).last_hidden_state)``.
LEAN_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "smollm3", "gpt2"}
)


def _lean_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when the lean path is exact for this model, else None.

    A model may supply its own (``lean_parts()``: the LoRA reference runs the base decoder with
    the adapters off); a peft model is unwrapped to its base, whose layers carry the adapters.
    """
    custom = getattr(model, "lean_parts", None)
    if callable(custom):
        return custom()
    if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return None
    return decoder, head


def _partitioned(head: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 keeps each weight partitioned over the processes and gathers it only when
    its module is called; ``_LinearLogProbs`` reads ``head.weight`` directly, so a partitioned
    head goes through ``_gather_logps``, which calls it (chunk by chunk, autograd keeping each
    chunk's logits: the memory of the non-recomputing path)."""
    return hasattr(head.weight, "ds_id")


def _gather_logps(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """(M,) log softmax(head(hidden))[targets], computed ``chunk_size`` rows at a time in fp32.

    Autograd keeps every chunk's (m, V) fp32 logits for the backward pass.
    """
    out = []
    for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        logits = head(h).float()  # (m, V)
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[y] for (M, H) hidden states, one (chunk, V) block at a time.

    Saves only h, W, b, y and the (M,) logsumexp; the backward pass recomputes each chunk's
    logits, so at most one (chunk, V) fp32 buffer is alive in either pass. The price is one more
    h·Wᵀ per chunk in backward (the LM head's training cost goes from 3 to 4 matmuls).

    Autocast-aware, as ``torch.amp.custom_fwd``/``custom_bwd`` make a function (written out here
    because those fix the device type at definition, and this runs on CPU and CUDA): backward
    re-enters the autocast state forward ran under, so the recomputed logits are the very logits
    whose logsumexp forward saved (bf16 matmul, fp32 softmax) and its matmuls run in the autocast
    dtype as autograd's would. Without it the backward recomputed fp32 logits against a bf16
    logsumexp, a softmax that does not sum to 1.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: D102
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 → fp32; fp64 stays
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = torch.nn.functional.linear(hidden[s : s + chunk_size], weight, bias).to(acc)
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[s : s + chunk_size, None]).squeeze(-1)
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _LinearLogProbs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = (
            torch.zeros_like(bias, dtype=acc)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        n = ctx.chunk_size
        for s in range(0, hidden.shape[0], n):
            h, y, g = hidden[s : s + n], targets[s : s + n], grad_out[s : s + n]
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)  # as in forward
            # d logp_y / d logits = onehot(y) − softmax, scaled by the incoming gradient
            grad_logits = logits.sub_(lse[s : s + n, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, y[:, None], g[:, None].to(acc))
            # under autocast the two matmuls below run in its dtype (fp32 accumulation), as
            # autograd's backward of the forward's matmul would; otherwise in the weights' dtype
            if grad_h is not None:
                grad_h[s : s + n] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (grad_logits.T @ h.to(acc)).to(acc)
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    completion_mask: Tensor,
    *,
    position_ids: Tensor | None = None,
    cu_seq_lens: Tensor | None = None,
    chunk_size: int = 1024,
    lean: bool = True,
    recompute: bool = True,
    first: Tensor | None = None,
    aligned: bool = False,
    per_token: bool = False,
    hidden_states: bool = False,
) -> tuple[Tensor, ...]:
    """Summed log-probs of each row's completion tokens and their count.

    Args:
        model: a causal LM (transformers ``*ForCausalLM`` or compatible).
        input_ids: (N, T) right-padded token ids, or (1, L) packed.
        attention_mask: (N, T) 1 on real tokens; None for a packed row.
        completion_mask: (N, T) 1 on completion tokens (never on a sequence's first position).
        position_ids: (1, L) a packed row's positions, restarting at 0 per sequence.
        cu_seq_lens: (N+1,) a packed row's sequence boundaries (int32).
        chunk_size: completion positions per LM-head chunk on the lean path.
        lean: use the lean path where the model allows it (``False`` forces the naive path).
        recompute: on the lean path, recompute each chunk's logits in backward instead of keeping
            them (``_LinearLogProbs``): peak memory holds one (chunk, V) block, not (M, V).
        first: (N,) where given, also the sums over each sequence's first ``first[i]``
            completion tokens (LD-DPO's shared-length prefix), as a third result.
        aligned: also, detached, each sequence's mean over its completion tokens of
            log π(y_t) − log Σ_v π(v)² (WPO's sampled-alignment log-weight), as the next result.
        per_token: also each completion token's log-prob (M,) in row order and its row (M,)
            (RL's per-token ratios and KL penalty, ``dpo_lab.rlhf``), as the next two results.
        hidden_states: also the decoder's last hidden state (M, H) at the position that
            predicts each completion token (a value head's input), as the last result.

    Returns:
        logps: (N,) fp32, sum over completion tokens of log π(token | preceding tokens).
        tokens: (N,) number of completion tokens.
    """
    targets = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].bool()  # (N, T-1) position t predicts token t+1
    # use_cache=False everywhere: with a cache, transformers does not look for packed sequences
    inputs: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    )
    if cu_seq_lens is not None:
        if attention_mask is not None:
            raise ValueError("a packed row has no attention mask (its sequences have no padding)")
        inputs |= _packed_inputs(position_ids, cu_seq_lens)
    parts = _lean_parts(model) if lean else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state  # (N, T, H)
        h, y = hidden[:, :-1][mask], targets[mask]  # (M, H), (M,)
        states = h
        if recompute and torch.is_grad_enabled() and not _partitioned(head):
            token_logps = _LinearLogProbs.apply(h, head.weight, head.bias, y, chunk_size)
        else:
            token_logps = _gather_logps(head, h, y, chunk_size)  # (M,)
        if aligned:
            with torch.no_grad():  # log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z), by chunks
                sq = (
                    torch.cat(
                        [
                            torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
                            for z in (head(c).float() for c in h.split(chunk_size))
                        ]
                    )
                    if h.shape[0]
                    else h.new_zeros(0, dtype=torch.float32)
                )
    else:
        output = model(**inputs, output_hidden_states=hidden_states)
        logits = output.logits
        states = output.hidden_states[-1][:, :-1][mask] if hidden_states else None
        logprobs = logits[:, :-1].float().log_softmax(-1)  # (N, T-1, V)
        token_logps = logprobs.gather(-1, targets[..., None]).squeeze(-1)[mask]  # (M,)
        if aligned:
            with torch.no_grad():
                sq = torch.logsumexp(2 * logprobs[mask], -1)  # (M,) log Σ_v p_v²
    if cu_seq_lens is None:
        rows = mask.nonzero(as_tuple=True)[0]  # (M,) row of each completion token
        n, tokens = input_ids.shape[0], mask.sum(-1)
    else:
        rows, n = _packed_rows(mask, cu_seq_lens), cu_seq_lens.shape[0] - 1
        tokens = _count(rows, n)
    logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
    out: tuple[Tensor, ...] = (logps.index_add(0, rows, token_logps), tokens)
    if first is not None:
        # each token's place in its own completion: tokens come in row order, row by row
        place = torch.arange(rows.shape[0], device=rows.device) - (tokens.cumsum(0) - tokens)[rows]
        kept = torch.where(place < first.to(rows.device)[rows], token_logps, 0.0)
        out += (torch.zeros_like(logps).index_add(0, rows, kept),)
    if aligned:
        weights = (token_logps.detach().float() - sq).to(logps.dtype)
        total = torch.zeros_like(logps).index_add(0, rows, weights)
        out += (total / tokens.clamp(min=1).to(total.dtype),)
    if per_token:
        out += (token_logps, rows)
    if hidden_states:
        out += (states,)
    return out


def _packed_rows(mask: Tensor, cu_seq_lens: Tensor) -> Tensor:
    """(M,) the sequence of each completion token of a packed row, from its shifted (1, L-1)
    completion mask and its boundaries (no host sync)."""
    seq = torch.arange(cu_seq_lens.shape[0] - 1, device=cu_seq_lens.device)
    of_position = torch.repeat_interleave(seq, cu_seq_lens.diff(), output_size=mask.shape[1] + 1)
    return of_position[1:][mask[0]]


def _count(rows: Tensor, n: int) -> Tensor:
    """(n,) how many of ``rows`` name each sequence."""
    return torch.zeros(n, dtype=torch.long, device=rows.device).index_add(
        0, rows, torch.ones_like(rows)
    )


def _packed_inputs(position_ids: Tensor, cu_seq_lens: Tensor) -> dict[str, Any]:
    """Forward arguments of a packed row: positions for the mask builders (eager, flex) and the
    boundaries for the variable-length kernels (flash attention, ``SDPA_VARLEN``), read to the
    host once here rather than once per layer."""
    bounds = cu_seq_lens.tolist()
    if position_ids is None or position_ids.shape[0] != 1 or bounds[-1] != position_ids.shape[1]:
        raise ValueError(
            f"a packed row needs position_ids (1, L) and boundaries ending at L; got "
            f"{None if position_ids is None else tuple(position_ids.shape)} and {bounds[-3:]}"
        )
    cu_seq_lens.bounds = bounds  # dpo_lab.packing._segments
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)), default=0)
    return dict(
        position_ids=position_ids,
        cu_seq_lens_q=cu_seq_lens,
        cu_seq_lens_k=cu_seq_lens,
        max_length_q=longest,
        max_length_k=longest,
    )


def completion_tokens(batch: dict[str, Any], prefix: str = "") -> Tensor:
    """(N,) completion tokens of each sequence of a padded or packed batch, as
    ``completion_logps`` counts them (without running a model)."""
    mask = batch[f"{prefix}completion_mask"][:, 1:].bool()
    cu = batch.get(f"{prefix}cu_seq_lens")
    if cu is None:
        return mask.sum(-1)
    return _count(_packed_rows(mask, cu), cu.shape[0] - 1)


def _inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``completion_logps``'s tensor arguments from a collated batch (padded or packed)."""
    return {
        "input_ids": batch[f"{prefix}input_ids"],
        "attention_mask": batch.get(f"{prefix}attention_mask"),
        "completion_mask": batch[f"{prefix}completion_mask"],
        "position_ids": batch.get(f"{prefix}position_ids"),
        "cu_seq_lens": batch.get(f"{prefix}cu_seq_lens"),
    }


def paired_logps(
    model: nn.Module, batch: dict[str, Any], aligned: bool = False, **kwargs: Any
) -> PairedLogps:
    """Chosen and rejected log-probs from one forward over the concatenated (2B, T) block of a
    ``PreferenceCollator`` batch: rows [0, B) are chosen, [B, 2B) rejected, with each side's sum
    over the length both share (LD-DPO) and, with ``aligned``, WPO's log-weights. ``kwargs`` go
    to ``completion_logps``."""
    counts = completion_tokens(batch)
    B = counts.shape[0] // 2
    shared = torch.minimum(counts[:B], counts[B:]).repeat(2)  # the length both completions have
    logps, tokens, prefix, *weights = completion_logps(
        model, **_inputs(batch), first=shared, aligned=aligned, **kwargs
    )
    w = weights[0] if weights else None
    return PairedLogps(
        logps[:B],
        logps[B:],
        tokens[:B],
        tokens[B:],
        prefix[:B],
        prefix[B:],
        None if w is None else w[:B],
        None if w is None else w[B:],
    )


def unpaired_logps(model: nn.Module, batch: dict[str, Any], **kwargs: Any) -> UnpairedLogps:
    """Log-probs of an ``UnpairedCollator`` batch: each example's completion (with grad where grad
    is enabled) and the mismatched KL rows (never with grad: KTO's z₀ is detached)."""
    logps, tokens = completion_logps(model, **_inputs(batch), **kwargs)
    with torch.no_grad():
        kl, _ = completion_logps(model, **_inputs(batch, "kl_"), **kwargs)
    return UnpairedLogps(logps, tokens, batch["desirable"], kl)
