"""``python -m dpo_lab.train [group=option ...] [key=value ...]``: one preference-optimization run.

``train(cfg)`` is a plain function of a composed config (tests call it directly); ``main`` is the
thin Hydra wrapper that turns user mistakes into one-line errors and returns the swept metric.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dpo_lab import packing, rlhf
from dpo_lab.callbacks import DisplacementProbe
from dpo_lab.data.datamodule import PreferenceDataModule, true_margins
from dpo_lab.data.formats import prepare
from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import ConfigError, DpoLabError
from dpo_lab.evaluation import evaluate
from dpo_lab.faults import (
    AtomicCheckpointIO,
    MetricsRowsAtCheckpoint,
    SaveFinalState,
    SaveOnInterrupt,
    resolve_resume,
)
from dpo_lab.loggers import log_wandb_media
from dpo_lab.lora import PeftReference, is_peft
from dpo_lab.losses import LossSpec
from dpo_lab.losses import resolve as resolve_loss
from dpo_lab.metrics import metric_names
from dpo_lab.models import build_models, load_model, resolve_name_or_path, save_final
from dpo_lab.module import PreferenceModule
from dpo_lab.online import OnlinePairs, TaskRewardJudge
from dpo_lab.refcache import precompute
from dpo_lab.reference import LiveReference
from dpo_lab.sharding import compute_dtype, full_policy_state, shards_parameters

log = logging.getLogger("dpo_lab")


def short_name(text: str, limit: int = 120) -> str:
    """``text`` made a single file name: "/" (from a group path such as ``+arm/x=y``) becomes
    "-", and a name too long for a file system keeps its start and a hash of the whole."""
    import hashlib

    text = text.replace("/", "-")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


# conf/train.yaml names sweep job dirs with it: Hydra's override_dirname alone can pass the
# 255-byte file-name limit once a sweep has a dozen overrides.
if not OmegaConf.has_resolver("dpo_lab_short"):
    OmegaConf.register_new_resolver("dpo_lab_short", short_name)

# Expected here, not a user's concern: the frozen reference is in eval mode during fit, and the
# run dir already holds Hydra's files when the CSV logger starts. Lightning's own deprecation
# of its pytree use and its advertising tips are library noise on every run; real warnings show.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# The RL algos validate nothing (their numbers come from each rollout and the end-of-run
# evaluation), and checkpoint after each batch's updates by design: a resume continues there
warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no")
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
# DeepSpeed clips by trainer.gradient_clip_val itself; the module's hook exists for FSDP's clipping
warnings.filterwarnings("ignore", message=r"Since DeepSpeed handles gradient clipping internally")
# val/* are already reduced over ranks by dpo_lab.metrics; loss/acc are this process's bar values
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(val/|train/|loss'|acc')"
)


class _NoTips(logging.Filter):
    """Lightning's informational lines that say nothing about this run."""

    NOISE = (
        "💡 Tip",  # advertising (litlogger, litmodels)
        "`Trainer(val_check_interval=1.0)` was configured",  # the default, restated
        "Loading `train_dataloader` to estimate number of stepping batches",  # the LR schedule
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.NOISE)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


