"""The training loop: learning-rate schedules, per-step lr / grad-norm / throughput / memory,
metric means over micro-batches, the callbacks group, one source of truth for β, validation
every N steps beside the probe, train mode and dropout, and a run's output free of library
noise."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import env_with_tests, make_cfg, run_cli

from dpo_lab.errors import ConfigError
from dpo_lab.losses import LossOutput, PairedLogps, UnpairedLogps
from dpo_lab.metrics import PreferenceMetrics
from dpo_lab.schedules import warmup_then_decay
from dpo_lab.train import build, check_config


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def fit(cfg):
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


# ---------------------------------------------------------------------- learning-rate schedules


def lrs(decay: str, total: int = 20, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_then_decay(opt, total_steps=total, decay=decay, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_by_hand():
    # W = 4 warm-up steps of T = 20: 0, 1/4, 2/4, 3/4, then the decay
    c = lrs("constant", warmup_steps=4)
    assert c[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and c[-1] == 1.0
    lin = lrs("linear", warmup_steps=4)
    assert lin[4] == 1.0 and lin[12] == pytest.approx((20 - 12) / 16)  # (T − s)/(T − W)
    assert lin[19] == pytest.approx(1 / 16)
    cos = lrs("cosine", warmup_steps=4)
    assert cos[12] == pytest.approx(0.5)  # halfway through the decay: ½(1 + cos(π/2))
    assert cos[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))
    floor = lrs("cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert floor[12] == pytest.approx(0.1 + 0.9 * 0.5)
    # warm-up as a ratio of the run: 0.2 × 20 = 4 steps, the same schedule
    assert lrs("cosine", warmup_ratio=0.2, warmup_steps=None) == cos


def test_schedules_equal_transformers_without_a_floor():
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    for decay, theirs in (
        ("constant", lambda o: get_constant_schedule_with_warmup(o, 3)),
        ("linear", lambda o: get_linear_schedule_with_warmup(o, 3, 17)),
        ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 3, 17)),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = theirs(opt)
        expected = [ref.lr_lambdas[0](s) for s in range(17)]
        assert lrs(decay, total=17, warmup_steps=3) == pytest.approx(expected, abs=1e-12)


def test_schedule_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="exactly one of warmup_steps and warmup_ratio"):
        warmup_then_decay(opt, total_steps=10, warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="decay='cosin'"):
        warmup_then_decay(opt, total_steps=10, decay="cosin", warmup_steps=0)
    with pytest.raises(ConfigError, match="needs the run's length"):
        warmup_then_decay(opt, total_steps=None, decay="cosine", warmup_steps=0)
    with pytest.raises(ConfigError, match="min_lr_ratio applies to linear and cosine"):
        warmup_then_decay(opt, total_steps=10, warmup_steps=0, min_lr_ratio=0.1)


@pytest.mark.slow
def test_a_run_logs_lr_grad_norm_throughput_and_memory_every_step(tmp_path):
    """A cosine schedule sized by Lightning from max_epochs (6 steps), warm-up as a ratio: the
    logged train/lr is the schedule's, and every step row has grad norm, throughput, memory."""
    out = tmp_path / "run"
    fit(
        make_cfg(
            out,
            "optim.scheduler.decay=cosine",
            "optim.scheduler.warmup_steps=null",
            "optim.scheduler.warmup_ratio=0.34",  # ceil(0.34 × 6) = 3 warm-up steps
            "trainer.log_every_n_steps=1",
            "eval.num_prompts=0",
        )
    )
    train = [r for r in rows(out) if "train/loss" in r]
    assert [int(r["step"]) for r in train] == list(range(6))
    lr = [float(r["train/lr"]) for r in train]
    base = 5e-4
    expected = [0, 1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert lr == pytest.approx([base * e for e in expected], rel=1e-6)
    for r in train:
        assert float(r["train/grad_norm"]) > 0
        assert float(r["train/tokens_per_sec"]) > 0 and float(r["train/examples_per_sec"]) > 0
        assert float(r["train/peak_memory_mib"]) > 50  # this process's peak RSS


@pytest.mark.slow
def test_grad_norm_is_before_clipping(tmp_path):
    """A clip far below the norm: the logged norm is the gradient's own, above the clip."""
    out = tmp_path / "run"
    fit(
        make_cfg(
            out,
            "trainer.gradient_clip_val=1e-4",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "eval.num_prompts=0",
        )
    )
    norms = [float(r["train/grad_norm"]) for r in rows(out) if "train/grad_norm" in r]
    assert len(norms) == 2 and min(norms) > 1e-3


# ------------------------------------------------------------- metric means, per example


def test_metrics_weight_every_example_once():
    """Two micro-batches of 3 and 1 pairs: the step's means are over the 4 examples, not a mean
    of the two batch means; an empty KTO subset is left out, not logged as 0."""
    m = PreferenceMetrics(paired=True, names=["loss", "extra", *PAIRED_NAMES])

    def add(chosen, rejected):
        c, r = torch.tensor(chosen), torch.tensor(rejected)
        n = torch.ones(len(chosen))
        pol = PairedLogps(c, r, n, n)
        m.update(pol, None, LossOutput(c - r, c, r, {"extra": (c - r).mean()}))

    add([1.0, 2.0, 3.0], [0.0, 0.0, 5.0])
    add([10.0], [0.0])
    out = m.compute()
    assert out["loss"] == pytest.approx((1 + 2 - 2 + 10) / 4)  # not ((1/3) + 10) / 2
    assert out["rewards/accuracies"] == pytest.approx(3 / 4)
    assert out["extra"] == pytest.approx((1 + 2 - 2 + 10) / 4)  # batch scalars weighted by size
    assert "ref_logps/chosen" not in out
    m.reset()
    assert m.compute() == {}  # nothing added since: nothing reported

    u = PreferenceMetrics(paired=False, names=["loss", *UNPAIRED_NAMES])
    x = torch.tensor([0.5, -0.5])
    pol = UnpairedLogps(x, torch.ones(2), torch.tensor([True, True]), x)
    u.update(pol, None, LossOutput(x, x))
    out = u.compute()
    assert out["rewards/chosen"] == pytest.approx(0.0) and "rewards/rejected" not in out


PAIRED_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"]  # fmt: skip
UNPAIRED_NAMES = ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]


