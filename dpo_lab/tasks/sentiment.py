"""The embedded default: a synthetic controlled-sentiment task (after the DPO paper's IMDb study).

A seeded grammar writes short movie reviews. A prompt names a movie and opens a sentence
("i watched moonrise and it was"); a completion is one to three clauses built from positive,
negative and neutral adjectives, nouns, intensifiers and an occasional "not". The ground-truth
reward is a lexicon score (``reward``), so any policy's quality is known exactly.

``build`` makes, once per config and caches in the user cache dir:

1. a word-level tokenizer (``tokenizers``), wrapped as a transformers fast tokenizer;
2. the SFT base: a small ``LlamaForCausalLM`` trained on the grammar's reviews, whose latent
   sentiment is mixed, so the base writes good and bad reviews alike;
3. preference pairs as in the DPO paper: two completions per prompt sampled from the SFT base,
   labelled by a Bradley-Terry draw on the true reward (so labels are realistically noisy), with a
   held-out split on prompts disjoint from the training prompts (``prompt_split``). Pairs whose
   two samples are identical, where a sample is empty (EOS first), or where a sample hit the
   length cap unfinished, are dropped and counted in ``meta.json``.

The SFT base is ``model=tiny`` and the pairs are ``dataset=sentiment``; both load through the
same ``from_pretrained`` and jsonl paths as real models and data sets.

The default settings' build ships with the package (``shipped/``, 0.6 MB, pinned by a sha256 in
``SHIPPED``), because a build is deterministic on one machine but not across CPUs: floating-point
differences in the SFT training give other weights, other samples and other labels. The default
task is therefore installed from those files, byte for byte, on every machine; any other settings
are built. ``python -m dpo_lab.tasks.sentiment --ship`` rebuilds the default and rewrites
``shipped/``, printing the hash to pin.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dpo_lab.cache import build_into, cache_root, settings_key
from dpo_lab.data.sources import PreferenceData

BUILD_VERSION = 3  # bump when the grammar, reward or build procedure changes: new cache key

MOVIES = (
    "moonrise starfall ironclad daybreak nightfall riverbend wildfire stonegate "
    "bluewater redshift farland highgarden coldharbor brightwood duskfall northwind "
    "ashgrove blackmoor copperhill dawnbreak emberfall frostvale goldcrest hollowmere "
    "ivorytower jadecliff kingsreach lakeshade mistwood oakhaven pinecrest quicksilver "
    "ravenholm silverlake thornfield umberton valewind westmarch yellowstone zephyrine "
    "amberlight birchwood cinderhall driftwood eastwatch fernhollow greywater harborlight"
).split()
OPENINGS = (
    "{m} was",
    "i watched {m} and it was",
    "the new film {m} is",
    "my review of {m} :",
    "honestly , {m} felt",
    "we saw {m} last night and it was",
    "after seeing {m} i thought it was",
    "in short , {m} is",
)
HELD_OUT_PROMPTS = 128  # of the grammar's len(OPENINGS) × len(MOVIES) = 384 prompts
POSITIVE = (
    "great wonderful brilliant moving delightful superb charming gripping beautiful "
    "clever fun stunning"
).split()
NEGATIVE = (
    "awful boring dull terrible clumsy bland tedious messy weak silly lifeless painful".split()
)
NEUTRAL = "long short quiet loud slow fast simple strange modern familiar".split()
NOUNS = "film story plot acting cast ending script music pacing dialogue visuals characters".split()
INTENSIFIERS = "very truly really so".split()
FILLERS = ". , and but a the was with not".split()

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WEIGHT = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}}


def reward(prompt: str, completion: str) -> float:
    """Ground-truth sentiment of a completion, in (−1, 1).

    Each positive adjective counts +1 and each negative −1; an intensifier right before doubles
    it, and "not" within the two words before flips it. The score is Σ w / (Σ |w| + 1), so a
    review's sentiment share matters more than its length. The prompt does not affect the reward
    (it is an argument so the signature fits tasks where it would).
    """
    return word_score(completion.split())


def word_score(words: list[str]) -> float:
    """``reward``'s score of a list of words (see there): words outside the lexicon count 0."""
    total, mass = 0.0, 0.0
    for i, word in enumerate(words):
        w = _WEIGHT.get(word)
        if w is None:
            continue
        if i >= 1 and words[i - 1] in INTENSIFIERS:
            w *= 2.0
        if "not" in words[max(0, i - 2) : i]:
            w = -w
        total += w
        mass += abs(w)
    return total / (mass + 1.0)