def check_rlhf_config(cfg: DictConfig) -> None:
    """``algo=reward_model|rloo|ppo``: each has its own objective (``conf/loss/bradley_terry.yaml``,
    ``conf/loss/kl_regularized.yaml``), chosen by the algo, and no preference loss applies."""
    algo, objective = cfg.algo.name, cfg.loss.name
    expected = rlhf.OBJECTIVE.get(algo)
    if expected is None:  # a preference algo: the RLHF objectives are not losses of the registry
        raise ConfigError(
            f"loss={objective} is the objective of algo="
            f"{'reward_model' if objective == 'bradley_terry' else 'rloo or algo=ppo'}, not a "
            f"preference loss for algo={algo}"
        )
    if objective != expected:
        raise ConfigError(
            f"algo={algo} trains with its own objective (loss={expected}), not loss={objective}; "
            "drop the loss= override"
        )
    extra = {k for k, v in cfg.loss.items() if k != "name" and v is not None}
    if extra:
        raise ConfigError(f"loss.{sorted(extra)[0]}: algo={algo} takes no loss settings")
    if algo == "reward_model":
        if cfg.beta is not None:
            raise ConfigError(f"algo=reward_model takes no beta; got beta={cfg.beta!r}")
        if cfg.model.lora.enabled:
            raise ConfigError(
                "algo=reward_model trains the whole model; set model.lora.enabled=false"
            )
        if cfg.dataset.padding_free:
            raise ConfigError(
                "dataset.padding_free: a reward model scores each sequence at its last token, "
                "and algo=reward_model batches are padded; set dataset.padding_free=false"
            )
    else:
        beta = cfg.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ConfigError(f"beta must be a number > 0 for algo={algo}, got {beta!r}")
        if cfg.model.lora.enabled and cfg.model.lora.dropout:
            raise ConfigError(
                f"model.lora.dropout={cfg.model.lora.dropout}: algo={algo} takes its samples' "
                "log-probs, the KL penalty and PPO's ratios from the policy's forward, which "
                "dropout would make noisy (π_old ≠ π at the first update); set "
                "model.lora.dropout=0"
            )
        if algo == "ppo":
            rlhf.check_ppo({k: cfg.algo[k] for k in rlhf.PPO_RANGES})  # not the judge's path
            rows = cfg.dataset.batch_size * cfg.algo.samples_per_prompt
            if rows < cfg.algo.num_minibatches:
                raise ConfigError(
                    f"algo.num_minibatches={cfg.algo.num_minibatches}: a rollout batch has "
                    f"{rows} samples (dataset.batch_size × algo.samples_per_prompt)"
                )
        if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches: algo={algo} updates once per rollout batch "
                "(PPO: algo.epochs × algo.num_minibatches times); set it to 1 and size the "
                "rollout with dataset.batch_size"
            )
    if cfg.reference.precompute:
        raise ConfigError(f"reference.precompute: algo={algo} scores new samples every step")
    if _updates_reference(cfg):
        raise ConfigError(
            f"callbacks.reference_update (TR-DPO) is for DPO-style losses, not algo={algo}"
        )
    strategy = str(cfg.trainer.get("strategy", ""))
    if "fsdp" in strategy.lower() or "deepspeed" in strategy.lower():
        raise ConfigError(
            f"trainer.strategy={strategy}: algo={algo} runs on one device or DDP (trainer=ddp); "
            "its sharded path is not built yet"
        )


def _updates_reference(cfg: DictConfig) -> bool:
    """Whether the callbacks group has TR-DPO's ``ReferenceUpdate``."""
    callbacks = [c for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return any(str(c.get("_target_", "")).endswith("ReferenceUpdate") for c in callbacks)


def check_config(cfg: DictConfig) -> tuple[LossSpec | None, dict[str, Any]]:
    """Validate what Hydra's struct mode cannot; return the loss and its bound kwargs (None and
    {} for the RLHF algos, which have their own objectives: ``check_rlhf_config``)."""
    if cfg.algo.name in rlhf.ALGOS or cfg.loss.name in rlhf.OBJECTIVE.values():
        check_rlhf_config(cfg)
        _check_common(cfg)
        return None, {}
    kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k != "name"
    }
    spec, kwargs = resolve_loss(cfg.loss.name, kwargs)
    takes_beta = "beta" in spec.params
    own = OmegaConf.to_container(cfg.loss, resolve=False).get("beta")
    if takes_beta and own != "${beta}" and kwargs.get("beta") != cfg.beta:
        # one source of truth: summary.json, W&B and the closed-form oracle all read `beta`
        raise ConfigError(
            f"loss.beta={kwargs.get('beta')!r} differs from beta={cfg.beta!r}; set β with the "
            f"top-level key (beta={kwargs.get('beta')}), which every loss and report reads"
        )
    if takes_beta:
        beta = cfg.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ConfigError(f"beta must be a number > 0 for loss={spec.name}, got {beta!r}")
    elif cfg.beta is not None:
        raise ConfigError(f"loss={spec.name} takes no beta; got beta={cfg.beta!r} (leave it unset)")
    if _updates_reference(cfg):
        if not spec.reference:
            raise ConfigError(
                f"callbacks.reference_update (TR-DPO) moves the reference model, and "
                f"loss={spec.name} has none"
            )
        if cfg.reference.precompute:
            raise ConfigError(
                "callbacks.reference_update (TR-DPO) moves the reference model, and "
                "reference.precompute=true scores a fixed one once; drop one of the two"
            )
    metric_names(spec, kwargs, spec.reference)  # the loss's own value checks, before any load
    if cfg.reference.precompute:
        if not spec.reference:
            raise ConfigError(f"reference.precompute=true, but loss={spec.name} uses no reference")
        if spec.token_split:
            raise ConfigError(
                f"reference.precompute is not available for loss={spec.name}: it reads the "
                "log-probs of each completion's shared-length prefix, and the cache keeps sums"
            )
        if spec.data == "unpaired":
            raise ConfigError(
                f"reference.precompute is not available for loss={spec.name}: its KL rows pair "
                "each prompt with another example's completion in the same batch, so they change "
                "with the batch order"
            )
    if cfg.algo.name == "online":
        if spec.data != "paired":
            raise ConfigError(f"algo=online forms pairs; loss={spec.name} takes unpaired data")
        if cfg.reference.precompute:
            raise ConfigError(
                "algo=online samples new completions each step, so their reference "
                "log-probs cannot be precomputed; drop reference.precompute"
            )
    _check_common(cfg)
    return spec, kwargs


