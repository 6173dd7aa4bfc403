"""Scale: real-model presets (random-init local copies), LoRA with an adapter-disabled reference,
a separately named or differently typed reference, gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from dpo_lab.errors import ConfigError
from dpo_lab.logps import paired_logps
from dpo_lab.lora import PeftReference
from dpo_lab.train import build, finish


def fit(cfg):
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


def probe_logps(run, model):
    batch = run.datamodule.probe_batches()[0]
    with torch.no_grad():
        return paired_logps(model.eval(), batch)


def base_model(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run.model_path).eval()


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lr=5e-3", "eval.num_prompts=4"]


@pytest.mark.slow
def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    cfg = make_cfg(tmp_path / "lora", *LORA, "trainer.max_steps=3", "model.lora.merge_on_save=true")
    run = fit(cfg)
    module, policy = run.module, run.module.policy
    assert isinstance(module.reference.model, PeftReference)
    # one copy of the weights: the reference registers nothing, and every base weight it computes
    # with is the policy's own tensor
    assert not any(k.startswith("reference.") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in policy.parameters()
    )
    ptrs = {p.data_ptr() for p in policy.parameters()}
    assert all(p.data_ptr() in ptrs for p in module.reference.model.parameters())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(
        "lora_" in n
        for group in module.optimizers().param_groups
        for n in [next(k for k, q in policy.named_parameters() if q is group["params"][0])]
    )
    from dpo_lab.logps import _lean_parts

    assert _lean_parts(policy) is not None and _lean_parts(module.reference.model) is not None
    # the reference's log-probs are the frozen base's (loaded afresh), the policy's are not
    ref = probe_logps(run, module.reference.model)
    base = probe_logps(run, base_model(run))
    pol = probe_logps(run, policy)
    torch.testing.assert_close(ref.chosen, base.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.rejected, base.rejected, rtol=0, atol=1e-5)
    assert (pol.chosen - base.chosen).abs().max() > 1e-3
    # the adapter context is left cleanly: the trained adapter is active and trainable again
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable

    summary = finish(run, 0.0)
    final = Path(cfg.output_dir) / "final"
    assert (final / "adapter_config.json").exists() and (
        final / "adapter_model.safetensors"
    ).exists()
    assert not (final / "model.safetensors").exists()  # the adapter, not a second model
    assert "eval/kl" in summary
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    torch.testing.assert_close(probe_logps(run, merged).chosen, pol.chosen, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_lora_continues_an_sft_adapter_that_the_reference_keeps(tmp_path):
    first = make_cfg(tmp_path / "sft", *LORA, "trainer.max_steps=3", "loss=sft", "beta=null")
    run = fit(first)
    finish(run, 0.0)
    adapter = Path(first.output_dir) / "final"
    sft = probe_logps(run, run.module.policy)

    cfg = make_cfg(tmp_path / "dpo", *LORA, "trainer.max_steps=2", f"model.lora.adapter={adapter}")
    run = build(cfg)
    ref0 = probe_logps(run, run.module.reference.model)
    pol0 = probe_logps(run, run.module.policy)
    # both start at the SFT adapter, not at the bare base
    torch.testing.assert_close(ref0.chosen, sft.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(pol0.chosen, sft.chosen, rtol=0, atol=1e-5)
    assert (probe_logps(run, base_model(run)).chosen - sft.chosen).abs().max() > 1e-3
    run.trainer.fit(run.module, datamodule=run.datamodule)
    ref1 = probe_logps(run, run.module.reference.model)
    torch.testing.assert_close(ref1.chosen, sft.chosen, rtol=0, atol=1e-5)  # frozen
    assert (probe_logps(run, run.module.policy).chosen - sft.chosen).abs().max() > 1e-3


def test_lora_config_errors(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match="model.lora.adapter is set but"):
        build(cfg_factory(f"model.lora.adapter={tmp_path}"))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        build(cfg_factory("model.lora.enabled=true", f"model.lora.adapter={tmp_path}"))
    with pytest.raises(ConfigError, match="reference.dtype='bfloat16' with model.lora.enabled"):
        build(cfg_factory("model.lora.enabled=true", "reference.dtype=bfloat16"))
    with pytest.raises(ConfigError, match="uses no reference"):
        build(cfg_factory("loss=simpo", "reference.dtype=bfloat16"))


@pytest.mark.slow
def test_a_bf16_reference_beside_an_fp32_policy(cfg_factory):
    run = fit(cfg_factory("reference.dtype=bfloat16", "trainer.max_steps=2", "eval.num_prompts=0"))
    assert next(run.module.policy.parameters()).dtype == torch.float32
    assert {p.dtype for p in run.module.reference.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])


def _save_random(config, tokenizer, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_named_reference_must_share_the_vocabulary(cfg_factory, tmp_path):
    from transformers import LlamaConfig

    from dpo_lab.tasks.sentiment import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["zzz"])  # one more token: another vocabulary
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    other = _save_random(cfg, tok, tmp_path / "other")
    with pytest.raises(ConfigError, match="different vocabulary"):
        build(cfg_factory(f"reference.name_or_path={other}"))


def _preset_models(tok) -> dict[str, object]:
    """Small random-init configs of each preset's architecture (nothing downloaded)."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return {
        "smollm2_135m": LlamaConfig(
            vocab_size=len(tok), num_key_value_heads=2, tie_word_embeddings=True, **small, **ids
        ),
        "qwen2_5_0_5b": Qwen2Config(
            vocab_size=len(tok), num_key_value_heads=2, tie_word_embeddings=True, **small, **ids
        ),
        "llama3_2_1b": LlamaConfig(
            vocab_size=len(tok), num_key_value_heads=2, tie_word_embeddings=True, **small, **ids
        ),
        "pythia_410m": GPTNeoXConfig(
            vocab_size=len(tok), tie_word_embeddings=False, **small, **ids
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smollm2_135m", "qwen2_5_0_5b", "llama3_2_1b", "pythia_410m"])
def test_model_presets_load_and_train_through_the_hub_path(tmp_path, preset):
    """Each preset's settings with a random-init local copy of its architecture: the same
    from_pretrained path as the hub id; dtype and lr come from the preset."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from dpo_lab.tasks.sentiment import build_tokenizer

    with initialize_config_module("dpo_lab.conf", version_base="1.3"):
        preset_cfg = compose("train", overrides=[f"model={preset}"]).model
    assert "/" in preset_cfg.name_or_path and preset_cfg.dtype == "bfloat16"
    assert preset_cfg.lr <= 1e-5 and preset_cfg.trust_remote_code is False

    tok = build_tokenizer()
    path = _save_random(_preset_models(tok)[preset], tok, tmp_path / preset)
    rows = [
        {"prompt": f"{m} was", "chosen": "a truly great film .", "rejected": "a dull film ."}
        for m in ("moonrise", "farland", "bluewater", "nightfall") * 4
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(
        tmp_path / "run",
        f"model={preset}",
        f"model.name_or_path={path}",
        "model.dtype=float32",  # bf16 matmuls on this CPU would be slow; the preset says bf16
        "dataset=local",
        f"dataset.path={data}",
        "dataset.val_size=4",
        "dataset.batch_size=4",
        "trainer.max_steps=2",
        "eval.num_prompts=2",
        "probe.size=4",
    )
    assert cfg.optim.optimizer.lr == OmegaConf.select(cfg, "model.lr") == preset_cfg.lr
    run = fit(cfg)
    assert type(run.module.policy).__name__ == type(base_model(run)).__name__
    assert run.trainer.global_step == 2


@pytest.mark.slow
def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    """batch b with 2 accumulated micro-batches = batch 2b (same examples, same order)."""
    common = [
        "trainer.max_steps=2",
        "eval.num_prompts=0",
        "optim.scheduler=null",
        "dataset.group_by_length=false",
    ]
    big = fit(make_cfg(tmp_path / "big", "dataset.batch_size=16", *common))
    acc = fit(
        make_cfg(
            tmp_path / "acc", "dataset.batch_size=8", "trainer.accumulate_grad_batches=2", *common
        )
    )
    a, b = big.module.policy.state_dict(), acc.module.policy.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert finish(big, 0.0)["global_batch_size"] == finish(acc, 0.0)["global_batch_size"] == 16


@pytest.mark.slow
def test_lora_with_precomputed_reference_matches_live(tmp_path):
    """The adapter-disabled reference can be scored once and freed, as a full copy can."""
    common = [*LORA, "trainer.max_steps=2", "eval.num_prompts=0", "optim.scheduler=null"]
    live = fit(make_cfg(tmp_path / "live", *common))
    a = {k: v.clone() for k, v in live.module.policy.state_dict().items()}
    pre = fit(make_cfg(tmp_path / "pre", *common, "reference.precompute=true"))
    assert pre.module.reference.model is None  # the cache alone: the scoring model is gone
    record = json.loads((Path(pre.cfg.output_dir) / "reference_cache.json").read_text())
    assert record["reference_weights"] and record["computed"]
    b = pre.module.policy.state_dict()
    lora_keys = [k for k in a if "lora_" in k]
    assert lora_keys
    assert max((a[k] - b[k]).abs().max().item() for k in lora_keys) < 1e-5


def _changed_share(run, start: dict[str, torch.Tensor]) -> float:
    """Share of the policy's non-embedding weights that differ from ``start``."""
    total = changed = 0
    for n, p in run.module.policy.named_parameters():
        if "embed" not in n:  # rows of tokens absent from the batch get no gradient
            total += p.numel()
            changed += int((p.detach() != start[n]).sum())
    return changed / total


@pytest.mark.slow
def test_a_bf16_model_trains_fp32_master_weights(tmp_path):
    """model.dtype=bfloat16 (as the real presets load) with lr 1e-6: AdamW's updates round away
    in bf16 weights, so the trained weights are kept in fp32 (model.trainable_dtype) while the
    reference copy stays bf16. With trainable_dtype=null almost nothing moves."""
    shares = {}
    for trainable in ("float32", "null"):
        cfg = make_cfg(
            tmp_path / trainable,
            "model.dtype=bfloat16",
            f"model.trainable_dtype={trainable}",
            "model.lr=1e-6",
            "optim.scheduler=null",
            "trainer.max_steps=2",
            "eval.num_prompts=0",
        )
        run = build(cfg)
        policy_dtypes = {p.dtype for p in run.module.policy.parameters()}
        assert policy_dtypes == {torch.float32 if trainable == "float32" else torch.bfloat16}
        assert {p.dtype for p in run.module.reference.model.parameters()} == {torch.bfloat16}
        start = {n: p.detach().clone() for n, p in run.module.policy.named_parameters()}
        run.trainer.fit(run.module, datamodule=run.datamodule)
        shares[trainable] = _changed_share(run, start)
    # measured: 1.0 and 0.010 (2 steps); fp32 master weights move every weight
    assert shares["float32"] > 0.99 and shares["null"] < 0.1, shares


def test_lora_on_a_bf16_base_trains_fp32_adapters(cfg_factory):
    run = build(cfg_factory("model.dtype=bfloat16", "model.lora.enabled=true", "model.lora.r=4"))
    params = dict(run.module.policy.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}


def test_dtype_keys_are_checked(cfg_factory):
    with pytest.raises(ConfigError, match="model.trainable_dtype='fp8': expected one of"):
        build(cfg_factory("model.trainable_dtype=fp8"))
    with pytest.raises(ConfigError, match="reference.dtype='bf16': expected one of"):
        build(cfg_factory("reference.dtype=bf16"))