def vocabulary() -> list[str]:
    """Every word the grammar can write, specials first (ids 0..3)."""
    words = set(MOVIES) | set(POSITIVE) | set(NEGATIVE) | set(NEUTRAL) | set(NOUNS)
    words |= set(INTENSIFIERS) | set(FILLERS)
    for opening in OPENINGS:
        words |= set(opening.format(m="").split())
    return list(SPECIALS) + sorted(words)


def all_prompts() -> list[str]:
    """Every prompt the grammar can write (openings × movies), in a fixed order."""
    return [o.format(m=m) for o in OPENINGS for m in MOVIES]


def prompt_split(seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a seeded, disjoint split of ``all_prompts()``.

    Training pairs are asked only on the first; held-out pairs, the probe and the end-of-run
    evaluation only on the other ``HELD_OUT_PROMPTS``, so evaluation measures generalization to
    prompts DPO never trained on. (The SFT base, the starting model, saw the whole grammar, as a
    pretrained model would.)
    """
    prompts = all_prompts()
    random.Random(f"prompt-split-{seed}").shuffle(prompts)
    return prompts[HELD_OUT_PROMPTS:], prompts[:HELD_OUT_PROMPTS]


def sample_prompt(rng: random.Random) -> str:
    return rng.choice(OPENINGS).format(m=rng.choice(MOVIES))


def sample_completion(rng: random.Random, p_positive: float) -> str:
    """A review of 1–3 clauses; each sentiment adjective is positive with probability p."""

    def adjective() -> str:
        words = []
        if rng.random() < 0.1:
            words.append("not")
        if rng.random() < 0.3:
            words.append(rng.choice(INTENSIFIERS))
        if rng.random() < 0.25:
            words.append(rng.choice(NEUTRAL))
        else:
            words.append(rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE))
        return " ".join(words)

    def clause() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return adjective()
        if kind == 1:
            return f"a {adjective()} {rng.choice(NOUNS)}"
        if kind == 2:
            return f"the {rng.choice(NOUNS)} was {adjective()}"
        return f"with {adjective()} {rng.choice(NOUNS)}"

    parts = [clause()]
    for _ in range(rng.choice((0, 1, 1, 2))):
        parts += [rng.choice(("and", "but", ",", ".")), clause()]
    return " ".join(parts) + " ."


def sample_review(rng: random.Random) -> tuple[str, str]:
    """(prompt, completion) from the SFT corpus distribution: mixed latent sentiment."""
    p_positive = rng.choice((0.1, 0.3, 0.5, 0.7, 0.9))
    return sample_prompt(rng), sample_completion(rng, p_positive)


def build_tokenizer():
    """A word-level fast tokenizer over ``vocabulary()``: BOS prepended, EOS/PAD defined."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def _sft_train(model, tokenizer, rng: random.Random, *, n_sft, steps, batch_size, lr) -> list:
    """Train the base on completions given prompts (per-token NLL); returns the loss curve."""
    from dpo_lab.data.collate import encode_batch, pad_sequences
    from dpo_lab.logps import completion_logps

    reviews = [sample_review(rng) for _ in range(n_sft)]
    corpus = encode_batch(tokenizer, [p for p, _ in reviews], [c for _, c in reviews])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
        ),
    )
    model.train()
    curve = []
    for step in range(steps):
        batch = pad_sequences(rng.sample(corpus, batch_size), tokenizer.pad_token_id)
        logps, tokens = completion_logps(model, **batch)
        loss = -logps.sum() / tokens.sum()  # token-weighted NLL of completions
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, round(loss.item(), 4)))
    model.eval()
    return curve


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size=256
):
    """One sampled completion (temperature 1, full vocabulary) per prompt: ``Generations``
    (decoded ``texts``; ``capped`` marks samples that hit ``max_new_tokens`` unfinished)."""
    from dpo_lab.sampling import generate

    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _make_pairs(
    model, tokenizer, rng, n, *, prompts, max_new_tokens, bt_temperature, length_bias, split
):
    """``n`` labelled pairs on ``prompts``: drawn at random (``split="train"``) or taken in turn
    (held out: every held-out prompt gets its share of pairs)."""
    rows, dropped = [], {"identical": 0, "empty": 0, "capped": 0}
    turn = 0
    while len(rows) < n:
        m = int((n - len(rows)) * 1.2) + 8
        if split == "train":
            asked = [rng.choice(prompts) for _ in range(m)]
        else:
            asked = [prompts[(turn + i) % len(prompts)] for i in range(m)]
        a = sample_completions(model, tokenizer, asked, max_new_tokens=max_new_tokens)
        b = sample_completions(model, tokenizer, asked, max_new_tokens=max_new_tokens)
        for i, (prompt, ya, yb) in enumerate(zip(asked, a.texts, b.texts, strict=True)):
            if len(rows) == n:
                break
            turn += 1
            if a.capped[i] or b.capped[i]:  # unfinished at the cap: not a response to rank
                dropped["capped"] += 1
                continue
            if not ya or not yb:  # the base stopped at once: no response to compare
                dropped["empty"] += 1
                continue
            if ya == yb:
                dropped["identical"] += 1
                continue
            ra, rb = reward(prompt, ya), reward(prompt, yb)
            logit = (ra - rb) / bt_temperature  # Bradley-Terry on the true reward ...
            if length_bias:  # ... plus a rater's taste for length that the reward does not share
                logit += length_bias * (len(ya.split()) - len(yb.split()))
            p_a = 1.0 / (1.0 + math.exp(-logit))
            a_wins = rng.random() < p_a
            chosen, rejected = (ya, yb) if a_wins else (yb, ya)
            rc, rr = (ra, rb) if a_wins else (rb, ra)
            rows.append(
                {
                    "id": f"{split}-{len(rows):06d}",
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "reward_chosen": round(rc, 6),
                    "reward_rejected": round(rr, 6),
                }
            )
    return rows, dropped