def _check_common(cfg: DictConfig) -> None:
    precision = str(cfg.trainer.get("precision"))
    if precision in ("16-true", "16", "half"):
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision}: fp16 weights with no loss scaling "
            "overflow (NaN at the first step on the embedded task); use 16-mixed (fp32 weights, "
            "fp16 compute, a GradScaler), bf16-mixed or bf16-true"
        )
    if precision in ("bf16-true", "bf16"):
        log.warning(
            "trainer.precision=bf16-true trains bf16 weights (model.trainable_dtype does not "
            "apply): an update below half their resolution rounds away, e.g. norm weights near "
            "1.0 do not move at lr 5e-4. bf16-mixed keeps fp32 master weights"
        )
    if cfg.probe.size < 1 or cfg.probe.every_n_steps < 1:
        raise ConfigError("probe.size and probe.every_n_steps must be >= 1")
    if cfg.eval.num_prompts < 0:
        raise ConfigError(f"eval.num_prompts must be >= 0, got {cfg.eval.num_prompts}")
    if cfg.eval.samples_per_prompt < 1 or cfg.eval.max_new_tokens < 1:
        raise ConfigError(
            "eval.samples_per_prompt and eval.max_new_tokens must be >= 1, got "
            f"{cfg.eval.samples_per_prompt} and {cfg.eval.max_new_tokens}"
        )


def read_chat_template(value: str) -> str:
    """``model.chat_template``: a Jinja template, or the path of a file holding one."""
    if "{" in value:  # Jinja syntax: the template itself (never stat a template as a path)
        return value
    p = Path(value).expanduser()
    if not p.is_file():
        raise ConfigError(f"model.chat_template={value!r}: not a Jinja template and no such file")
    return p.read_text()


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config flattened to dotted keys (``loss.name``, ``beta``, ...) for loggers."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _format_summary(summary: dict[str, Any]) -> str:
    keys = [
        "val/rm/accuracies",
        "val/rm/true_accuracies",
        "probe/rm/accuracies",
        "val/rewards/accuracies",
        "probe/rewards/accuracies",
        "probe/true_accuracies",
        "val/rewards/margins",
        "val/logps/chosen",
        "val/logps/rejected",
        "eval/reward/policy",
        "eval/reward/reference",
        "eval/kl",
        "eval/length/policy",
        "probe/frac_chosen_below_ref",
        "wall_time_s",
    ]
    width = max(len(k) for k in keys)
    lines = [f"  {k:<{width}}  {summary[k]:.4f}" for k in keys if k in summary]
    what = (
        summary["loss"] if summary.get("algo") in (None, "offline", "online") else summary["algo"]
    )
    return "\n".join([f"dpo_lab summary ({what}, beta={summary['beta']}):", *lines])


@dataclass
class Run:
    """Everything one run is made of, built from the config before training starts."""

    cfg: DictConfig
    out: Path
    spec: LossSpec | None  # None for the RLHF algos (dpo_lab.rlhf), which have their own
    data: PreferenceData
    model_path: str
    tokenizer: Any
    datamodule: PreferenceDataModule
    module: Any  # PreferenceModule, or rlhf.RewardModelModule / rlhf.RLModule
    loggers: list[Any]
    trainer: L.Trainer
    ckpt_path: str | None = None  # the checkpoint this run resumes from

    @property
    def probe(self) -> DisplacementProbe | None:
        """The displacement probe, when the run has one that is on (paired data)."""
        probe = next((c for c in self.trainer.callbacks if isinstance(c, DisplacementProbe)), None)
        return probe if probe is not None and self.datamodule.probe_items else None


