"""Padding-free batches (dpo_lab/packing.py): packed log-probs equal padded ones, model type by
model type and attention implementation by implementation; what cannot pack is refused."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from dpo_lab import packing
from dpo_lab.data.collate import PreferenceCollator, UnpairedCollator, encode_batch, pad_sequences
from dpo_lab.errors import ConfigError
from dpo_lab.logps import completion_logps, completion_tokens, paired_logps, unpaired_logps
from dpo_lab.packing import PACKED_MODEL_TYPES, SDPA_VARLEN, pack, prepare_model
from dpo_lab.train import build

V = 48
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _config(model_type: str, **extra):
    """A tiny random-init config of ``model_type`` (GQA where the type has it)."""
    from transformers import AutoConfig

    kw = dict(vocab_size=V, max_position_embeddings=128, **SMALL)
    if model_type == "gpt2":
        kw = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    elif model_type != "gpt_neox":
        kw["num_key_value_heads"] = 2
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **{**kw, **ids, **extra})


def _model(model_type: str, attn: str, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(model_type, **extra)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def _examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Very different lengths: 2 to 70 tokens, one completion a single token (EOS alone)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1), (30, 40), (3, 5), (12, 1), (50, 20), (2, 9)]
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(p), ids(c)) for p, c in shapes]


def test_pack_layout():
    out = pack([([5, 6], [7, 8, 9]), ([], [3, 4]), ([1], [2])])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 1, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1]]
    assert out["cu_seq_lens"].tolist() == [0, 5, 7, 9]
    assert out["cu_seq_lens"].dtype == torch.int32
    # a sequence's first token is never a completion token: nothing is scored across a boundary,
    # as the padded path never scores position 0 (the empty prompt's first token is not counted)
    assert out["completion_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 1, 0, 1]]
    padded = pad_sequences([([5, 6], [7, 8, 9]), ([], [3, 4]), ([1], [2])], pad_id=0)
    assert completion_tokens(out).tolist() == completion_tokens(padded).tolist() == [3, 1, 1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", sorted(PACKED_MODEL_TYPES))
def test_packed_logps_equal_padded(model_type, attn):
    """Every model type packing accepts, under each attention implementation CPU runs (sdpa is
    switched to the per-sequence kernel): log-probs and token counts equal the padded path's."""
    model = _model(model_type, attn)
    examples = _examples()
    padded = completion_logps(model, **pad_sequences(examples, pad_id=0))
    ref = copy.deepcopy(model)
    prepare_model(model)
    assert model.config._attn_implementation == (SDPA_VARLEN if attn == "sdpa" else attn)
    with mock.patch("dpo_lab.packing._segments", wraps=packing._segments) as per_sequence:
        packed = completion_logps(model, attention_mask=None, **pack(examples))
    # sdpa ran sequence by sequence in every layer (not transformers' block mask)
    assert per_sequence.call_count == (model.config.num_hidden_layers if attn == "sdpa" else 0)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1].tolist() == padded[1].tolist()
    # the switched model answers padded batches exactly as sdpa does (generation, KL rows)
    again = completion_logps(model, **pad_sequences(examples, pad_id=0))
    torch.testing.assert_close(again[0], completion_logps(ref, **pad_sequences(examples, 0))[0])


@pytest.mark.parametrize("model_type", sorted(PACKED_MODEL_TYPES))
def test_position_ids_alone_keep_sequences_apart(model_type):
    """A packed row given only its restarting positions (no boundaries, as a user's own call
    would be): each sequence's logits equal the sequence run alone, so the positions reach the
    attention of every accepted model type."""
    model = _model(model_type, "sdpa")
    prepare_model(model)
    examples = _examples(3)
    row = pack(examples)
    with torch.no_grad():
        logits = model(
            input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False
        ).logits[0]
        cu = row["cu_seq_lens"].tolist()
        for (p, c), s, e in zip(examples, cu[:-1], cu[1:], strict=True):
            alone = model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[s:e], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [False, True])
