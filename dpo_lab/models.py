"""Load a tokenizer and causal LM from a hub id, a local directory or the embedded task."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpo_lab.errors import ConfigError

log = logging.getLogger("dpo_lab")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# builtin:<task> → the dataset sources built on that task's SFT base
BUILTIN_SOURCES = {
    "sentiment": ("dpo_lab.tasks.sentiment.load", "dpo_lab.tasks.closed_form.load"),
}
# builtin:<name> → a real pretrained model converted from an installed package, any dataset
BUILTIN_MODELS = ("smollm2",)


def resolve_name_or_path(
    name_or_path: str, source_cfg: dict[str, Any], key: str = "model.name_or_path"
) -> str:
    """A ``builtin:<task>`` name becomes the task's built SFT base directory, ``builtin:smollm2``
    the converted SmolLM2 directory (``dpo_lab.pretrained``); others pass through.

    The embedded model is the SFT base of the embedded task, so it is built from the dataset's
    task settings (``dataset.source``) and needs that dataset.
    """
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    task = name_or_path.split(":", 1)[1]
    if task in BUILTIN_MODELS:
        from dpo_lab import pretrained

        return str(pretrained.smollm2_dir(key=f"{key}={name_or_path}"))
    if task not in BUILTIN_SOURCES:
        raise ConfigError(
            f"{key}={name_or_path!r}: unknown builtin; known: "
            + ", ".join(f"builtin:{t}" for t in (*BUILTIN_SOURCES, *BUILTIN_MODELS))
        )
    target = source_cfg.get("_target_")
    if target not in BUILTIN_SOURCES[task]:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is the SFT base of the embedded {task} task and "
            f"needs a dataset built on it (source {' or '.join(BUILTIN_SOURCES[task])}); "
            f"this config's dataset.source._target_ is {target!r}"
        )
    from dpo_lab.tasks import sentiment

    build_keys = set(inspect.signature(sentiment.build).parameters) - {"verbose"}
    kwargs = {k: v for k, v in source_cfg.items() if k in build_keys}
    return str(sentiment.build(**kwargs) / "model")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(tokenizer, model) through ``Auto*.from_pretrained``, with one-line errors for user mistakes.

    A tokenizer without a pad token gets its EOS token as pad (padding is always masked).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its loading/writing bars are noise in a run's output
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no such model directory")
    if looks_local and not (path / "config.json").exists():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: directory has no config.json "
            "(expected a save_pretrained model)"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path) if looks_local else name_or_path, **kwargs
        )
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if looks_local else name_or_path, dtype=DTYPES[dtype], **kwargs
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: could not load it as a local directory or a hub "
            f"id ({first})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def build_models(
    model_cfg: dict[str, Any],
    reference_cfg: dict[str, Any],
    path: str,
    source_cfg: dict[str, Any],
    *,
    needs_reference: bool,
) -> tuple[Any, Any, Any]:
    """(tokenizer, policy, reference) from ``model.*`` and ``reference.*``.

    The reference is, in order: the model named by ``reference.name_or_path`` (its own dtype
    ``reference.dtype``; it must share the policy's vocabulary); under LoRA, the policy's own base
    with the adapters off (``PeftReference``: one copy of the weights); else a frozen copy of the
    policy's starting weights, cast to ``reference.dtype`` if that is set. None when the loss
    uses no reference.
    """
    from dpo_lab import lora as lora_mod

    lora = model_cfg.get("lora") or {}
    # before any weights load: a misspelt dtype should not cost a large model's load time
    for key, value in (
        ("reference.dtype", reference_cfg.get("dtype")),
        ("model.trainable_dtype", model_cfg.get("trainable_dtype")),
    ):
        if value is not None and value not in DTYPES:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(DTYPES)} or null")
    kw = dict(
        attn_implementation=model_cfg["attn_implementation"],
        trust_remote_code=model_cfg["trust_remote_code"],
    )
    tokenizer, policy = load_model(path, dtype=model_cfg["dtype"], **kw)
    if model_cfg.get("disable_dropout", True):  # before LoRA: its own dropout is its setting
        disable_dropout(policy)
    ref_name, ref_dtype = reference_cfg.get("name_or_path"), reference_cfg.get("dtype")
    if not needs_reference and (ref_name or ref_dtype):
        raise ConfigError(
            "reference.name_or_path / reference.dtype are set, but this loss uses no reference"
        )
    if lora.get("adapter") and not lora.get("enabled"):
        raise ConfigError("model.lora.adapter is set but model.lora.enabled=false")
    reference = None
    if needs_reference and ref_name:
        ref_path = resolve_name_or_path(ref_name, source_cfg, "reference.name_or_path")
        ref_tokenizer, reference = load_model(ref_path, dtype=ref_dtype or model_cfg["dtype"], **kw)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"reference.name_or_path={ref_name!r} has a different vocabulary from the policy "
                f"({model_cfg['name_or_path']!r}); log-probs of the same tokens need the same one"
            )
    elif needs_reference and not lora.get("enabled"):
        reference = copy.deepcopy(policy)
        if ref_dtype is not None and ref_dtype != model_cfg["dtype"]:
            reference.to(DTYPES[ref_dtype])
    elif needs_reference and ref_dtype is not None and ref_dtype != model_cfg["dtype"]:
        raise ConfigError(
            f"reference.dtype={ref_dtype!r} with model.lora.enabled: the reference is the policy's "
            f"own base weights ({model_cfg['dtype']}); name a separate reference.name_or_path "
            "to give it another dtype"
        )
    if lora.get("enabled"):
        own_reference = needs_reference and reference is None
        policy = lora_mod.wrap(policy, lora, reference=own_reference)
        if own_reference:
            reference = lora_mod.PeftReference(policy)
    keep_trainable(policy, model_cfg.get("trainable_dtype"), model_cfg["dtype"])
    if model_cfg.get("gradient_checkpointing"):  # the policy only: the reference keeps none
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, policy, reference


def disable_dropout(model: torch.nn.Module) -> int:
    """Switch off dropout in ``model`` (``model.disable_dropout``, TRL's default); returns how
    many dropout sites it zeroed.

    The reference runs in eval mode, so a policy trained with dropout on is compared with its
    reference under different noise: its log-ratios are noisy even at step 0. Every
    ``nn.Dropout`` gets p = 0, and so does every float attribute named ``*dropout*`` that a
    module applies functionally (attention dropout in Llama, Qwen2, GPT-NeoX, ...). The model's
    config is left as it was, so a saved model keeps its own settings.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p, n = 0.0, n + (module.p > 0)
            continue
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
                n += value > 0
    return n


def keep_trainable(policy: Any, trainable_dtype: str | None, dtype: str) -> None:
    """Hold the policy's trainable parameters in ``trainable_dtype`` (``model.trainable_dtype``).

    Loading a model in bf16 halves the frozen weights' memory, but AdamW steps each parameter in
    its own dtype: near a weight of 0.02, bf16 values are ~1e-4 apart, so updates of ~lr = 1e-6
    round away (10 AdamW steps at lr 1e-6 change 1.4% of a bf16 layer's weights, 100% of an fp32
    one's). So the trained weights are kept in fp32 by default (under LoRA the adapters alone;
    peft already makes them fp32), while ``trainer=gpu``'s bf16-mixed autocast runs the matmuls
    in bf16. The reference, copied before this, keeps ``model.dtype``.
    """
    if trainable_dtype is None:
        if dtype != "float32" and any(p.requires_grad for p in policy.parameters()):
            log.warning(
                "model.trainable_dtype=null with model.dtype=%s: the optimizer updates %s weights "
                "in place, and small updates (lr ~1e-6) round away; model.trainable_dtype=float32 "
                "keeps fp32 master weights",
                dtype,
                dtype,
            )
        return
    for p in policy.parameters():  # tied weights are one Parameter: cast once, still tied
        if p.requires_grad and p.dtype != DTYPES[trainable_dtype]:
            p.data = p.data.to(DTYPES[trainable_dtype])


def save_final(
    policy: Any,
    tokenizer: Any,
    out: Path,
    *,
    merge: bool = False,
    load_base: Callable[[], Any] | None = None,
) -> None:
    """``out``: the trained model (save_pretrained), or under LoRA the trained adapter, plus
    ``out/merged`` (the adapter folded into the base) when ``merge``.

    The merge loads the base afresh with ``load_base`` (on the CPU, as ``from_pretrained`` does)
    and applies the adapter just saved, rather than copying the policy where it trains: a copy on
    the GPU would need a second set of the model's weights there at the end of the run.
    """
    from dpo_lab import lora as lora_mod

    if lora_mod.is_peft(policy):
        policy.save_pretrained(out, selected_adapters=[lora_mod.TRAINED])
        tokenizer.save_pretrained(out)
        if merge:
            from peft import PeftModel

            if load_base is None:
                raise ValueError("merging a LoRA adapter needs load_base (the base model)")
            merged = PeftModel.from_pretrained(load_base(), str(out)).merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        return
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_decoder_layer(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name in ("GPTNeoXLayer", "GPT2Block", "PhiLayer")


def decoder_layer_policy() -> Any:
    """FSDP auto-wrap policy: one unit per transformer layer, whatever the architecture (Llama,
    Qwen2, Mistral, ... ``*DecoderLayer``; GPT-NeoX; GPT-2)."""
    import functools

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_decoder_layer)
