"""``python -m dpo_lab.train [group=option ...] [key=value ...]``: one preference-optimization run.

``train(cfg)`` is a plain function of a composed config (tests call it directly); ``main`` is the
thin Hydra wrapper that turns user mistakes into one-line errors and returns the swept metric.
"""

from __future__ import annotations

import csv
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dpo_lab.callbacks import DisplacementProbe
from dpo_lab.data.datamodule import PreferenceDataModule
from dpo_lab.data.formats import prepare
from dpo_lab.data.sources import PreferenceData
from dpo_lab.errors import ConfigError, DpoLabError
from dpo_lab.evaluation import evaluate
from dpo_lab.faults import AtomicCheckpointIO, SaveFinalState, SaveOnInterrupt, resolve_resume
from dpo_lab.loggers import log_wandb_media
from dpo_lab.lora import PeftReference, is_peft
from dpo_lab.losses import LossSpec, bind_loss_kwargs, get_loss
from dpo_lab.models import build_models, load_model, resolve_name_or_path, save_final
from dpo_lab.module import PreferenceModule
from dpo_lab.online import OnlinePairs, TaskRewardJudge
from dpo_lab.refcache import PrecomputedReference

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
# run dir already holds Hydra's files when the CSV logger starts.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")


def check_config(cfg: DictConfig) -> tuple[LossSpec, dict[str, Any]]:
    """Validate what Hydra's struct mode cannot; return the loss and its bound kwargs."""
    spec = get_loss(cfg.loss.name)
    kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k != "name"
    }
    takes_beta = "beta" in spec.params
    if takes_beta:
        beta = cfg.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ConfigError(f"beta must be a number > 0 for loss={spec.name}, got {beta!r}")
    elif cfg.beta is not None:
        raise ConfigError(f"loss={spec.name} takes no beta; got beta={cfg.beta!r} (leave it unset)")
    kwargs = bind_loss_kwargs(spec, kwargs)
    if cfg.reference.precompute:
        if not spec.reference:
            raise ConfigError(f"reference.precompute=true, but loss={spec.name} uses no reference")
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
    if cfg.probe.size < 1 or cfg.probe.every_n_steps < 1:
        raise ConfigError("probe.size and probe.every_n_steps must be >= 1")
    if cfg.eval.num_prompts < 0:
        raise ConfigError(f"eval.num_prompts must be >= 0, got {cfg.eval.num_prompts}")
    return spec, kwargs


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
    return "\n".join([f"dpo_lab summary ({summary['loss']}, beta={summary['beta']}):", *lines])


@dataclass
class Run:
    """Everything one run is made of, built from the config before training starts."""

    cfg: DictConfig
    out: Path
    spec: LossSpec
    data: PreferenceData
    model_path: str
    tokenizer: Any
    datamodule: PreferenceDataModule
    module: PreferenceModule
    probe: DisplacementProbe | None
    loggers: list[Any]
    trainer: L.Trainer
    ckpt_path: str | None = None  # the checkpoint this run resumes from