def cache_key(settings: dict[str, Any]) -> str:
    return settings_key(BUILD_VERSION, settings)


DEFAULT_GENERATOR = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 256,
    "sft_steps": 600,
    "sft_batch_size": 64,
    "sft_lr": 3e-3,
}


def build(
    *,
    seed: int = 1234,
    n_sft: int = 8000,
    n_train: int = 2000,
    n_val: int = 256,
    max_new_tokens: int = 64,
    bt_temperature: float = 0.25,
    length_bias: float = 0.0,
    generator: dict[str, Any] | None = None,
    verbose: bool = True,
) -> Path:
    """Build (or find) the cached task artifact and return its directory.

    The directory holds ``model/`` (SFT base + tokenizer, ``save_pretrained`` format),
    ``train.jsonl``, ``val.jsonl`` and ``meta.json``. It is keyed by every argument, so a sweep's
    jobs share one build, and written to a temporary directory first and renamed into place, so
    concurrent builders never see a half-written artifact.

    ``length_bias`` > 0 makes the labeller prefer longer completions beyond what the reward
    warrants: the Bradley-Terry logit gains ``length_bias`` per word of length difference (the
    ``length_bias`` study). The reward itself is unchanged.
    """
    settings = _settings(
        seed=seed,
        n_sft=n_sft,
        n_train=n_train,
        n_val=n_val,
        max_new_tokens=max_new_tokens,
        bt_temperature=bt_temperature,
        length_bias=length_bias,
        generator=generator,
    )
    key = cache_key(settings)
    if key in SHIPPED:  # the default task: the same bytes on every machine (see ``install``)
        return install(key, verbose=verbose)
    root = cache_root() / f"sentiment-{key}"
    if (root / "meta.json").exists():
        return root
    # The build seeds torch itself; it must not move the caller's RNG, or a run that builds the
    # task (first use) would continue from another RNG state than one that finds it cached.
    with torch.random.fork_rng(devices=[]):
        return _build(root, settings, verbose=verbose)


