"""Tokenize (prompt, completion) and pad batches into the shape ``completion_logps`` takes.

The prompt and the completion are tokenized separately and concatenated, so the completion's
tokens are exactly the completion's, whatever the tokenizer would merge across the boundary. The
prompt gets the tokenizer's own special tokens (BOS where it adds one); the completion gets none,
and the EOS token is appended so that the policy learns where a response stops. Conversational
rows (message lists) are rendered with the chat template first.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dpo_lab.errors import DataError


def render(tokenizer: Any, prompt: Any, completion: Any = None) -> tuple[str, str | None, bool]:
    """(prompt text, completion text, templated) for plain strings or message lists.

    Message lists go through the tokenizer's chat template: the prompt with the generation
    prompt appended, the completion as what the full conversation adds after it. A template that
    renders the prompt differently inside the full conversation has no exact boundary: error.
    """
    if not isinstance(prompt, list):
        return prompt, completion, False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "conversational rows need a chat template, and this tokenizer has none; set "
            "model.chat_template to a Jinja template (or a file holding one)"
        )
    p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return p, None, True
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(p):
        raise DataError(
            "the chat template renders the prompt differently inside the full conversation, so "
            f"the prompt/response boundary is not exact; prompt renders as {p[-80:]!r}"
        )
    return p, end_at_turn(tokenizer, full[len(p) :]), True


def end_at_turn(tokenizer: Any, text: str) -> str:
    """``text`` cut after the chat template's end-of-turn token when nothing but whitespace and
    special tokens follows it (ChatML's ``<|im_end|>\\n``, Phi-3's ``<|end|>\\n<|endoftext|>``):
    generation stops at that token, so sampled and dataset completions are scored over the same
    tokens. Text after it is kept."""
    eot, mark, specials = _turn(tokenizer)
    k = text.rfind(mark) if eot is not None else -1
    if k < 0:
        return text
    rest = text[k + len(mark) :]
    for special in specials:
        rest = rest.replace(special, "")
    return text[: k + len(mark)] if not rest.strip() else text


def chat_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with, if it has one
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...). Computed once per tokenizer."""
    return _turn(tokenizer)[0]


def _turn(tokenizer: Any) -> tuple[int | None, str, set[str]]:
    """(end-of-turn id, its text, every special token's text), once per tokenizer: every chat
    row asks."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "", set()
    key = (tokenizer.chat_template, len(tokenizer))  # a new template or added tokens: again
    cached, turn = _END_OF_TURN.get(tokenizer, (None, None))
    if cached != key:
        eot = _end_of_turn(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials = {
            *tokenizer.all_special_tokens,
            *(t.content for t in added.values() if t.special),
        }
        mark = tokenizer.convert_ids_to_tokens(eot) if eot is not None else ""
        turn = (eot, mark, specials)
        _END_OF_TURN[tokenizer] = (key, turn)
    return turn


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _end_of_turn(tokenizer: Any) -> int | None:
    turn = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # a template that wants other roles: no end-of-turn token to learn
        return None
    if "pong" not in text:
        return None
    ids = tokenizer(text[text.rindex("pong") + 4 :], add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    return ids[0] if ids[0] in special_ids(tokenizer) else None


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (BOS, EOS, pad, ...) and every added
    token marked special (chat markers such as ``<|im_start|>``, ``<|eot_id|>``)."""
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, tok in added.items() if getattr(tok, "special", False)}


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if eos is not None and ids and ids[-1] == eos else ids


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Prompt token ids: the tokenizer's own special tokens (BOS), or the chat template's."""
    return encode_rows(tokenizer, [prompt])[0][0]


def encode_example(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids), tokenized apart so the boundary is exact.

    Plain text: BOS per tokenizer on the prompt, EOS appended to the completion. Message lists:
    the chat template's own tokens, and its end-of-turn marks where the response stops.
    """
    prompt_ids, (completion_ids,) = encode_rows(tokenizer, [prompt], [completion])
    return prompt_ids[0], completion_ids[0]


