"""A real pretrained LM: SmolLM2-135M-Instruct, converted offline from the ``real`` extra's GGUF.

Its real 49k byte-level BPE tokenizer, ChatML template and tied embeddings, through the same code
paths as any hub model. The conversion runs once per test session (the session's cache dir);
every test here is skipped, with the install line as the reason, where the extra is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real

PROMPTS = [
    [{"role": "user", "content": "Write a one-sentence review of the movie Moonrise."}],
    [
        {"role": "system", "content": "You are a terse critic."},
        {"role": "user", "content": "Review Starfall."},
        {"role": "assistant", "content": "Dull."},
        {"role": "user", "content": "Why?  Say more,\nplease."},
    ],
]
RESPONSES = [
    "A stunning, gripping film!",
    "",  # an empty response: the end-of-turn token alone
    " leading space and trailing spaces  ",
    "Ünïcödé 🎬 émojis\nand\n\nnewlines",
    "x" * 300,  # long: many merges
]


@pytest.fixture(scope="session")
def smollm2():
    """The converted model in the session's cache dir, removed at the end (540 MB: pytest keeps
    its last three base temp dirs)."""
    import shutil

    from dpo_lab import pretrained

    if importlib.util.find_spec(pretrained.PACKAGE) is None or not importlib.util.find_spec("gguf"):
        pytest.skip(f"the real extra is not installed ({pretrained.INSTALL})")
    path = pretrained.smollm2_dir(verbose=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def loaded(smollm2):
    from dpo_lab.models import load_model

    return load_model(str(smollm2))


def test_the_conversion_is_a_plain_cached_model(smollm2, loaded, monkeypatch):
    from dpo_lab import pretrained

    tokenizer, model = loaded
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert type(model).__name__ == "LlamaForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 134.5) < 0.1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("converted twice"))
    assert pretrained.smollm2_dir(verbose=False) == smollm2  # the file's hash finds the cache


def test_chat_rows_split_exactly_and_end_at_the_end_of_turn(loaded):
    """Prompt and completion tokenized apart equal the whole conversation tokenized at once (no
    merge across the boundary), the completion decodes back to the response exactly, and it ends
    with ``<|im_end|>``, the token generation stops at (not the newline the template adds)."""
    from dpo_lab.data.collate import encode_example

    tokenizer, _ = loaded
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for prompt in PROMPTS:
        for response in RESPONSES:
            turn = [{"role": "assistant", "content": response}]
            p, c = encode_example(tokenizer, prompt, turn)
            full = tokenizer.apply_chat_template(prompt + turn, tokenize=False)
            whole = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert p + c == whole[: len(p) + len(c)], response
            assert tokenizer.convert_ids_to_tokens(whole[len(p) + len(c) :]) == ["Ċ"]
            assert c[-1] == eot and eot not in c[:-1]
            assert tokenizer.decode(c[:-1]) == response
            assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")


def test_generation_stops_at_im_end(loaded):
    from dpo_lab.sampling import generate, stop_token_ids

    tokenizer, model = loaded
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot in stop_token_ids(model, tokenizer)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    torch.manual_seed(0)
    gens = generate(model, tokenizer, [prompt] * 2, max_new_tokens=24, temperature=0.05)
    assert gens.capped == [False, False]
    for ids, text in zip(gens.completion_ids, gens.texts, strict=True):
        assert ids[-1] == eot and eot not in ids[:-1]
        assert "Paris" in text and "<|im_end|>" not in text


def test_lean_and_packed_logps_equal_the_naive_path(loaded):
    """The LM head on completion positions only, and the packed layout, against the full logits'
    log-softmax, on chat pairs of very different lengths (an empty response among them)."""
    from dpo_lab.data.collate import encode_example, pad_sequences
    from dpo_lab.logps import completion_logps
    from dpo_lab.packing import pack, prepare_model

    tokenizer, model = loaded
    examples = [
        encode_example(tokenizer, prompt, [{"role": "assistant", "content": r}])
        for prompt in PROMPTS
        for r in RESPONSES[:4]
    ]
    batch = pad_sequences(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        lean, n = completion_logps(model, **batch)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        tok = torch.gather(logp, 2, batch["input_ids"][:, 1:, None]).squeeze(2)
        mask = batch["completion_mask"][:, 1:].float()
        naive = (tok * mask).sum(1)
        assert torch.equal(n, mask.sum(1).long())
        assert torch.allclose(lean, naive, atol=2e-3, rtol=1e-5), (lean - naive).abs().max()
        packed_model = copy.deepcopy(model)  # the switch to packed attention is in place
        prepare_model(packed_model, what="model")
        packed, _ = completion_logps(packed_model, attention_mask=None, **pack(examples))
    assert torch.allclose(packed, lean, atol=2e-3, rtol=1e-5), (packed - lean).abs().max()


def chat_pairs(path: Path, n: int, movies=("Moonrise", "Starfall", "Ironclad", "Daybreak")) -> Path:
    """Conversational preference pairs: a glowing and a scathing one-line review per prompt."""
    rows = []
    for i in range(n):
        m = movies[i % len(movies)]
        prompt = [{"role": "user", "content": f"Review the movie {m} in one sentence."}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"{m} is a wonderful, moving film."}],
                "rejected": [{"role": "assistant", "content": f"{m} is a dull, tedious mess."}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


HELD_OUT_MOVIES = ("Wildfire", "Riverbend")


def real_cfg(cfg_factory, tmp_path: Path, *overrides: str):
    pairs = chat_pairs(tmp_path / "pairs.jsonl", 12)
    held_out = chat_pairs(tmp_path / "held_out.jsonl", 4, HELD_OUT_MOVIES)
    return cfg_factory(
        "model=smollm2_135m_offline",
        "dataset=local",
        f"dataset.path={pairs}",
        f"dataset.val_path={held_out}",
        "dataset.batch_size=4",
        "dataset.eval_batch_size=12",
        "probe.size=4",
        "eval.num_prompts=2",
        "eval.samples_per_prompt=1",
        "eval.max_new_tokens=8",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "optim.scheduler=null",
        *overrides,
        small=False,
    )


def train(cfg, check=None):
    """``dpo_lab.train.train``, with ``check(module)`` on the built module before it trains;
    returns the run (its trained module) and the summary."""
    import time

    from dpo_lab import train as t

    t0 = time.time()
    run = t.build(cfg)
    if check is not None:
        check(run.module)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    for cb in run.trainer.callbacks:
        if isinstance(cb, t.SaveFinalState):
            cb.save_after_fit(run.trainer)
    return run, t.finish(run, t0)


def pair_margins(model, tokenizer, path: Path) -> torch.Tensor:
    """log π(chosen) − log π(rejected) of each pair in ``path``."""
    from dpo_lab.data.collate import encode_example, pad_sequences
    from dpo_lab.logps import completion_logps

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = []
    for side in ("chosen", "rejected"):
        ex = [encode_example(tokenizer, r["prompt"], r[side]) for r in rows]
        with torch.no_grad():
            out.append(completion_logps(model, **pad_sequences(ex, tokenizer.pad_token_id))[0])
    return out[0] - out[1]


def gains(model, base, tokenizer, cfg) -> torch.Tensor:
    """Each pair's margin gain over ``base``, on the training pairs and the held-out movies."""
    files = (Path(cfg.dataset.path), Path(cfg.dataset.val_path))
    return torch.cat(
        [pair_margins(model, tokenizer, f) - pair_margins(base, tokenizer, f) for f in files]
    )