def build(cfg: DictConfig) -> Run:
    """Check ``cfg`` and build data, models, module, callbacks, loggers and trainer."""
    spec, loss_kwargs = check_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # The model first: a wrong path fails before any data is read or built.
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    path = resolve_name_or_path(cfg.model.name_or_path, source)
    # The reference: the policy's starting point unless named; a reference-free loss never
    # builds one; under LoRA it is the policy's base with the adapters off (no second copy).
    tokenizer, policy, reference = build_models(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.reference, resolve=True),
        path,
        source,
        needs_reference=spec.reference,
    )
    if cfg.model.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.model.chat_template)

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
    dm = PreferenceDataModule(
        data,
        tokenizer,
        batch_size=cfg.dataset.batch_size,
        eval_batch_size=cfg.dataset.eval_batch_size,
        max_length=cfg.dataset.max_length,
        max_prompt_length=cfg.dataset.max_prompt_length,
        probe_size=cfg.probe.size,
        seed=cfg.seed,
        num_workers=cfg.dataset.num_workers,
        unpaired=spec.data == "unpaired",
        group_by_length=cfg.dataset.group_by_length,
        cache=cfg.dataset.cache_tokenized,
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    on_nonfinite = trainer_cfg.pop("on_nonfinite")  # ours, not a lightning.Trainer argument
    scheduler = instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None
    online = _online(cfg, data, tokenizer) if cfg.algo.name == "online" else None
    module = PreferenceModule(
        policy,
        reference,
        spec,
        loss_kwargs,
        instantiate(cfg.optim.optimizer),
        scheduler,
        logps_kwargs=OmegaConf.to_container(cfg.logps),
        on_nonfinite=on_nonfinite,
        online=online,
    )
    ckpt_path = resolve_resume(cfg.resume, out)
    callbacks: list[Any] = []
    if trainer_cfg.get("enable_checkpointing", True):
        ckpt_dir = out / "checkpoints"
        callbacks += [
            ModelCheckpoint(
                dirpath=ckpt_dir,
                save_top_k=0,
                save_last=True,
                every_n_train_steps=cfg.checkpoint.every_n_steps or 0,
                enable_version_counter=False,
            ),
            SaveOnInterrupt(ckpt_dir),
            SaveFinalState(ckpt_dir),
        ]
    if cfg.reference.precompute:  # before the probe: it frees the reference at fit start
        callbacks.append(
            PrecomputedReference(out, cfg.reference.cache_path, cfg.reference.batch_size)
        )
    probe = None
    if dm.probe_items:
        ids = [it["id"] for it in dm.probe_items]
        probe = DisplacementProbe(
            dm.probe_batch(), ids, cfg.probe.every_n_steps, out, _true_margins(data, ids)
        )
        callbacks.append(probe)
    else:
        log.warning("unpaired data has no pairs: the displacement probe is off for this run")
    if getattr(data.oracle, "callback", None) is not None:  # a task's own exact checks
        extra = data.oracle.callback(
            tokenizer=tokenizer,
            beta=cfg.beta if "beta" in spec.params else None,
            every_n_steps=cfg.probe.every_n_steps,
            out_dir=out,
        )
        if extra is not None:
            callbacks.append(extra)
    resuming = ckpt_path is not None
    loggers = [_logger(name, c, out, resuming) for name, c in cfg.logger.items()]
    hparams = flat_config(cfg)
    data_stats = {f"data/dropped_too_long/{k}": v for k, v in dm.dropped_too_long.items()}
    data_stats.update({f"data/{k}": v for k, v in data.stats.items()})
    for lg in loggers:
        lg.log_hyperparams(hparams)
        lg.log_metrics(data_stats, 0)
    trainer = instantiate(
        trainer_cfg,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
    )
    return Run(
        cfg, out, spec, data, path, tokenizer, dm, module, probe, loggers, trainer, ckpt_path
    )


def _true_margins(data: PreferenceData, ids: list[str]) -> torch.Tensor | None:
    """r(chosen) − r(rejected) of the probe pairs under the task's true reward, if it has one."""
    if data.reward_fn is None:
        return None
    rows = {r["id"]: r for r in data.val}
    margins = []
    for i in ids:
        r = rows[i]
        margins.append(
            data.reward_fn(r["prompt"], r["chosen"]) - data.reward_fn(r["prompt"], r["rejected"])
        )
    known = [m for m in margins if m != 0]
    if not known:
        return None
    return torch.tensor(margins, dtype=torch.float64)


def _online(cfg: DictConfig, data: PreferenceData, tokenizer: Any) -> OnlinePairs:
    if cfg.algo.judge is not None:
        judge = instantiate(cfg.algo.judge)
    elif data.reward_fn is not None:
        judge = TaskRewardJudge(data.reward_fn)
    else:
        raise ConfigError(
            "algo=online needs a judge: this dataset has no ground-truth reward; set algo.judge "
            "(a reward model: {_target_: dpo_lab.online.RewardModelJudge, name_or_path: ...}, or "
            "any f(prompt, completion) -> float)"
        )
    return OnlinePairs(
        judge,
        tokenizer,
        [r["prompt"] for r in data.train],
        samples_per_prompt=cfg.algo.samples_per_prompt,
        pairs=cfg.algo.pairs,
        temperature=cfg.algo.temperature,
        top_p=cfg.algo.top_p,
        max_new_tokens=cfg.algo.max_new_tokens,
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


def _load(cfg: DictConfig, path: str) -> tuple[Any, Any]:
    return load_model(
        path,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def finish(run: Run, t0: float) -> dict[str, Any]:
    """After fit: evaluate, save ``final/`` and ``summary.json``, close the loggers."""
    cfg, module, trainer, out = run.cfg, run.module, run.trainer, run.out
    if not trainer.is_global_zero:  # other processes of a multi-process run: rank 0 reports
        return {}
    summary: dict[str, Any] = {
        "loss": run.spec.name,
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
    if module.online is not None:
        summary["online/pairs_total"] = module.online_pairs_total

    rows: list[dict[str, Any]] | None = None
    if cfg.eval.num_prompts > 0:
        eval_reference = module.reference
        if eval_reference is None and is_peft(module.policy):  # LoRA: the base, adapters off
            eval_reference = PeftReference(module.policy)
        elif eval_reference is None:  # reference-free loss: load the starting point for eval
            eval_reference = _load(cfg, run.model_path)[1]
        eval_reference.to(module.device)
        prompts = [r["prompt"] for r in run.data.val[: cfg.eval.num_prompts]]
        metrics, rows = evaluate(
            module.policy,
            eval_reference,
            run.tokenizer,
            prompts,
            run.datamodule.reward_fn,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
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
        module.policy,
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; return the summary (also written to the run dir)."""
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