def encode_batch(
    tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]
) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` over many rows, with batched tokenizer calls."""
    prompt_ids, (completion_ids,) = encode_rows(tokenizer, prompts, completions)
    return list(zip(prompt_ids, completion_ids, strict=True))


def token_ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts. Calls the Rust backend directly when that is exactly what the
    transformers wrapper would do (its truncation and padding off), skipping the wrapper's
    per-text conversion; otherwise the wrapper."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def encode_rows(
    tokenizer: Any, prompts: Sequence[Any], *completion_lists: Sequence[Any]
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each prompt tokenized once, and every list of completions for those prompts.

    Returns ``(prompt_ids, [completion_ids for each completion list])`` (see ``encode_example``).
    """
    eos = tokenizer.eos_token_id
    templated = []
    prompt_texts = []
    comp_texts: list[list[str]] = [[] for _ in completion_lists]
    for i, prompt in enumerate(prompts):
        for k, completions in enumerate(completion_lists):
            p, c, t = render(tokenizer, prompt, completions[i])
            comp_texts[k].append(c)
        if not completion_lists:
            p, _, t = render(tokenizer, prompt)
        prompt_texts.append(p)
        templated.append(t)
    plain = [i for i, t in enumerate(templated) if not t]
    templ = [i for i, t in enumerate(templated) if t]
    prompt_ids: list[list[int]] = [[] for _ in prompts]
    for idx, special in ((plain, True), (templ, False)):
        for i, ids in zip(
            idx, token_ids(tokenizer, [prompt_texts[i] for i in idx], special), strict=True
        ):
            prompt_ids[i] = _strip_eos(ids, eos)
    out = []
    for texts in comp_texts:
        ids = token_ids(tokenizer, texts, False)
        if eos is not None:
            for i in plain:
                ids[i].append(eos)
        out.append(ids)
    return prompt_ids, out


def pad_sequences(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, length: int | None = None
) -> dict[str, Tensor]:
    """Right-pad (prompt_ids, completion_ids) pairs.

    Returns:
        input_ids: (N, T), attention_mask: (N, T), completion_mask: (N, T) — 1 on completion tokens.
    """
    T = max(len(p) + len(c) for p, c in examples)
    T = max(T, length or 0)
    N = len(examples)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def batch_sequences(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, padding_free: bool
) -> dict[str, Tensor]:
    """``pad_sequences`` (N, T) rows, or with ``padding_free`` one packed row
    (``dpo_lab.packing.pack``); ``completion_logps`` takes either."""
    if padding_free:
        from dpo_lab.packing import pack

        return pack(list(examples))
    return pad_sequences(examples, pad_id)


class PreferenceCollator:
    """Batches tokenized pairs into one concatenated block of 2B sequences: chosen, then rejected.

    Each item is a dict with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``index`` (its
    position in the split), and ``ref_chosen_logps``/``ref_rejected_logps`` when the reference
    was precomputed. Chosen and rejected are padded to one length (a (2B, T) block), or with
    ``padding_free`` packed end to end into one row, so the policy sees them in a single forward.
    """

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id, self.padding_free = pad_id, padding_free

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        chosen = [(it["prompt_ids"], it["chosen_ids"]) for it in items]
        rejected = [(it["prompt_ids"], it["rejected_ids"]) for it in items]
        batch = batch_sequences(chosen + rejected, self.pad_id, self.padding_free)
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch["ids"] = [it["id"] for it in items]  # example ids, for error messages
        if "ref_chosen_logps" in items[0]:  # precomputed reference log-probs (dpo_lab.refcache)
            for k in ("ref_chosen_logps", "ref_rejected_logps"):
                batch[k] = torch.tensor([it[k] for it in items], dtype=torch.float32)
        return batch


def mismatched(items: Sequence[dict[str, Any]]) -> list[int]:
    """For each item i, the first item after it (cyclically) with a different prompt: KTO's KL
    rows pair a prompt with a completion written for another prompt.

    Paired data split for KTO comes as chosen₀, rejected₀, chosen₁, ... (``split_pairs``; the
    validation loader keeps that order), so "the next item" alone would pair every chosen
    completion's prompt with its own rejected completion. Only a batch whose items all share one
    prompt has no mismatch to offer; its rows then take the next item.
    """
    B = len(items)
    out = []
    for i in range(B):
        others = ((i + k) % B for k in range(1, B))
        out.append(
            next(
                (j for j in others if items[j]["prompt_ids"] != items[i]["prompt_ids"]), (i + 1) % B
            )
        )
    return out


class UnpairedCollator:
    """Batches single completions with binary labels (KTO), plus mismatched rows for its KL term.

    Each item has ``prompt_ids``, ``completion_ids``, ``desirable`` and ``index``. Row i of the
    KL block pairs prompt i with the completion of the next item with a different prompt
    (``mismatched``), so every KL row is a prompt/completion mismatch whenever the batch holds
    two prompts (the loss rejects B < 2). ``padding_free``: each block packed into one row.
    """

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id, self.padding_free = pad_id, padding_free

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        batch = batch_sequences(
            [(it["prompt_ids"], it["completion_ids"]) for it in items],
            self.pad_id,
            self.padding_free,
        )
        partner = mismatched(items)
        kl = batch_sequences(
            [
                (it["prompt_ids"], items[j]["completion_ids"])
                for it, j in zip(items, partner, strict=True)
            ],
            self.pad_id,
            self.padding_free,
        )
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(it["desirable"]) for it in items])
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch["ids"] = [it["id"] for it in items]
        return batch