def test_the_switched_model_keeps_a_window_on_unpacked_input(use_cache):
    """sdpa switched to the per-sequence kernel, on one unpacked sequence longer than the window
    and no attention mask (with and without a KV cache, as generation runs): the same logits as
    transformers' sdpa, whose mask holds the window; and a packed row given only its positions
    keeps the window in each sequence."""
    model = _model("mistral", "sdpa", sliding_window=4)
    plain = copy.deepcopy(model)
    prepare_model(model)
    ids = torch.randint(1, V, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=use_cache).logits
        torch.testing.assert_close(got, plain(input_ids=ids, use_cache=use_cache).logits)
        full = _model("mistral", "sdpa")  # no window: the comparison could fail
        assert (got - full(input_ids=ids, use_cache=use_cache).logits).abs().max() > 1e-3
        row = pack([(ids[0, :5].tolist(), ids[0, 5:].tolist()), ([3, 4], [5, 6, 7, 8, 9, 10])])
        packed = model(
            input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False
        ).logits[0]
        torch.testing.assert_close(packed[:12], plain(input_ids=ids, use_cache=False).logits[0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_sliding_window_is_kept_in_packed_sequences(model_type, attn):
    """A sliding window shorter than the sequences: packed equals padded (whose mask has the
    window), and the window changes the values (so the comparison could fail)."""
    extra = dict(sliding_window=4)
    if model_type == "qwen2":
        extra |= dict(use_sliding_window=True, max_window_layers=0)
    model = _model(model_type, attn, **extra)
    full = _model(model_type, attn)
    examples = _examples(1)
    padded = completion_logps(model, **pad_sequences(examples, pad_id=0))[0]
    assert (padded - completion_logps(full, **pad_sequences(examples, 0))[0]).abs().max() > 1e-3
    prepare_model(model)
    packed = completion_logps(model, attention_mask=None, **pack(examples))[0]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recompute", [True, False])
def test_packed_gradients_equal_padded(recompute):
    model = _model("llama", "sdpa")
    examples = _examples(2)
    grads = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            prepare_model(model)
            logps, _ = completion_logps(
                model, attention_mask=None, **pack(examples), recompute=recompute
            )
        else:
            logps, _ = completion_logps(model, **pad_sequences(examples, 0), recompute=recompute)
        (logps * torch.linspace(-1, 1, len(examples))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_packed_equals_padded_under_bf16_autocast():
    """bf16-mixed as trainer=cpu runs it (bf16 autocast over fp32 weights), a GQA model with a
    sliding window shorter than some sequences: the same token counts, log-probs and gradients
    as the padded path, to bf16's resolution."""
    model = _model("mistral", "sdpa", sliding_window=16)
    examples = _examples(5)
    out = {}
    for packed in (False, True):
        model.zero_grad()
        if packed:
            prepare_model(model)
        batch = {**pack(examples), "attention_mask": None} if packed else pad_sequences(examples, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, tokens = completion_logps(model, **batch)
        logps.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[packed] = (logps.detach(), tokens, grad)
    (a, ta, ga), (b, tb, gb) = out[False], out[True]
    assert ta.tolist() == tb.tolist()
    # per sequence: 5e-5 measured; attending across sequences gives 1.6e-2
    assert ((a - b).abs() / a.abs()).max() <= 1e-3
    assert (ga - gb).norm() <= 2e-2 * ga.norm()


def test_a_bpe_tokenized_chat_batch_packs_exactly():
    """Real tokenization: byte-level BPE with a chat template, an empty response (the end of
    turn alone), paired and unpaired (KTO's mismatched KL rows) collators."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.test_data import CHAT_TEMPLATE

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    t.train_from_iterator(["hello world, the weather is nice today"] * 50, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "the " * 30}]]
    chosen = [[{"role": "assistant", "content": "nice weather today, world"}],
              [{"role": "assistant", "content": ""}]]  # fmt: skip
    rejected = [[{"role": "assistant", "content": "hello"}],
                [{"role": "assistant", "content": "world " * 20}]]  # fmt: skip
    c, r = encode_batch(tok, prompts, chosen), encode_batch(tok, prompts, rejected)
    items = [
        {"prompt_ids": c[i][0], "chosen_ids": c[i][1], "rejected_ids": r[i][1], "index": i, "id": i}
        for i in range(2)
    ]
    model = _model("llama", "sdpa", vocab_size=len(tok))
    want = paired_logps(model, PreferenceCollator(tok.pad_token_id)(items))
    prepare_model(model)
    got = paired_logps(model, PreferenceCollator(tok.pad_token_id, padding_free=True)(items))
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=0)
    assert want.chosen_tokens[1] == 1  # the empty response: its end of turn alone
    unpaired = [
        {"prompt_ids": c[i][0], "completion_ids": side[i][1], "desirable": d, "index": i, "id": i}
        for i, (side, d) in enumerate([(c, True), (r, False)])
    ] + [{"prompt_ids": c[1][0], "completion_ids": c[1][1], "desirable": True, "index": 2, "id": 2}]
    want = unpaired_logps(model, UnpairedCollator(tok.pad_token_id)(unpaired))
    got = unpaired_logps(model, UnpairedCollator(tok.pad_token_id, padding_free=True)(unpaired))
    for name in ("completion", "tokens", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=0)


def test_what_cannot_pack_is_refused():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gemma = _model("gemma", "eager")  # not among the types whose packing the tests check
    with pytest.raises(ConfigError, match="model type 'gemma' is not one whose packed"):
        prepare_model(gemma, what="policy")
    AttentionInterface.register("my_attention", sdpa_attention_forward)
    model = _model("llama", "my_attention")
    with pytest.raises(ConfigError, match="attn_implementation='my_attention' .the reference's"):
        prepare_model(model, what="reference")
    # a model of a checked type running its own code (trust_remote_code) is not checked code
    from transformers import LlamaForCausalLM

    class RemoteLlama(LlamaForCausalLM):
        pass

    remote = RemoteLlama(_config("llama"))
    with pytest.raises(
        ConfigError, match="runs its own code .test_packing., not transformers. llama"
    ):
        prepare_model(remote, what="policy")
    with pytest.raises(ValueError, match="no attention mask"):
        completion_logps(_model("llama", "sdpa"), **{**pack(_examples()), "attention_mask": 1})


def _rows(run) -> list[dict]:
    import csv

    return [r for r in csv.DictReader(open(run.out / "metrics.csv")) if r.get("train/loss")]


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=dpo", "model.gradient_checkpointing=true"],
        ["loss=dpo", "reference.precompute=true"],
        ["loss=kto"],
        ["loss=dpo", "model.lora.enabled=true", "model.lr=1e-2"],
        ["loss=dpo", "algo=online", "algo.samples_per_prompt=2"],
    ],
    ids=["dpo-live", "dpo-precomputed", "kto", "dpo-lora", "online"],
)
def test_a_padding_free_run_trains_like_the_padded_one(tmp_path, overrides):
    """Two optimizer steps on the embedded task, padded and packed: the same losses and metrics,
    step by step, and the same probe scores (the probe is packed too). Online: the same samples
    (generation is seeded and unpacked), trained on as packed pairs."""
    from tests.conftest import make_cfg

    common = [
        *overrides,
        *("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1"),
        *("probe.every_n_steps=1", "eval.num_prompts=0", "logger=csv"),
    ]
    # the packed run's probe also runs in several batches (dataset.eval_batch_size=5 of 16)
    runs = []
    for extra in ([], ["dataset.padding_free=true", "dataset.eval_batch_size=5"]):
        name = "packed" if extra else "padded"
        if "reference.precompute=true" in overrides:  # its own file, not the session's cache
            extra = [*extra, f"reference.cache_path={tmp_path / name}.safetensors"]
        run = build(make_cfg(tmp_path / name, *common, *extra))
        run.trainer.fit(run.module, datamodule=run.datamodule)
        runs.append(run)
    # packing was on where it should be (the comparison alone would pass with it off)
    dm, module = runs[1].datamodule, runs[1].module
    batch = next(iter(dm.train_dataloader()))
    assert "cu_seq_lens" in batch and "attention_mask" not in batch
    assert len(dm.probe_batches()) == 4 and "cu_seq_lens" in dm.probe_batches()[0]
    policy = module.policy
    policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    assert policy.config._attn_implementation == SDPA_VARLEN
    reference = getattr(module.reference, "model", None)
    if reference is not None and not hasattr(reference, "peft"):  # a live copy (LoRA: the base)
        assert reference.config._attn_implementation == SDPA_VARLEN
    if module.online is not None:
        assert module.online.collate.padding_free
    padded, packed = (_rows(r) for r in runs)
    assert len(padded) == len(packed) == 2
    # step 0 is scored before any update: equal to fp32 noise; after it, Adam's first update
    # (≈ lr·sign(g) per weight) turns that noise into small differences
    for (a, b), tol in zip(zip(padded, packed, strict=True), (1e-5, 5e-3), strict=True):
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), abs=tol), key
    import csv  # the probe: paired held-out pairs of the task, also under KTO

    start = [
        [r for r in csv.DictReader(open(run.out / "probe.csv")) if r["step"] == "0"] for run in runs
    ]
    assert len(start[0]) == len(start[1]) == 16
    for a, b in zip(*start, strict=True):
        assert (a["chosen_tokens"], a["rejected_tokens"]) == (
            b["chosen_tokens"],
            b["rejected_tokens"],
        )
        for key in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                    "reference_rejected_logps"):  # fmt: skip
            assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-5), key
    probe = next(c for c in runs[1].trainer.callbacks if hasattr(c, "last_metrics"))
    assert probe.last_metrics["probe/seconds"] > 0
    assert 0 < probe.last_metrics["probe/time_share"] < 1


@pytest.mark.parametrize("lean", [True, False])
def test_shared_prefix_and_wpo_weights_by_hand_padded_and_packed(lean):
    """LD-DPO's shared-length prefix sums and WPO's aligned log-weights, from the lean (chunked)
    and the naive path, padded and packed, equal a per-token loop over the full logits."""
    model = _model("llama", "eager")
    examples = _examples(1)
    n = len(examples)
    first = torch.tensor([min(len(c), 3) for _, c in examples])  # ≤ 3 tokens of each, some fewer
    want_prefix, want_aligned = [], []
    with torch.no_grad():
        for (p, c), k in zip(examples, first.tolist(), strict=True):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
            lp = logits.log_softmax(-1)[len(p) - 1 : len(p) + len(c) - 1]  # (|c|, V)
            tok = lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            want_prefix.append(tok[:k].sum())
            want_aligned.append((tok - torch.logsumexp(2 * lp, -1)).mean())  # log p − log Σ p²
    padded = completion_logps(
        model, **pad_sequences(examples, pad_id=0), first=first, aligned=True, lean=lean,
        chunk_size=7,
    )  # fmt: skip
    prepare_model(model)
    packed = completion_logps(
        model, attention_mask=None, **pack(examples), first=first, aligned=True, lean=lean
    )
    for out in (padded, packed):
        assert len(out) == 4 and out[2].shape == (n,)
        torch.testing.assert_close(out[2], torch.stack(want_prefix), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[3], torch.stack(want_aligned), atol=1e-5, rtol=0)
        assert not out[3].requires_grad


def test_paired_logps_share_the_shorter_length():
    """paired_logps cuts both completions of a pair at the shorter one's length."""
    model = _model("llama", "eager")
    (p1, c1), (p2, c2) = ([1, 5, 6], [7, 8, 9, 10, 2]), ([1, 11], [12, 2])
    rows = [(p1, c1), (p2, c2), (p1, c1[:2]), (p2, c2 + [13, 14, 2])]  # chosen ×2, rejected ×2
    out = paired_logps(model, pad_sequences(rows, pad_id=0))
    first = torch.tensor([2, 2, 2, 2])  # pair 1: 5 vs 2 tokens; pair 2: 2 vs 5 tokens
    want = completion_logps(model, **pad_sequences(rows, pad_id=0), first=first)[2]
    torch.testing.assert_close(out.chosen_shared, want[:2])
    torch.testing.assert_close(out.rejected_shared, want[2:])
    torch.testing.assert_close(out.rejected_shared[0], out.rejected[0])  # the shorter one: whole
    assert out.chosen_aligned is None  # only computed when asked