def test_metric_names_come_from_the_loss_itself():
    from dpo_lab.losses import get_loss
    from dpo_lab.metrics import metric_names

    assert metric_names(get_loss("dpop"), {"beta": 0.1}, True) == [
        "loss", "penalty", "rewards/margins", "rewards/accuracies", *PAIRED_NAMES[:2],
        *PAIRED_NAMES[4:], "ref_logps/chosen", "ref_logps/rejected",
    ]  # fmt: skip
    assert metric_names(get_loss("kto"), {"beta": 0.1}, True)[:2] == ["loss", "kl"]
    assert "ref_logps/chosen" not in metric_names(get_loss("simpo"), {"beta": 2.0}, False)


@pytest.mark.slow
def test_accumulated_steps_log_the_whole_step(tmp_path):
    """batch 8 × 2 accumulated micro-batches logs what batch 16 logs: the optimizer step's
    means, not its last micro-batch's."""
    common = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "eval.num_prompts=0"]
    fit(make_cfg(tmp_path / "big", "dataset.batch_size=16", *common))
    fit(
        make_cfg(
            tmp_path / "acc", "dataset.batch_size=8", "trainer.accumulate_grad_batches=2", *common
        )
    )
    keys = [
        "train/loss",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/ref_logps/chosen",
    ]

    def logged(out):
        return [[float(r[k]) for k in keys] for r in rows(out) if "train/loss" in r]

    big, acc = logged(tmp_path / "big"), logged(tmp_path / "acc")
    assert len(big) == len(acc) == 3
    for a, b in zip(big, acc, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


# ------------------------------------------------------------------------- callbacks group


class Recorder(L.Callback):
    """A user's own callback, added from the command line in a test."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        self.path.write_text(f"{trainer.global_step}\n")


class Warner(L.Callback):
    def on_train_start(self, trainer, pl_module):
        import warnings

        warnings.warn("a real warning from the user's callback", UserWarning, stacklevel=1)


@pytest.mark.slow
def test_callbacks_are_added_and_removed_from_the_command_line(tmp_path):
    out, mark = tmp_path / "run", tmp_path / "recorded.txt"
    proc = run_cli(
        "trainer.max_steps=2",
        "eval.num_prompts=0",
        "+callbacks.recorder._target_=test_loop.Recorder",
        f"+callbacks.recorder.path={mark}",
        "+callbacks.warner._target_=test_loop.Warner",
        "~callbacks.probe",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env=env_with_tests(),  # so that _target_=test_loop.Recorder imports
    )
    assert mark.read_text() == "2\n"  # the user's callback ran, to the end of training
    assert not (out / "probe.csv").exists()  # the removed one did not
    # the run's own output: no library noise, but a real warning still shows
    text = proc.stdout + proc.stderr
    noise_lines = (
        "💡",
        "litlogger",
        "LeafSpec",
        "weights_only",
        "val_check_interval=1.0",
        "Loading weights",
    )
    for noise in noise_lines:
        assert noise not in text, noise
    assert "a real warning from the user's callback" in text


def test_callbacks_errors_are_one_line(tmp_path):
    from omegaconf import open_dict

    cfg = make_cfg(tmp_path / "r", "+callbacks.bad._target_=no.such.Callback")
    with pytest.raises(ConfigError, match=r"callbacks.bad: could not instantiate no.such.Callback"):
        build(cfg)
    cfg = make_cfg(tmp_path / "r", "callbacks.nonfinite_guard.mode=sometimes")
    with pytest.raises(ConfigError, match=r"callbacks.nonfinite_guard.mode='sometimes'"):
        build(cfg)
    cfg = make_cfg(tmp_path / "r")
    with open_dict(cfg):
        cfg.trainer.callbacks = []
    with pytest.raises(ConfigError, match="callbacks have their own group"):
        build(cfg)


def test_trainer_flags_drop_their_callbacks(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    run = build(make_cfg(tmp_path / "r", "trainer.enable_checkpointing=false"))
    assert not any(isinstance(c, (ModelCheckpoint, ProgressBar)) for c in run.trainer.callbacks)
    run = build(make_cfg(tmp_path / "s", "trainer.enable_progress_bar=true"))
    assert any(isinstance(c, ModelCheckpoint) for c in run.trainer.callbacks)
    assert any(isinstance(c, ProgressBar) for c in run.trainer.callbacks)


# -------------------------------------------------------------------------------------- β


def test_beta_has_one_source_of_truth(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.beta=0.5 differs from beta=0.1"):
        check_config(make_cfg(tmp_path, "loss.beta=0.5"))
    spec, kwargs = check_config(make_cfg(tmp_path, "beta=0.5"))
    assert kwargs["beta"] == 0.5
    check_config(make_cfg(tmp_path, "loss.beta=0.1"))  # the same value: nothing to disagree on


# ------------------------------------------------------- validation every N steps, probe


@pytest.mark.slow
def test_validation_every_n_steps_beside_the_probe(tmp_path):
    out = tmp_path / "run"
    fit(
        make_cfg(
            out,
            "trainer.val_check_interval=2",
            "trainer.check_val_every_n_epoch=null",
            "trainer.max_steps=6",
            "trainer.max_epochs=-1",
            "eval.num_prompts=0",
        )
    )
    logged = rows(out)
    val_steps = [int(r["step"]) for r in logged if "val/loss" in r]
    probe_steps = [int(r["step"]) for r in logged if "probe/logps/chosen" in r]
    assert val_steps == [1, 3, 5]  # after updates 2, 4, 6 (a row's step: updates before it)
    assert probe_steps == [0, 2, 4, 6]
    assert len({r["step"] for r in logged if "val/loss" in r}) == 3  # one val row each


# ------------------------------------------------------------- train mode and dropout


def dropout_model(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_lab.tasks.sentiment import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.5,  # functional dropout inside attention, as Llama/Qwen2 apply it
        attn_implementation="eager",
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dropout")
    tok.save_pretrained(tmp_path / "dropout")
    return tmp_path / "dropout"


@pytest.mark.slow
@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_by_default_and_the_reference_never_runs_it(tmp_path, disable):
    from dpo_lab.logps import paired_logps

    path = dropout_model(tmp_path)
    run = build(
        make_cfg(
            tmp_path / "run",
            f"model.name_or_path={path}",
            "model.attn_implementation=eager",
            f"model.disable_dropout={str(disable).lower()}",
        )
    )
    module, batch = run.module, run.datamodule.probe_batches()[0]
    module.on_fit_start()  # train mode, as at the start of fit
    assert module.policy.training and not module.reference.model.training
    with torch.no_grad():
        a, b = (paired_logps(module.policy, batch).chosen for _ in range(2))
        r1, r2 = (module.reference.paired(batch, "val").chosen for _ in range(2))
    assert torch.equal(a, b) == disable  # dropout off: the training forward is deterministic
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)  # the reference: eval mode, always
    if disable:  # same weights, no dropout: policy and reference agree at the start
        torch.testing.assert_close(a, r1, rtol=0, atol=1e-5)
    # the saved model keeps its own config
    assert module.policy.config.attention_dropout == 0.5


@pytest.mark.slow
def test_the_policy_trains_in_train_mode(tmp_path):
    """from_pretrained builds modules in eval mode and Lightning keeps modes as built, so without
    the module's on_fit_start, gradient checkpointing (which needs train mode) never ran."""
    calls = []
    run = build(
        make_cfg(
            tmp_path / "run",
            "model.gradient_checkpointing=true",
            "trainer.max_steps=1",
            "+trainer.limit_val_batches=0",
            "~callbacks.probe",
            "eval.num_prompts=0",
        )
    )
    layer = run.module.policy.model.layers[0]
    checkpointed = layer._gradient_checkpointing_func  # transformers runs it in train mode only

    def counted(*args, **kwargs):
        calls.append(layer.training)
        return checkpointed(*args, **kwargs)

    layer._gradient_checkpointing_func = counted
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert calls == [True]  # the one training forward went through activation checkpointing