def _build(root: Path, settings: dict[str, Any], *, verbose: bool) -> Path:
    seed, n_sft, n_train, n_val = (settings[k] for k in ("seed", "n_sft", "n_train", "n_val"))
    max_new_tokens, bt_temperature = settings["max_new_tokens"], settings["bt_temperature"]
    length_bias, gen = settings.get("length_bias", 0.0), settings["generator"]
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    if verbose:
        print(f"[dpo_lab] building the embedded sentiment task once, into {root}", flush=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=gen["hidden_size"],
        intermediate_size=gen["intermediate_size"],
        num_hidden_layers=gen["num_layers"],
        num_attention_heads=gen["num_heads"],
        num_key_value_heads=gen["num_heads"],
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    curve = _sft_train(
        model,
        tokenizer,
        rng,
        n_sft=n_sft,
        steps=gen["sft_steps"],
        batch_size=gen["sft_batch_size"],
        lr=gen["sft_lr"],
    )
    t_sft = time.time() - t0
    kw = dict(max_new_tokens=max_new_tokens, bt_temperature=bt_temperature, length_bias=length_bias)
    train_prompts, held_out = prompt_split(seed)
    train, drop_train = _make_pairs(
        model, tokenizer, rng, n_train, prompts=train_prompts, split="train", **kw
    )
    val, drop_val = _make_pairs(model, tokenizer, rng, n_val, prompts=held_out, split="val", **kw)

    with build_into(root, "meta.json") as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        for name, rows in (("train", train), ("val", val)):
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        meta = {
            "settings": settings,
            "build_version": BUILD_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "sft_loss_curve": curve,
            "dropped_pairs": {"train": drop_train, "val": drop_val},
            "prompts": {
                "train": len({r["prompt"] for r in train}),
                "val": len({r["prompt"] for r in val}),
                "shared": len({r["prompt"] for r in train} & {r["prompt"] for r in val}),
            },
            "label_agrees_with_reward": {
                name: sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
                for name, rows in (("train", train), ("val", val))
            },
            "chosen_longer": {
                name: sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in rows)
                / len(rows)
                for name, rows in (("train", train), ("val", val))
            },
            "build_seconds": {"sft": round(t_sft, 2), "total": round(time.time() - t0, 2)},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if verbose:
        print(
            f"[dpo_lab] built in {time.time() - t0:.1f}s: {meta['parameters']} params", flush=True
        )
    return root


# The default settings' cache key → sha256 of its files (``artifact_digest``), as built on the
# project's 2-core CPU machine with torch 2.13.0 (2026-11-26) and shipped in ``shipped/``.
SHIPPED = {"5cdb078828c22112": "d1e3c61ade57afc778a62324e59585215ed621ddf0534dee2b304b4622eeba36"}
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
_GZIPPED = (".jsonl",)  # stored gzipped in shipped/ (the weights do not compress)


def artifact_digest(root: Path) -> str:
    """sha256 over every file of a built task (relative path and content), in path order."""
    h = hashlib.sha256()
    for path in _files(root):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def install(key: str, *, verbose: bool = True) -> Path:
    """The shipped build of ``key`` in the cache, unpacked from ``shipped/`` on first use and
    checked against ``SHIPPED``. Its directory name carries the hash, so a build this machine
    made of the same settings before the task shipped is never taken for it."""
    digest = SHIPPED[key]
    root = cache_root() / f"sentiment-{key}-shipped-{digest[:12]}"
    if (root / "meta.json").exists():
        return root
    src = SHIPPED_DIR / f"sentiment-{key}"
    files = _files(src) if src.is_dir() else []
    if not any(p.name == "meta.json" for p in files):
        raise RuntimeError(
            f"the default sentiment task should ship in {src}, which is missing or incomplete; "
            "reinstall dpo_lab (its package data holds it)"
        )
    with build_into(root, "meta.json") as tmp:
        for path in files:
            rel = path.relative_to(src)
            data = path.read_bytes()
            if rel.suffix == ".gz":
                data, rel = gzip.decompress(data), rel.with_suffix("")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        got = artifact_digest(tmp)
        if got != digest:
            raise RuntimeError(
                f"the shipped default task in {src} has sha256 {got[:16]}..., but SHIPPED in "
                f"{__file__} pins {digest[:16]}...: its files are damaged or were regenerated "
                "without pinning the new hash; reinstall dpo_lab, or run "
                "`python -m dpo_lab.tasks.sentiment --ship` and pin the hash it prints"
            )
    if verbose:
        print(f"[dpo_lab] installed the shipped default sentiment task into {root}", flush=True)
    return root


def pack(built: Path, dest: Path) -> str:
    """Write the built task ``built`` into ``dest`` in the shipped layout (jsonl gzipped, with no
    timestamp, so packing is deterministic); returns its ``artifact_digest``."""
    if dest.exists():
        shutil.rmtree(dest)
    for path in _files(built):
        rel = path.relative_to(built)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix in _GZIPPED:
            with open(out.with_name(out.name + ".gz"), "wb") as f:
                f.write(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))
        else:
            shutil.copyfile(path, out)
    return artifact_digest(built)


