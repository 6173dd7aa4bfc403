"""Data: every accepted layout and source read from files the tests write, bad input named,
the hh-rlhf split, exact prompt/completion boundaries, truncation, the tokenized cache, batching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dpo_lab.data.collate import (
    PreferenceCollator,
    UnpairedCollator,
    encode_example,
    mismatched,
    render,
)
from dpo_lab.data.datamodule import (
    LengthGroupedSampler,
    PreferenceDataModule,
    split_pairs,
    tokenize_cached,
    tokenize_rows,
)
from dpo_lab.data.formats import prepare, split_hh
from dpo_lab.data.sources import PreferenceData, from_file, from_hub, read_file
from dpo_lab.errors import ConfigError, DataError
from dpo_lab.tasks.sentiment import build_tokenizer

ROWS = [
    {"id": "a", "prompt": "moonrise was", "chosen": "great .", "rejected": "a dull film ."},
    {"id": "b", "prompt": "i watched farland and it was", "chosen": "so fun .", "rejected": "weak"},
    {"id": "c", "prompt": "farland was", "chosen": "a truly great film .", "rejected": "awful ."},
    {"id": "d", "prompt": "bluewater was", "chosen": "charming .", "rejected": "bland ."},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained here, with chat special tokens; it merges across
    word boundaries the way real BPE tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    corpus = ["hello world, the weather is nice today", "helloworld worldwide hello"] * 50
    t.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def strip(rows):
    return [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in rows]


# ------------------------------------------------------------------ sources and layouts


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_rows(tmp_path, suffix):
    path = write(tmp_path / f"prefs{suffix}", ROWS)
    val = write(tmp_path / f"val{suffix}", ROWS[:2])
    data = prepare(from_file(path=str(path), val_path=str(val)))
    assert data.kind == "paired"
    assert strip(data.train) == ROWS and strip(data.val) == ROWS[:2]


def test_hub_path_on_a_local_dataset_directory(tmp_path, monkeypatch):
    """``from_hub`` goes through ``datasets.load_dataset``; a local directory needs no network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", ROWS)
    write(d / "test.jsonl", ROWS[:2])
    data = prepare(from_hub(name=str(d), split="train", val_split="test"))
    assert strip(data.train) == ROWS and strip(data.val) == ROWS[:2]
    with pytest.raises(DataError, match=r"split 'nope'.*could not load"):
        from_hub(name=str(d), split="nope")


def test_val_size_split_is_seeded(tmp_path):
    rows = [{**ROWS[0], "id": str(i)} for i in range(40)]
    path = write(tmp_path / "p.jsonl", rows)
    a = from_file(path=str(path), val_size=0.25, seed=1)
    b = from_file(path=str(path), val_size=0.25, seed=1)
    c = from_file(path=str(path), val_size=0.25, seed=2)
    assert len(a.val) == 10 and len(a.train) == 30
    assert [r["id"] for r in a.val] == [r["id"] for r in b.val] != [r["id"] for r in c.val]
    assert {r["id"] for r in a.val}.isdisjoint(r["id"] for r in a.train)
    assert len(from_file(path=str(path), val_size=5).val) == 5


def test_columns_are_remapped(tmp_path):
    theirs = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    path = write(tmp_path / "p.jsonl", theirs)
    data = prepare(
        from_file(path=str(path), val_path=str(path)),
        columns={"prompt": "q", "chosen": "good", "rejected": "bad"},
    )
    assert [r["chosen"] for r in data.train] == [r["chosen"] for r in ROWS]


def test_hh_rlhf_split_by_hand():
    single = (
        "\n\nHuman: What is a good movie?\n\nAssistant: Moonrise is great.",
        "\n\nHuman: What is a good movie?\n\nAssistant: I don't know.",
    )
    assert split_hh(*single) == (
        "\n\nHuman: What is a good movie?\n\nAssistant:",
        " Moonrise is great.",
        " I don't know.",
    )
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Recommend a film?\n\nAssistant:"
    multi = (history + " Try Farland.", history + " No.")
    assert split_hh(*multi) == (history, " Try Farland.", " No.")
    # the responses share a prefix that itself contains "Assistant:"-like text only partly
    tricky = (history + " Sure\n\nAssistant: x", history + " Sure\n\nAssist no")
    assert split_hh(*tricky)[0] == history


