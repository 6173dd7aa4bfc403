"""Sampling from a causal LM: batched generation that stops where the model says a response ends.

``stop_token_ids`` gathers every end token a model and its tokenizer declare: the
``generation_config.eos_token_id`` list (Llama 3 declares three), the tokenizer's EOS, and the
chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...).
``generate`` stops and cuts each sample at the first of them. Used by the end-of-run evaluation
(``dpo_lab.evaluation``) and online DPO (``dpo_lab.online``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_lab.data.collate import chat_end_of_turn, encode_prompt, pad_sequences
from dpo_lab.logps import completion_logps


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end token of ``model`` and ``tokenizer`` (see the module docstring), in order."""
    config = getattr(model, "generation_config", None)
    declared = getattr(config, "eos_token_id", None)
    ids = list(declared) if isinstance(declared, (list, tuple)) else [declared]
    ids += [tokenizer.eos_token_id, chat_end_of_turn(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@dataclass
class Generations:
    prompts: list[str]
    texts: list[str]  # decoded completions, special tokens removed
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # sampled tokens up to and including the end token
    # True where the sample reached max_new_tokens without an end token: unfinished text, no EOS
    capped: list[bool] = field(default_factory=list)

    @property
    def capped_frac(self) -> float:
        return sum(self.capped) / len(self.capped) if self.capped else 0.0


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[int] | None = None,
    synced_gpus: bool = False,
    prompt_ids: list[list[int]] | None = None,
) -> Generations:
    """Sample one completion per prompt (left-padded batches, KV cache), cut after its first end
    token: any of ``stop`` (default ``stop_token_ids(model, tokenizer)``). A sample with no end
    token within ``max_new_tokens`` is kept as sampled and marked ``capped``: it is unfinished.

    Sampling is plain: temperature, top-p and nothing else (no top-k, no repetition penalty,
    whatever the model's own ``generation_config`` suggests), so that with temperature 1 and
    top-p 1 the samples are draws from π itself, which the KL estimates need. ``synced_gpus``:
    every process keeps running forwards until all are done (sharded weights, see
    ``dpo_lab.sharding``). ``prompt_ids``: the prompts already tokenized (RL passes the data
    module's, cut to ``dataset.max_prompt_length``); ``prompts`` are then their texts.
    """
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stop = stop_token_ids(model, tokenizer) if stop is None else list(stop)
    ends = set(stop)
    out = Generations(prompts, [], [], [], [])
    for start in range(0, len(prompts), batch_size):
        chunk = (
            [list(ids) for ids in prompt_ids[start : start + batch_size]]
            if prompt_ids is not None
            else [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        )
        P = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), P), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding: every prompt ends at position P-1
            input_ids[i, P - len(ids) :] = torch.tensor(ids)
            attention_mask[i, P - len(ids) :] = 1
        seqs = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=top_p,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop or None,
            synced_gpus=synced_gpus,
        )
        for ids, new in zip(chunk, seqs[:, P:].tolist(), strict=True):
            end = next((i for i, t in enumerate(new) if t in ends), None)
            if end is not None:
                new = new[: end + 1]
            out.capped.append(end is None)
            out.prompt_ids.append(ids)
            out.completion_ids.append(new)
            out.texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


@torch.no_grad()
def sequence_logps(
    model: Any, gens: Generations, pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """(N,) summed log-probs of each generated completion given its prompt under ``model``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = list(zip(gens.prompt_ids, gens.completion_ids, strict=True))
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pad_sequences(pairs[start : start + batch_size], pad_id)
        logps, _ = completion_logps(model, **{k: v.to(device) for k, v in batch.items()})
        out.append(logps.cpu())
    model.train(was_training)
    return torch.cat(out)