def ship(dest: Path = SHIPPED_DIR) -> tuple[str, str]:
    """Build the default task from scratch on this machine and pack it into ``dest``; returns
    (cache key, digest to pin in ``SHIPPED``)."""
    import tempfile

    settings = _default_settings()
    key = cache_key(settings)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        built = _build(Path(tmp) / f"sentiment-{key}", settings, verbose=True)
        return key, pack(built, dest / f"sentiment-{key}")


def _settings(
    *, length_bias: float, generator: dict[str, Any] | None, **rest: Any
) -> dict[str, Any]:
    """The settings a build is keyed by: ``build``'s arguments, the generator's keys checked and
    completed from ``DEFAULT_GENERATOR``, ``length_bias`` only where set (so the default task
    keeps its cache key)."""
    gen = dict(DEFAULT_GENERATOR)
    unknown = set(generator or {}) - set(gen)
    if unknown:
        from dpo_lab.errors import ConfigError

        raise ConfigError(
            f"dataset.source.generator: unknown key(s) {sorted(unknown)}; accepted: {sorted(gen)}"
        )
    gen.update(generator or {})
    settings = {**rest, "generator": gen}
    if length_bias:
        settings["length_bias"] = length_bias
    return settings


def _default_settings() -> dict[str, Any]:
    """The settings of ``build()`` with every argument at its default."""
    sig = inspect.signature(build)
    return _settings(**{k: p.default for k, p in sig.parameters.items() if k != "verbose"})


def _files(root: Path) -> list[Path]:
    """Every file under ``root``, in path order."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def binary_feedback(rows: list[dict[str, Any]], *, temperature: float, seed: int) -> list[dict]:
    """Thumbs-up/down rows from pairs: each completion of each pair becomes its own row, rated
    desirable with probability σ(r / T) on its true reward r (a rater judging one response at a
    time, as noisy as the pairwise labeller at the same T). Same prompts and completions as the
    pairs, so KTO on these and DPO on the pairs see the same text."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        for side in ("chosen", "rejected"):
            r = row[f"reward_{side}"]
            out.append(
                {
                    "id": f"{row['id']}-{side}",
                    "prompt": row["prompt"],
                    "completion": row[side],
                    "label": rng.random() < 1.0 / (1.0 + math.exp(-r / temperature)),
                    "reward": r,
                }
            )
    return out


def load(*, feedback: str = "pairs", **settings: Any) -> PreferenceData:
    """The task's data (building the task on first use) and its true reward.

    ``feedback="pairs"``: the Bradley-Terry-labelled pairs. ``feedback="binary"``: the same
    completions as unpaired thumbs-up/down rows (``binary_feedback``), for KTO.
    """
    if feedback not in ("pairs", "binary"):
        from dpo_lab.errors import ConfigError

        raise ConfigError(f"dataset.source.feedback={feedback!r}: expected pairs or binary")
    root = build(**settings)
    train, val = _read_jsonl(root / "train.jsonl"), _read_jsonl(root / "val.jsonl")
    if feedback == "binary":
        t = settings.get("bt_temperature", 0.25)
        seed = settings.get("seed", 1234)
        train = binary_feedback(train, temperature=t, seed=seed)
        val = binary_feedback(val, temperature=t, seed=seed + 1)
    return PreferenceData(train, val, reward_fn=reward)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ship", action="store_true", help="rebuild the default and rewrite shipped/"
    )
    args = parser.parse_args()
    if args.ship:
        key, digest = ship()
        print(f"packed sentiment-{key} into {SHIPPED_DIR}; pin it in SHIPPED: {key!r}: {digest!r}")