def test_hh_rows_that_cannot_split_are_reported(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"chosen": "no turns here", "rejected": "nothing shared"},
    ]
    path = write(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh.jsonl line 2: no shared 'Assistant:' turn"):
        prepare(from_file(path=str(path), val_path=str(path)))
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        data = prepare(from_file(path=str(path), val_path=str(path)), on_bad_row="skip")
    assert data.stats["skipped_bad_rows/train"] == 1
    assert data.train[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:"


def test_an_empty_response_is_kept_and_counted(tmp_path, tok, bpe):
    """As in the real hh-rlhf harmless-base test split (4 of 2,312 rows): an empty final
    response is data, trained as the end token alone (TRL does the same), and counted."""
    empty = {
        "chosen": "\n\nHuman: was it good?\n\nAssistant:",
        "rejected": "\n\nHuman: was it good?\n\nAssistant: it was great .",
    }
    full = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    path = write(tmp_path / "hh.jsonl", [full, empty])
    data = prepare(from_file(path=str(path), val_path=str(path)))  # on_bad_row=error: no error
    assert len(data.train) == 2 and data.stats["empty_responses/train"] == 1
    assert data.train[1]["chosen"] == ""
    for t in (tok, bpe):  # word-level and byte-level BPE: the completion is EOS alone
        items, _ = tokenize_rows(data.train, t, max_length=64, max_prompt_length=64)
        assert items[1]["chosen_ids"] == [t.eos_token_id]
        assert len(items[1]["rejected_ids"]) > 1
    messages = [
        {
            "prompt": [{"role": "user", "content": "hello"}],
            "chosen": [{"role": "assistant", "content": ""}],
            "rejected": [{"role": "assistant", "content": "world"}],
        }
    ]
    data = prepare(PreferenceData(messages, messages))
    assert data.stats["empty_responses/train"] == 1
    items, _ = tokenize_rows(data.train, bpe, max_length=64, max_prompt_length=64)
    assert bpe.decode(items[0]["chosen_ids"]) == "<|end|>"  # the template's end of turn alone


def test_left_truncation_keeps_bos(bpe):
    """A byte-level BPE tokenizer that adds BOS: cutting a long prompt from the left keeps BOS
    in front and counts the cut. A chat prompt is cut plainly: its opening header token is not
    spliced onto the middle of a message."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = bpe.backend_tokenizer.__class__.from_str(bpe.backend_tokenizer.to_str())
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    long = "hello world " * 20
    rows = [{"id": "x", "prompt": long, "chosen": "nice", "rejected": "today"}]
    full, _ = tokenize_rows(rows, with_bos, max_length=512, max_prompt_length=512)
    cut, counts = tokenize_rows(rows, with_bos, max_length=512, max_prompt_length=8)
    assert full[0]["prompt_ids"][0] == bos and len(full[0]["prompt_ids"]) > 8
    assert cut[0]["prompt_ids"] == [bos] + full[0]["prompt_ids"][-7:]
    assert counts["truncated_prompts"] == 1
    conv = [
        {
            "id": "c",
            "prompt": [{"role": "user", "content": long}],
            "chosen": [{"role": "assistant", "content": "nice"}],
            "rejected": [{"role": "assistant", "content": "today"}],
        }
    ]
    conv = prepare(PreferenceData(conv, conv)).train
    full, _ = tokenize_rows(conv, bpe, max_length=512, max_prompt_length=512)
    cut, _ = tokenize_rows(conv, bpe, max_length=512, max_prompt_length=6)
    assert full[0]["prompt_ids"][0] == bpe.convert_tokens_to_ids("<|user|>")
    assert cut[0]["prompt_ids"] == full[0]["prompt_ids"][-6:]
    assert bpe.decode(cut[0]["prompt_ids"][-1:]) == "<|assistant|>"  # the end is kept


def test_conversational_layouts(tmp_path, bpe):
    user = {"role": "user", "content": "hello"}
    ok, bad = {"role": "assistant", "content": "world"}, {"role": "assistant", "content": "the"}
    rows = [
        {"prompt": [user], "chosen": [ok], "rejected": [bad]},  # explicit message prompt
        {
            "prompt": "hello",
            "chosen": [user, ok],
            "rejected": [user, bad],  # UltraFeedback
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        },
    ]
    path = write(tmp_path / "conv.jsonl", rows)
    data = prepare(from_file(path=str(path), val_path=str(path)))
    for r in data.train:
        assert (r["prompt"], r["chosen"], r["rejected"]) == ([user], [ok], [bad])
    assert data.train[1]["score_chosen"] == 8.0  # metadata kept
    prompt_ids, completion_ids = encode_example(bpe, [user], [ok])
    assert bpe.decode(prompt_ids) == "<|user|>hello<|end|><|assistant|>"
    assert bpe.decode(completion_ids) == "world<|end|>"  # the template's end-of-turn stops it


def test_conversational_without_a_chat_template_is_a_clear_error(bpe):
    import copy

    plain = copy.deepcopy(bpe)
    plain.chat_template = None
    with pytest.raises(DataError, match="need a chat template.*model.chat_template"):
        render(plain, [{"role": "user", "content": "hi"}], [])


def test_unpaired_layout_and_labels(tmp_path):
    rows = [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "b", "label": 0},
        {"prompt": "p", "completion": "c", "label": "true"},
    ]
    path = write(tmp_path / "kto.jsonl", rows)
    data = prepare(from_file(path=str(path), val_path=str(path)))
    assert data.kind == "unpaired"
    assert [r["desirable"] for r in data.train] == [True, False, True]
    write(path, [*rows, {"prompt": "p", "completion": "d", "label": "maybe"}])
    with pytest.raises(DataError, match=r"kto.jsonl line 4: 'label' must be a boolean"):
        prepare(from_file(path=str(path), val_path=str(path)))


def test_label_noise_and_max_samples():
    rows = [{**ROWS[0], "id": str(i), "chosen": f"great {i}"} for i in range(20)]
    data = PreferenceData(rows, rows[:2])
    noisy = prepare(data, label_noise=0.25, seed=3)
    flipped = [r for r in noisy.train if r.get("label_flipped")]
    assert len(flipped) == 5 == noisy.stats["label_flipped"]
    assert all(r["rejected"].startswith("great") for r in flipped)
    assert [r["id"] for r in flipped] == [
        r["id"] for r in prepare(data, label_noise=0.25, seed=3).train if r.get("label_flipped")
    ]
    assert len(prepare(data, max_samples=7).train) == 7


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"prompt": "x", "chosen": "y"}',
            r"line 2: missing column\(s\) \['rejected'\]; columns "
            r"present: \['chosen', 'prompt'\]",
        ),
        ('{"prompt": "x", "chosen": null, "rejected": "z"}', r"line 2: missing column.*chosen"),
        ('{"prompt": "", "chosen": "y", "rejected": "z"}', r"line 2: 'prompt' is empty"),
        ('{"prompt": 3, "chosen": "y", "rejected": "z"}', r"line 2: 'prompt' must be a string"),
        ('{"prompt": "x", "chosen": "y", "rejected": ', r"line 2: malformed JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl " + message):
        prepare(from_file(path=str(path), val_path=str(path)))
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        data = prepare(from_file(path=str(path), val_path=str(path)), on_bad_row="skip")
    assert len(data.train) == 2 and data.stats["skipped_bad_rows/train"] == 1


def test_schema_level_errors(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(
        DataError,
        match=r"q\.jsonl line 1: cannot tell the data format from "
        r"columns \['answer', 'question'\].*dataset.columns",
    ):
        prepare(from_file(path=str(path), val_path=str(path)))
    with pytest.raises(DataError, match="does not exist"):
        read_file(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unknown format '\.txt'; expected one of \.jsonl"):
        read_file(tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="dataset.format='yaml'"):
        prepare(PreferenceData(ROWS, ROWS), format="yaml")


def test_identical_pairs_are_counted_and_skipped():
    same = {"id": "s", "prompt": "p", "chosen": "x", "rejected": "x"}
    with pytest.warns(UserWarning, match=r"skipped 1 pair\(s\) whose chosen == rejected"):
        data = prepare(PreferenceData([*ROWS, same], ROWS))
    assert data.stats["skipped_identical/train"] == 1 and len(data.train) == len(ROWS)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="train: no rows left"):
        prepare(PreferenceData([same], ROWS))


# ------------------------------------------------------------------ tokenization


def test_boundary_is_exact_where_bpe_merges_across_it(bpe):
    prompt, completion = "hello wor", "ld"
    joint = bpe(prompt + completion, add_special_tokens=False)["input_ids"]
    p, c = encode_example(bpe, prompt, completion)
    assert c == bpe(completion, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert p + c[:-1] != joint  # the joint tokenization merges across the boundary
    assert bpe.decode(p) + bpe.decode(c[:-1]) == prompt + completion


def test_collated_batch_masks_prompt_and_padding(tok):
    items, counts = tokenize_rows(
        prepare(PreferenceData(ROWS, ROWS)).train, tok, max_length=64, max_prompt_length=32
    )
    assert counts == {"too_long": 0, "truncated_prompts": 0}
    batch = PreferenceCollator(tok.pad_token_id)(items)
    B = len(ROWS)
    assert batch["input_ids"].shape[0] == 2 * B
    for i, it in enumerate(items):  # rows [0, B) chosen, [B, 2B) rejected
        for row, ids in ((i, it["chosen_ids"]), (B + i, it["rejected_ids"])):
            mask = batch["completion_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == ids  # completion + EOS, nothing else
            n = len(it["prompt_ids"]) + len(ids)
            assert batch["attention_mask"][row].sum() == n
            assert batch["input_ids"][row, :n].tolist() == it["prompt_ids"] + ids
            assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_truncation_and_too_long_drops(tok):
    rows = prepare(PreferenceData(ROWS, ROWS)).train
    items, counts = tokenize_rows(rows, tok, max_length=8, max_prompt_length=32)
    # BOS + prompt + longer completion + EOS: a 1+2+4+1=8 fits; b 11; c 10; d 1+2+2+1=6 fits
    assert [it["id"] for it in items] == ["a", "d"] and counts["too_long"] == 2
    full, _ = tokenize_rows(rows[1:2], tok, max_length=64, max_prompt_length=64)
    items, counts = tokenize_rows(rows[1:2], tok, max_length=64, max_prompt_length=3)
    # cut from the left, but BOS stays in front: BOS + the prompt's last two tokens
    assert full[0]["prompt_ids"][0] == tok.bos_token_id and len(full[0]["prompt_ids"]) > 3
    assert items[0]["prompt_ids"] == [tok.bos_token_id] + full[0]["prompt_ids"][-2:]
    assert tok.decode(items[0]["prompt_ids"], skip_special_tokens=True) == "it was"
    assert counts["truncated_prompts"] == 1


def test_unpaired_collator_mismatches_kl_rows(tok):
    items = split_pairs(
        tokenize_rows(
            prepare(PreferenceData(ROWS, ROWS)).train, tok, max_length=64, max_prompt_length=32
        )[0]
    )
    assert [it["desirable"] for it in items] == [True, False] * len(ROWS)
    batch = UnpairedCollator(tok.pad_token_id)(items)  # in split order, as validation serves it
    B = len(items)
    for i in range(B):
        kl_completion = batch["kl_input_ids"][i][batch["kl_completion_mask"][i].bool()].tolist()
        # chosen_k, rejected_k, chosen_k+1, ...: item i's KL partner is the next pair's first
        # item, never the other completion of its own prompt (item i ± 1 before the fix)
        partner = items[(i // 2 * 2 + 2) % B]
        assert kl_completion == partner["completion_ids"]
        own = [it["completion_ids"] for it in items if it["prompt_ids"] == items[i]["prompt_ids"]]
        assert kl_completion not in own
        kl_prompt_len = int(batch["kl_attention_mask"][i].sum()) - len(kl_completion)
        assert batch["kl_input_ids"][i, :kl_prompt_len].tolist() == items[i]["prompt_ids"]
    assert batch["desirable"].dtype == torch.bool
    # a batch of one prompt has no mismatch to offer: the next item, as the docstring says
    same = [dict(it, prompt_ids=items[0]["prompt_ids"]) for it in items[:3]]
    assert mismatched(same) == [1, 2, 0]


def test_tokenized_cache_hits_and_keys(tok, monkeypatch):
    rows = prepare(PreferenceData(ROWS, ROWS)).train
    first, d1, hit1 = tokenize_cached(rows, tok, max_length=64, max_prompt_length=32)

    def boom(*a, **k):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr("dpo_lab.data.datamodule.encode_rows", boom)
    again, d2, hit2 = tokenize_cached(rows, tok, max_length=64, max_prompt_length=32)
    assert (hit1, hit2) == (False, True) and again == first and d1 == d2
    monkeypatch.undo()
    _, _, hit3 = tokenize_cached(rows, tok, max_length=9, max_prompt_length=32)
    _, _, hit4 = tokenize_cached(rows[:2], tok, max_length=64, max_prompt_length=32)
    assert not hit3 and not hit4  # other settings, other rows: other keys


def test_length_grouped_sampler():
    lengths = [((i * 37) % 23) + 1 for i in range(100)]
    s = LengthGroupedSampler(lengths, batch_size=4, seed=0, mega=5)
    order = list(s)
    assert sorted(order) == list(range(100))
    for start in range(0, 100, 20):  # sorted (longest first) inside each mega-batch
        chunk = [lengths[i] for i in order[start : start + 20]]
        assert chunk == sorted(chunk, reverse=True)
    s.set_epoch(1)
    assert list(s) != order


def test_unpaired_data_needs_an_unpaired_loss(tok):
    rows = [
        {"prompt": "moonrise was", "completion": "great .", "label": True},
        {"prompt": "moonrise was", "completion": "dull .", "label": False},
    ]
    data = prepare(PreferenceData(rows, rows))
    kw = dict(
        batch_size=2, eval_batch_size=2, max_length=64, max_prompt_length=32, probe_size=2, seed=0
    )
    with pytest.raises(ConfigError, match="unpaired.*loss=kto"):
        PreferenceDataModule(data, tok, **kw)
    dm = PreferenceDataModule(data, tok, unpaired=True, **kw)
    assert dm.probe_items == [] and len(dm.train_items) == 2


@pytest.mark.parametrize("special", [True, False])
def test_backend_fast_path_equals_the_transformers_wrapper(tok, bpe, special):
    from dpo_lab.data.collate import token_ids

    texts = ["moonrise was a truly great film .", "hello wor", "helloworld, the weather"]
    for t in (tok, bpe):
        assert token_ids(t, texts, special) == [
            list(x) for x in t(texts, add_special_tokens=special)["input_ids"]
        ]


@pytest.mark.parametrize(
    "after, ends_at_turn",
    [("\n", True), ("\n\n ", True), ("", True), ("\n<eos>", True), ("d", False)],
    ids=["newline", "whitespace", "nothing", "newline-eos", "text"],
)
def test_a_chat_response_ends_at_the_end_of_turn_token(after, ends_at_turn):
    """ChatML renders ``<|im_end|>\\n`` after a turn (Phi-3 ``<|end|>\\n<|endoftext|>``);
    generation stops at the end-of-turn token, so the scored completion stops there too. Text
    (not whitespace or special tokens) after it is kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dpo_lab.data.collate import encode_example, render

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: "\n" too
        show_progress=False,
    )
    t.train_from_iterator(["hello world, nice day\nnice world"] * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t,
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE.replace("<|end|>", "<|end|>" + after),
    )
    assert tok("\n", add_special_tokens=False)["input_ids"]  # a newline is a token here
    end = tok.convert_tokens_to_ids("<|end|>")
    prompt = [{"role": "user", "content": "hello"}]
    turn = [{"role": "assistant", "content": "nice world"}]
    _, completion, _ = render(tok, prompt, turn)
    _, c = encode_example(tok, prompt, turn)
    if ends_at_turn:
        assert completion == "nice world<|end|>"
        assert c[-1] == end and tok.decode(c[:-1]) == "nice world"
    else:
        assert completion == "nice world<|end|>d" and tok.decode(c).endswith("<|end|>d")
