"""Per-sequence log-probs: the lean path against a naive per-token loop, masking and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from dpo_lab.data.collate import pad_sequences
from dpo_lab.logps import completion_logps

EXAMPLES = [  # (prompt_ids, completion_ids) of different lengths
    ([1, 5, 6, 7], [8, 9, 2]),
    ([1, 10], [11, 12, 13, 14, 2]),
    ([1, 3, 4, 5, 6, 7, 8], [9]),
]


def naive(model, examples) -> list[float]:
    """One unpadded sequence at a time, full log_softmax, sum over completion tokens."""
    out = []
    for p, c in examples:
        ids = torch.tensor([p + c])
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
        out.append(sum(logprobs[len(p) + j - 1, tok] for j, tok in enumerate(c)))
    return torch.stack(out)


@pytest.mark.parametrize("lean, recompute", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_matches_naive_per_token(lean, recompute, chunk_size):
    model = tiny_llama()
    batch = pad_sequences(EXAMPLES, pad_id=0)
    logps, tokens = completion_logps(  # with grad enabled, so the recompute path runs
        model, **batch, chunk_size=chunk_size, lean=lean, recompute=recompute
    )
    with torch.no_grad():
        ref = naive(model, EXAMPLES)
    assert tokens.tolist() == [len(c) for _, c in EXAMPLES]
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recompute", [True, False])
def test_gradients_match_naive(recompute):
    model = tiny_llama()
    batch = pad_sequences(EXAMPLES, pad_id=0)
    grads = []
    for lean in (True, False):
        model.zero_grad()
        logps, _ = completion_logps(model, **batch, lean=lean, chunk_size=3, recompute=recompute)
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_prompt_and_padding_are_masked():
    model = tiny_llama()
    base = pad_sequences(EXAMPLES, pad_id=0)
    # Extra right padding, and a different pad id: same result.
    wide = pad_sequences(EXAMPLES, pad_id=3, length=20)
    with torch.no_grad():
        a, _ = completion_logps(model, **base)
        b, _ = completion_logps(model, **wide)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Only completion tokens count: masking one more prompt token as completion changes the sum
    # by exactly that token's log-prob, which the naive loop gives.
    p, c = EXAMPLES[0]
    moved = pad_sequences([(p[:-1], p[-1:] + c)], pad_id=0)
    with torch.no_grad():
        full, _ = completion_logps(model, **moved)
        logprobs = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
    torch.testing.assert_close(full[0] - a[0], logprobs[len(p) - 2, p[-1]], atol=1e-5, rtol=0)


def test_completion_mask_on_first_position_is_ignored():
    """Position 0 has no preceding token, so it can never carry a log-prob."""
    model = tiny_llama()
    batch = pad_sequences([([], [4, 5, 6])], pad_id=0)
    with torch.no_grad():
        logps, tokens = completion_logps(model, **batch)
    assert tokens.item() == 2
    assert torch.isfinite(logps).all()


def test_recompute_gradcheck_in_float64():
    """The hand-written backward of the recomputing head against finite differences."""
    from dpo_lab.logps import _LinearLogProbs

    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 6, 2, 2])
    fn = lambda h, w, b: _LinearLogProbs.apply(h, w, b, y, 2).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))