def build(cfg: DictConfig) -> Run:
    """Every piece of one run, in the order the run needs them.

    config → models → data → loggers, callbacks, trainer → the reference (live, or scored once
    here and freed: ``reference.precompute``) → the module.
    """
    spec, loss_kwargs = check_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if spec is None:
        return build_rlhf(cfg, out)

    # The model first: a wrong path fails before any data is read or built.
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    path = resolve_name_or_path(cfg.model.name_or_path, source)
    # The reference model: the policy's starting point unless named; none for a reference-free
    # loss; under LoRA the policy's base with the adapters off (no second copy).
    tokenizer, policy, reference_model = build_models(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.reference, resolve=True),
        path,
        source,
        needs_reference=spec.reference,
    )
    if cfg.dataset.padding_free:  # refused here, before any data, where packing is not exact
        packing.prepare_model(policy, what="policy")
        if reference_model is not None:
            packing.prepare_model(reference_model, what="reference")
    if cfg.model.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.model.chat_template)
    data, datamodule = build_data(cfg, tokenizer, unpaired=spec.data == "unpaired")

    ckpt_path = resolve_resume(cfg.resume, out)
    loggers = build_loggers(cfg, out, datamodule, resuming=ckpt_path is not None)
    trainer = build_trainer(cfg, loggers, build_callbacks(cfg, data, tokenizer, spec, loggers))
    check_strategy(trainer, policy)
    _cast_reference(cfg, trainer, reference_model)

    logps = OmegaConf.to_container(cfg.logps)  # completion_logps settings, the same everywhere
    reference = None
    if cfg.reference.precompute:  # score every pair once; then train without the reference model
        reference = precompute(
            reference_model,
            datamodule,
            device=trainer.strategy.root_device,
            precision=str(trainer.precision),
            precision_plugin=type(trainer.precision_plugin).__name__,
            forward_context=trainer.precision_plugin.forward_context,
            out_dir=out,
            cache_path=cfg.reference.cache_path,
            batch_size=cfg.reference.batch_size,
            logps_kwargs=logps,
            write=trainer.is_global_zero,
        )
        del reference_model  # freed (a LoRA base stays: it is the policy's own weights)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif reference_model is not None:
        reference = LiveReference(reference_model, logps)

    scheduler = instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None
    module = PreferenceModule(
        policy,
        reference,
        spec,
        loss_kwargs,
        instantiate(cfg.optim.optimizer),
        scheduler,
        logps_kwargs=logps,
        online=_online(cfg, data, tokenizer) if cfg.algo.name == "online" else None,
    )
    return Run(
        cfg, out, spec, data, path, tokenizer, datamodule, module, loggers, trainer, ckpt_path
    )


def build_rlhf(cfg: DictConfig, out: Path) -> Run:
    """``algo=reward_model`` (a Bradley-Terry reward model on the pairs) or ``algo=rloo|ppo``
    (RL on the policy's samples against a judge), from the same groups (``dpo_lab.rlhf``)."""
    algo = cfg.algo.name
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    path = resolve_name_or_path(cfg.model.name_or_path, source)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if algo == "reward_model":
        if cfg.reference.name_or_path or cfg.reference.dtype:
            raise ConfigError("reference.*: algo=reward_model has no reference model")
        tokenizer, model = rlhf.load_reward_model(path, model_cfg)
        policy = reference_model = None
    else:
        tokenizer, policy, reference_model = build_models(
            model_cfg,
            OmegaConf.to_container(cfg.reference, resolve=True),
            path,
            source,
            needs_reference=True,
        )
    if cfg.dataset.padding_free and policy is not None:
        packing.prepare_model(policy, what="policy")
        if not isinstance(reference_model, PeftReference):
            packing.prepare_model(reference_model, what="reference")
    if cfg.model.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.model.chat_template)
    data, datamodule = build_data(cfg, tokenizer, unpaired=False)
    ckpt_path = resolve_resume(cfg.resume, out)
    loggers = build_loggers(cfg, out, datamodule, resuming=ckpt_path is not None)
    trainer_cfg = cfg.trainer.copy()
    clip, clip_algorithm = None, None
    if algo != "reward_model":  # manual optimization: the module clips each update itself
        clip = trainer_cfg.get("gradient_clip_val")
        clip_algorithm = trainer_cfg.get("gradient_clip_algorithm")
        trainer_cfg.gradient_clip_val = None
        if "gradient_clip_algorithm" in trainer_cfg:
            trainer_cfg.gradient_clip_algorithm = None
    callbacks = build_callbacks(cfg, data, tokenizer, None, loggers)
    if algo == "reward_model":  # the probe and a task's oracle score a policy, which it has not
        callbacks = [
            c
            for c in callbacks
            if not isinstance(c, DisplacementProbe)
            and not type(c).__module__.startswith("dpo_lab.tasks")
        ]
    trainer = build_trainer(cfg, loggers, callbacks, trainer_cfg)
    optimizer = instantiate(cfg.optim.optimizer)
    scheduler = instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None
    if algo == "reward_model":
        true = {
            split: true_margins(rows, data.reward_fn)
            for split, rows in (("train", data.train), ("val", data.val))
        }
        module: Any = rlhf.RewardModelModule(model, optimizer, scheduler, true)
        return Run(
            cfg, out, None, data, path, tokenizer, datamodule, module, loggers, trainer, ckpt_path
        )
    check_strategy(trainer, policy)
    _cast_reference(cfg, trainer, reference_model)
    logps = OmegaConf.to_container(cfg.logps)
    if algo == "ppo":  # a batch takes several optimizer steps: checkpoint where a batch ends
        _checkpoint_at_batch_ends(trainer, cfg.algo.epochs * cfg.algo.num_minibatches)
        last = len(datamodule.train_items) % (cfg.dataset.batch_size * trainer.world_size)
        if 0 < last * cfg.algo.samples_per_prompt < cfg.algo.num_minibatches * trainer.world_size:
            raise ConfigError(
                f"algo.num_minibatches={cfg.algo.num_minibatches}: an epoch's last batch has "
                f"{last} prompts ({len(datamodule.train_items)} training rows, "
                f"dataset.batch_size={cfg.dataset.batch_size}), too few samples for every "
                "minibatch; set dataset.max_samples or dataset.batch_size so that it fits"
            )
    module = rlhf.RLModule(
        policy,
        LiveReference(reference_model, logps),
        _judge(cfg, data),
        tokenizer,
        [r["prompt"] for r in data.train],
        {it["index"]: it["prompt_ids"] for it in datamodule.train_items},
        OmegaConf.to_container(cfg.algo, resolve=True),
        cfg.beta,
        optimizer,
        scheduler,
        logps_kwargs=logps,
        true_reward=data.reward_fn,
        gradient_clip_val=clip,
        gradient_clip_algorithm=clip_algorithm,
        padding_free=cfg.dataset.padding_free,
    )
    return Run(
        cfg, out, None, data, path, tokenizer, datamodule, module, loggers, trainer, ckpt_path
    )