@pytest.mark.slow
def test_dpo_steps_on_bf16_weights_with_fp32_master_copy(smollm2, loaded, cfg_factory, tmp_path):
    """model.dtype=bfloat16: the reference stays bf16, the trained weights are an fp32 copy (tied
    embeddings one fp32 Parameter); three DPO steps raise the chosen-over-rejected margin of
    every pair, the held-out movies' too, against the bf16-rounded start; final/ reloads tied
    and equal to the trained policy."""
    from transformers import AutoModelForCausalLM

    tokenizer, base = loaded
    cfg = real_cfg(cfg_factory, tmp_path, "model.dtype=bfloat16", "model.lr=2e-5")
    seen = {}

    def check_dtypes(module):
        policy, ref = module.policy, module.reference.model
        seen["policy"] = {p.dtype for p in policy.parameters()}
        seen["reference"] = {p.dtype for p in ref.parameters()}
        seen["tied"] = policy.lm_head.weight is policy.model.embed_tokens.weight
        seen["ref_tied"] = ref.lm_head.weight is ref.model.embed_tokens.weight

    run, summary = train(cfg, check_dtypes)
    assert seen == {
        "policy": {torch.float32},
        "reference": {torch.bfloat16},
        "tied": True,
        "ref_tied": True,
    }
    assert summary["steps"] == 3
    final = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "final")
    assert final.lm_head.weight is final.model.embed_tokens.weight
    trained = run.module.policy.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in final.state_dict().items())
    start = copy.deepcopy(base).to(torch.bfloat16).float()  # where the fp32 copy began
    gained = gains(final, start, tokenizer, cfg)
    assert (gained > 0).all(), gained


@pytest.mark.slow
def test_lora_on_the_real_model_keeps_the_embeddings_tied(smollm2, loaded, cfg_factory, tmp_path):
    """LoRA adapters on every linear layer but the (tied) LM head; the merged save reloads with
    its embeddings still tied, and its margins moved the right way, held-out movies' too."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tokenizer, base = loaded
    cfg = real_cfg(
        cfg_factory,
        tmp_path,
        "model.lora.enabled=true",
        "model.lora.merge_on_save=true",
        "model.lr=2e-3",
    )
    train(cfg)
    final = Path(cfg.output_dir) / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert not any("lm_head" in k or "embed_tokens" in k for k in adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    gained = gains(merged, base, tokenizer, cfg)
    assert (gained > 0).all(), gained
