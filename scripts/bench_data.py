"""Data-path throughput: read + normalize, tokenize (cold), tokenize (cache hit).

    python scripts/bench_data.py                 # 50,000 synthetic rows, byte-level BPE (8k vocab)
    python scripts/bench_data.py --rows 5000

Writes a synthetic hh-rlhf-sized jsonl (prompt ≈ 40 words, responses ≈ 60 words) and trains a
byte-level BPE tokenizer on part of it, so nothing is downloaded. The cache lives in a temporary
directory, so the first tokenization is always cold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dpo_lab_bench_"))
    os.environ["DPO_LAB_CACHE"] = str(tmp / "cache")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dpo_lab.data.datamodule import tokenize_cached
    from dpo_lab.data.formats import prepare
    from dpo_lab.data.sources import from_file

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    path = tmp / "prefs.jsonl"
    with open(path, "w") as f:
        for _ in range(args.rows):
            row = {
                "prompt": text(rng.randint(20, 60)),
                "chosen": text(rng.randint(30, 90)),
                "rejected": text(rng.randint(30, 90)),
            }
            f.write(json.dumps(row) + "\n")

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<pad>", "<eos>"], show_progress=False
    )
    t.train_from_iterator((text(60) for _ in range(5000)), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")

    t0 = time.perf_counter()
    data = prepare(from_file(path=str(path), val_size=0.01))
    t_read = time.perf_counter() - t0
    kw = dict(max_length=512, max_prompt_length=256)
    t0 = time.perf_counter()
    items, counts, hit = tokenize_cached(data.train, tok, **kw)
    t_cold = time.perf_counter() - t0
    assert not hit
    t0 = time.perf_counter()
    again, _, hit = tokenize_cached(data.train, tok, **kw)
    t_warm = time.perf_counter() - t0
    assert hit and again == items
    n = len(data.train)
    tokens = sum(
        len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items
    )
    dropped = counts["too_long"]
    print(f"rows: {n} train pairs ({dropped} dropped as too long), {tokens / n:.0f} tokens a pair")
    print(f"{'step':<34}{'seconds':>9}{'rows/s':>11}")
    for name, sec in (
        ("read + normalize (jsonl)", t_read),
        ("tokenize, cold (incl. cache write)", t_cold),
        ("tokenize, cache hit", t_warm),
    ):
        print(f"{name:<34}{sec:>9.2f}{n / sec:>11.0f}")
    print(f"cache hit is {t_cold / t_warm:.1f}x faster than tokenizing")


if __name__ == "__main__":
    main()