def _cast_reference(cfg: DictConfig, trainer: L.Trainer, reference_model: Any) -> None:
    """Lightning casts the policy for *-true precisions, DeepSpeed and FSDP's param_dtype; the
    reference is not the module's, so it gets the same compute dtype here (unless
    ``reference.dtype`` names one; a LoRA reference is the policy's own weights, cast with it)."""
    cast = compute_dtype(trainer)
    own_weights = isinstance(reference_model, PeftReference)
    if reference_model is not None and cast is not None and not own_weights:
        if cfg.reference.dtype is None:
            reference_model.to(cast)


def _checkpoint_at_batch_ends(trainer: L.Trainer, updates: int) -> None:
    """``checkpoint.every_n_steps`` rounded up to a multiple of a PPO batch's ``updates``:
    Lightning checks it once per batch, against a step that advances by ``updates``."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_warn

    for cb in trainer.callbacks:
        n = getattr(cb, "_every_n_train_steps", 0) if isinstance(cb, ModelCheckpoint) else 0
        if n and n % updates:
            rounded = -(-n // updates) * updates
            rank_zero_warn(
                f"checkpoint.every_n_steps={n}: PPO takes {updates} optimizer steps a batch "
                f"(algo.epochs × algo.num_minibatches), so it checkpoints every {rounded}"
            )
            cb._every_n_train_steps = rounded


def build_data(
    cfg: DictConfig, tokenizer: Any, *, unpaired: bool
) -> tuple[PreferenceData, PreferenceDataModule]:
    """The dataset source, normalized (``prepare``) and tokenized (``PreferenceDataModule``)."""
    raw = instantiate(cfg.dataset.source)
    if not isinstance(raw, PreferenceData):
        raise ConfigError(
            f"dataset.source._target_={cfg.dataset.source._target_!r} must return PreferenceData, "
            f"got {type(raw).__name__}"
        )
    data = prepare(
        raw,
        format=cfg.dataset.format,
        columns=OmegaConf.to_container(cfg.dataset.columns),
        on_bad_row=cfg.dataset.on_bad_row,
        label_noise=cfg.dataset.label_noise,
        max_samples=cfg.dataset.max_samples,
        seed=cfg.dataset.seed,
    )
    datamodule = PreferenceDataModule(
        data,
        tokenizer,
        batch_size=cfg.dataset.batch_size,
        eval_batch_size=cfg.dataset.eval_batch_size,
        max_length=cfg.dataset.max_length,
        max_prompt_length=cfg.dataset.max_prompt_length,
        probe_size=cfg.probe.size,
        seed=cfg.seed,
        num_workers=cfg.dataset.num_workers,
        unpaired=unpaired,
        group_by_length=cfg.dataset.group_by_length,
        padding_free=cfg.dataset.padding_free,
        cache=cfg.dataset.cache_tokenized,
    )
    return data, datamodule


def build_loggers(
    cfg: DictConfig, out: Path, datamodule: PreferenceDataModule, *, resuming: bool
) -> list[Any]:
    """The ``logger`` group's loggers, with the config and (on a fresh start) the data counts."""
    loggers = [_logger(name, c, out, resuming) for name, c in cfg.logger.items()]
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))
        if not resuming:  # a resumed run logged them at its start: once per run
            lg.log_metrics(datamodule.stats(), 0)
    return loggers


def build_callbacks(
    cfg: DictConfig,
    data: PreferenceData,
    tokenizer: Any,
    spec: LossSpec | None,
    loggers: list[Any],
) -> list[Any]:
    """The ``callbacks`` group (conf/callbacks/), in its order, plus the dataset's own checks.

    ``~callbacks.<name>`` (or ``callbacks.<name>=null``) removes one; ``trainer.enable_checkpointing
    =false`` drops the checkpointing ones and ``trainer.enable_progress_bar=false`` the bar, as a
    Lightning user expects of those flags.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    checkpointing = cfg.trainer.get("enable_checkpointing", True)
    progress = cfg.trainer.get("enable_progress_bar", True)
    callbacks: list[Any] = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if c is None:
            continue
        if not isinstance(c, DictConfig) or "_target_" not in c:
            raise ConfigError(f"callbacks.{name}: expected a mapping with a _target_, got {c!r}")
        try:
            cb = instantiate(c)
        except Exception as e:  # Hydra wraps the real cause: show it in one line
            if isinstance(e.__cause__, DpoLabError):
                raise e.__cause__ from None
            raise ConfigError(
                f"callbacks.{name}: could not instantiate {c._target_} ({e})"
            ) from None
        if not checkpointing and isinstance(cb, (ModelCheckpoint, SaveOnInterrupt, SaveFinalState)):
            continue
        if not progress and isinstance(cb, ProgressBar):
            continue
        callbacks.append(cb)
    if checkpointing and any(isinstance(lg, CSVLogger) for lg in loggers):
        callbacks.append(MetricsRowsAtCheckpoint(Path(cfg.output_dir) / "metrics.csv"))
    if getattr(data.oracle, "callback", None) is not None:  # a task's own exact checks
        extra = data.oracle.callback(
            tokenizer=tokenizer,
            beta=cfg.beta if spec is None or "beta" in spec.params else None,
            every_n_steps=cfg.probe.every_n_steps,
            out_dir=Path(cfg.output_dir),
        )
        if extra is not None:
            callbacks.append(extra)
    return callbacks


def check_strategy(trainer: L.Trainer, policy: Any) -> None:
    """Refuse, in one line, a policy the strategy cannot wrap."""
    from lightning.pytorch.strategies import FSDPStrategy

    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters()})
    if isinstance(trainer.strategy, FSDPStrategy) and len(dtypes) > 1:
        raise ConfigError(
            f"trainer=fsdp flattens each unit's weights into one tensor of one dtype, and the "
            f"policy holds {' and '.join(dtypes)} (model.dtype with fp32 trained weights, e.g. "
            "LoRA on a bf16 base); load it in float32 (model.dtype=float32) and let "
            "trainer.precision=bf16-mixed compute in bf16 (the reference may stay bf16: "
            "reference.dtype=bfloat16)"
        )


def build_trainer(
    cfg: DictConfig, loggers: list[Any], callbacks: list[Any], trainer_cfg: Any = None
) -> L.Trainer:
    """``lightning.Trainer`` from the ``trainer`` group (or ``trainer_cfg``, an edited copy of
    it); callbacks come from their own group."""
    trainer_cfg = cfg.trainer if trainer_cfg is None else trainer_cfg
    if "callbacks" in trainer_cfg:
        raise ConfigError(
            "trainer.callbacks: callbacks have their own group; add one with "
            "+callbacks.<name>._target_=<class> (see conf/callbacks/default.yaml)"
        )
    # a user's plugins (e.g. a precision plugin with its own GradScaler), then atomic checkpoints
    plugins = list(instantiate(trainer_cfg.get("plugins") or []))
    return instantiate(
        trainer_cfg,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(cfg.output_dir),
        plugins=[*plugins, AtomicCheckpointIO()],
    )


def _judge(cfg: DictConfig, data: PreferenceData) -> Any:
    """``algo.judge``: instantiated, or the dataset's ground-truth reward where it is null."""
    if cfg.algo.judge is not None:
        try:
            return instantiate(cfg.algo.judge)
        except Exception as e:  # Hydra wraps the real cause: show it in one line
            if isinstance(e.__cause__, DpoLabError):
                raise e.__cause__ from None
            raise ConfigError(f"algo.judge: could not instantiate it ({e})") from None
    if data.reward_fn is not None:
        return TaskRewardJudge(data.reward_fn)
    raise ConfigError(
        f"algo={cfg.algo.name} needs a judge: this dataset has no ground-truth reward; set "
        "algo.judge (a reward model: {_target_: dpo_lab.online.RewardModelJudge, name_or_path: "
        "...}, e.g. an algo=reward_model run's final/, or any f(prompt, completion) -> float)"
    )


def _online(cfg: DictConfig, data: PreferenceData, tokenizer: Any) -> OnlinePairs:
    return OnlinePairs(
        _judge(cfg, data),
        tokenizer,
        [r["prompt"] for r in data.train],
        samples_per_prompt=cfg.algo.samples_per_prompt,
        pairs=cfg.algo.pairs,
        temperature=cfg.algo.temperature,
        top_p=cfg.algo.top_p,
        max_new_tokens=cfg.algo.max_new_tokens,
        padding_free=cfg.dataset.padding_free,
    )


def _wandb_names(c: DictConfig) -> dict[str, str]:
    """Unset W&B name/group from Hydra: the run is named by its overrides, a sweep's runs share
    a group named after the sweep dir."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc, names = HydraConfig.get(), {}
    if c.get("name") is None and hc.job.override_dirname:
        names["name"] = hc.job.override_dirname
    if c.get("group") is None and _in_multirun():
        names["group"] = Path(hc.sweep.dir).name
    return names


def _logger(name: str, c: DictConfig, out: Path, resuming: bool) -> Any:
    """Instantiate one logger; a resumed run's W&B logger continues the same W&B run."""
    id_file, metrics = out / "wandb_run_id", out / "metrics.csv"
    extra: dict[str, Any] = {}
    if name == "wandb":
        extra = _wandb_names(c)
        if resuming and id_file.exists():
            extra.update(id=id_file.read_text().strip(), resume="allow")
    lg = instantiate(c, **extra)
    if rank_zero_only.rank != 0:  # other processes of a multi-process run log nothing
        return lg
    if name == "wandb":
        id_file.write_text(lg.experiment.id)
    if name == "csv" and resuming and metrics.exists():
        # Lightning's CSV writer deletes an existing metrics.csv when it starts; keep the rows
        # the run logged before it stopped, and append after them.
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), list(reader.fieldnames or [])
        writer = lg.experiment
        writer.metrics_keys = keys
        with open(writer.metrics_file_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return lg


def _load(cfg: DictConfig, path: str, dtype: str | None = None) -> tuple[Any, Any]:
    return load_model(
        path,
        dtype=dtype or cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _eval_reference(run: Run, policy: Any) -> Any:
    """The model the end-of-run evaluation samples as the reference: under LoRA ``policy``'s base
    with adapters off; else the training reference where one is alive (never sharded); else (a
    reference-free loss, or a precomputed reference, freed before training) loaded again."""
    cfg, module = run.cfg, run.module
    if is_peft(policy):
        return PeftReference(policy)
    if module.reference is not None and module.reference.model is not None:
        return module.reference.model
    if cfg.reference.name_or_path:
        source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
        path = resolve_name_or_path(cfg.reference.name_or_path, source, "reference.name_or_path")
        return _load(cfg, path, cfg.reference.dtype)[1].eval()
    return _load(cfg, run.model_path, cfg.reference.dtype)[1].eval()


def _unsharded_policy(cfg: DictConfig, path: str, state: dict[str, Any]) -> Any:
    """A whole copy of the trained policy on process 0, from its gathered state dict: the model
    built as for training (LoRA included), then the trained weights loaded strictly."""
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    _, policy, _ = build_models(
        OmegaConf.to_container(cfg.model, resolve=True),
        {},
        path,
        source,
        needs_reference=False,
    )
    # strict about what the copy needs; a continued LoRA adapter's frozen reference copy (a
    # second adapter the training policy held) is the one thing it may leave out
    missing, unexpected = policy.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if ".reference." not in k]
    if missing or unexpected:
        raise RuntimeError(f"gathered policy state does not fit: {missing[:3]} {unexpected[:3]}")
    return policy.eval()


def distinct_prompts(rows: list[dict[str, Any]], n: int) -> list[Any]:
    """The first ``n`` distinct prompts of ``rows``, in order (conversational prompts, lists of
    messages, compared by content)."""
    seen: dict[str, Any] = {}
    for r in rows:
        seen.setdefault(json.dumps(r["prompt"], sort_keys=True), r["prompt"])
    return list(seen.values())[:n]


def finish(run: Run, t0: float) -> dict[str, Any]:
    """After fit: evaluate, save ``final/`` and ``summary.json``, close the loggers."""
    cfg, module, trainer, out = run.cfg, run.module, run.trainer, run.out
    policy = getattr(module, "policy", None)  # a reward model's run has none
    if isinstance(module, rlhf.RewardModelModule) and module.validated_at != trainer.global_step:
        # stopped (max_steps) after the last validation, or before any: score the held-out
        # pairs with the final model, on every process (the reduction is collective)
        trainer.validate(module, datamodule=run.datamodule, verbose=False)
    if shards_parameters(trainer):  # every process helps gather the whole policy onto rank 0
        state = full_policy_state(trainer, module)
        if trainer.is_global_zero:
            policy = _unsharded_policy(cfg, run.model_path, state).to(module.device)
    if not trainer.is_global_zero:  # other processes of a multi-process run: rank 0 reports
        return {}
    summary: dict[str, Any] = {
        "loss": cfg.loss.name,
        "algo": cfg.algo.name,
        "beta": cfg.beta,
        "seed": cfg.seed,
        "steps": trainer.global_step,
        # pairs (or unpaired examples) per optimizer step, over every device and micro-batch
        "global_batch_size": cfg.dataset.batch_size
        * trainer.accumulate_grad_batches
        * trainer.world_size,
    }
    summary.update(
        {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    )
    if run.probe is not None:
        summary.update(run.probe.last_metrics)  # the final policy's probe numbers
    if getattr(module, "online", None) is not None:
        summary["online/pairs_total"] = module.online.pairs_total
    if isinstance(module, rlhf.RLModule):
        summary["rl/samples_total"] = module.samples_total
    if isinstance(module, rlhf.RewardModelModule):
        return _finish_reward_model(run, summary, t0)

    rows: list[dict[str, Any]] | None = None
    if cfg.eval.num_prompts > 0:
        eval_reference = _eval_reference(run, policy)
        eval_reference.to(module.device)
        # distinct held-out prompts, in order; each sampled eval.samples_per_prompt times
        prompts = distinct_prompts(run.data.val, cfg.eval.num_prompts)
        if len(prompts) < cfg.eval.num_prompts:
            log.warning(
                "eval.num_prompts=%d, but the held-out split has %d distinct prompts: "
                "evaluating those (eval/num_prompts)",
                cfg.eval.num_prompts,
                len(prompts),
            )
        metrics, rows = evaluate(
            policy,
            eval_reference,
            run.tokenizer,
            prompts,
            run.datamodule.reward_fn,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            samples_per_prompt=cfg.eval.samples_per_prompt,
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            seed=cfg.seed,
        )
        summary.update(metrics)
        with open(out / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for lg in run.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    save_final(
        policy,
        run.tokenizer,
        out / "final",
        merge=cfg.model.lora.merge_on_save,
        load_base=lambda: _load(cfg, run.model_path)[1],
    )
    summary["wall_time_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for lg in run.loggers:
        if isinstance(lg, WandbLogger):  # tables and figures, beyond the scalars
            log_wandb_media(lg, out, trainer.global_step, rows)
        lg.save()
        experiment = getattr(lg, "experiment", None)
        if hasattr(experiment, "summary"):  # W&B: final numbers in the run summary
            experiment.summary.update(summary)
            experiment.finish()
    return summary


def _finish_reward_model(run: Run, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    """A reward model's end of run: its probe-pair accuracies, ``final/`` (a transformers
    sequence classifier that ``RewardModelJudge`` loads) and ``summary.json``."""
    module, out = run.module, run.out
    summary.update(
        module.probe_metrics(run.datamodule.probe_batches(), run.datamodule.probe_true_margins())
    )
    module.model.save_pretrained(out / "final")
    run.tokenizer.save_pretrained(out / "final")
    summary["wall_time_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for lg in run.loggers:
        lg.log_metrics(
            {k: v for k, v in summary.items() if k.startswith("probe/")},
            step=run.trainer.global_step,
        )
        lg.save()
        experiment = getattr(lg, "experiment", None)
        if hasattr(experiment, "summary"):
            experiment.summary.update(summary)
            experiment.finish()
    return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; return the summary (also written to the run dir).

    build (config, models, data, loggers, callbacks, trainer; the reference, precomputed here if
    asked; the module) → fit → the final checkpoint → evaluate, save ``final/``, summarize.
    """
    t0 = time.time()
    run = build(cfg)
    if run.ckpt_path:
        log.info("resuming from %s", run.ckpt_path)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    for cb in run.trainer.callbacks:  # the final state, whatever N divides
        if isinstance(cb, SaveFinalState):
            cb.save_after_fit(run.trainer)
    summary = finish(run, t0)
    if summary:
        print(_format_summary(summary), flush=True)
    return summary


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(out: Path, error: BaseException) -> None:
    import traceback

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    (out / "failed.json").write_text(json.dumps(record, indent=2))


@hydra.main(version_base="1.3", config_path="pkg://dpo_lab.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        summary = train(cfg)
    except Exception as e:  # not SIGTERMException: a SystemExit, handled below
        if _in_multirun():  # one failed job must not end the sweep: record it and go on
            _record_failure(Path(cfg.output_dir), e)
            print(
                f"dpo_lab: job failed ({type(e).__name__}: {e}); recorded in "
                f"{cfg.output_dir}/failed.json",
                file=sys.stderr,
                flush=True,
            )
            return None
        if not isinstance(e, DpoLabError):
            raise
        print(f"dpo_lab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SIGTERMException:  # Lightning exits 0 here; a scheduler should see a termination
        print(
            f"dpo_lab: stopped by SIGTERM; checkpoint in {cfg.output_dir}/checkpoints/last.ckpt; "
            f"continue with resume=auto hydra.run.dir={cfg.output_dir}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(143)
    value = summary.get(cfg.optimized_metric) if cfg.optimized_metric else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
